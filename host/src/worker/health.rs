//! Whether the worker is consuming: it is waiting for a free slot, or Redis answered a fetch
//! recently (an empty answer counts). The heartbeat carries it, `/healthz` reports it, and a
//! watcher logs when it changes.

use crate::clock::now_ms;
use crate::shutdown::Stopping;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// A worker that has not fetched for this long while it had room is not consuming.
pub const FETCH_STALL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Health {
    last_fetch_ms: AtomicI64,
    waiting_for_slot: AtomicBool,
}

impl Default for Health {
    /// Healthy from the start: the stall clock starts now.
    fn default() -> Self {
        Self {
            last_fetch_ms: AtomicI64::new(now_ms()),
            waiting_for_slot: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// A fetch was answered.
    pub fn fetched(&self) {
        self.last_fetch_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether every slot is busy (so not fetching is expected).
    pub fn set_waiting_for_slot(&self, waiting: bool) {
        self.waiting_for_slot.store(waiting, Ordering::Relaxed);
    }

    /// Whether the worker is consuming.
    pub fn is_fetching(&self) -> bool {
        self.waiting_for_slot.load(Ordering::Relaxed)
            || now_ms() - self.last_fetch_ms.load(Ordering::Relaxed)
                < i64::try_from(FETCH_STALL.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Logs when the worker stops consuming, and when it resumes, until `stop`. Apart from the
/// heartbeat, whose Redis calls a stalled Redis holds up.
pub async fn watch(health: Arc<Health>, mut stop: Stopping) {
    let mut fetching = true;
    loop {
        let now_fetching = health.is_fetching();
        if now_fetching != fetching {
            if now_fetching {
                tracing::info!("fetching again");
            } else {
                tracing::warn!(
                    "not fetching: Redis has answered no fetch for {} s while slots are free",
                    FETCH_STALL.as_secs()
                );
            }
            fetching = now_fetching;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}
