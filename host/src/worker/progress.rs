//! A running task's progress (`update-state`), stored where Celery's clients read it at a
//! bounded rate: a burst of [`BURST`] writes, then at most [`PER_SECOND`] a second, the
//! updates in between coalesced to the latest. A write of more than [`BYTES_PER_WRITE`] costs
//! as many writes as it holds of them, so the bytes are bounded too: [`PER_SECOND`] ×
//! [`BYTES_PER_WRITE`] a second after the burst, however large each update. A plugin calling
//! `update-state` in a loop costs Redis no more than this, and never delays its own task.

use crate::lock;
use crate::protocol::{Meta, result_document};
use crate::redis::Backend;
use crate::sandbox::{Progress, ProgressError};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Progress writes a task may make at once.
pub const BURST: f64 = 10.0;
/// Progress writes a task may make per second after its burst.
pub const PER_SECOND: f64 = 10.0;
/// The bytes one write's allowance covers; a larger update costs more.
pub const BYTES_PER_WRITE: usize = 64 * 1024;

/// What writing `meta` costs of the allowance: one write per [`BYTES_PER_WRITE`] begun.
fn cost(state: &str, meta: &Value) -> f64 {
    let bytes = state.len() + serde_json::to_vec(meta).map_or(0, |v| v.len());
    (bytes.div_ceil(BYTES_PER_WRITE)).max(1) as f64
}

/// Stores one running task's progress as its state.
pub(super) struct ProgressWriter(Arc<Inner>);

struct Inner {
    backend: Backend,
    task_id: String,
    parent_id: Option<String>,
    group: Option<String>,
    bucket: Mutex<Bucket>,
}

/// The write allowance, and the update waiting for it.
struct Bucket {
    tokens: f64,
    filled_at: Instant,
    latest: Option<(String, Value)>,
    /// The deferred write, while one is scheduled: it takes whatever is latest when it runs.
    deferred: Option<AbortHandle>,
}

impl ProgressWriter {
    pub(super) fn new(
        backend: Backend,
        task_id: String,
        parent_id: Option<String>,
        group: Option<String>,
    ) -> Self {
        Self(Arc::new(Inner {
            backend,
            task_id,
            parent_id,
            group,
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                filled_at: Instant::now(),
                latest: None,
                deferred: None,
            }),
        }))
    }
}

impl Bucket {
    /// Takes a write costing `cost` now (the allowance may go below zero: the writes after
    /// it wait the longer), or says how long until one is allowed.
    fn take(&mut self, cost: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let refill = now.duration_since(self.filled_at).as_secs_f64() * PER_SECOND;
        self.tokens = (self.tokens + refill).min(BURST);
        self.filled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= cost;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / PER_SECOND))
    }
}

impl Inner {
    /// Stores `state` unless the task already has its outcome (a late update never replaces it).
    async fn write(&self, state: &str, meta: &Value) -> Result<(), ProgressError> {
        let who = Meta {
            task_id: &self.task_id,
            parent_id: self.parent_id.as_deref(),
            group: self.group.as_deref(),
            children: &[],
        };
        let doc = result_document(&who, state, meta, None, crate::clock::now());
        self.backend
            .store_unless_ready(&self.task_id, &doc)
            .await
            .map(|_| ())
            .map_err(|e| ProgressError(e.to_string()))
    }

    /// Writes the latest update once the allowance has room again.
    async fn deferred(self: Arc<Self>, mut wait: Duration) {
        loop {
            tokio::time::sleep(wait).await;
            let latest = {
                let mut bucket = lock(&self.bucket);
                let cost = bucket
                    .latest
                    .as_ref()
                    .map_or(1.0, |(state, meta)| cost(state, meta));
                match bucket.take(cost) {
                    Ok(()) => {
                        bucket.deferred = None;
                        bucket.latest.take()
                    }
                    Err(more) => {
                        wait = more;
                        continue;
                    }
                }
            };
            if let Some((state, meta)) = latest
                && let Err(e) = self.write(&state, &meta).await
            {
                tracing::warn!(task_id = %self.task_id, "{e}");
            }
            return;
        }
    }
}

impl Progress for ProgressWriter {
    fn update(
        &self,
        state: String,
        meta: Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProgressError>> + Send + '_>> {
        Box::pin(async move {
            {
                let mut bucket = lock(&self.0.bucket);
                if bucket.deferred.is_some() {
                    bucket.latest = Some((state, meta));
                    return Ok(());
                }
                if let Err(wait) = bucket.take(cost(&state, &meta)) {
                    bucket.latest = Some((state, meta));
                    let task = tokio::spawn(self.0.clone().deferred(wait));
                    bucket.deferred = Some(task.abort_handle());
                    return Ok(());
                }
            }
            self.0.write(&state, &meta).await
        })
    }
}

impl Drop for ProgressWriter {
    /// The task has ended: its outcome supersedes any update still waiting.
    fn drop(&mut self) {
        if let Some(deferred) = lock(&self.0.bucket).deferred.take() {
            deferred.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket() -> Bucket {
        Bucket {
            tokens: BURST,
            filled_at: Instant::now(),
            latest: None,
            deferred: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_allowed_then_the_rate() {
        let mut bucket = bucket();
        for _ in 0..10 {
            assert_eq!(bucket.take(1.0), Ok(()));
        }
        let wait = bucket.take(1.0).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(bucket.take(1.0), Ok(()));
        assert!(bucket.take(1.0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn large_updates_are_bounded_in_bytes_not_only_in_writes() {
        let mut bucket = bucket();
        let mib = serde_json::json!("x".repeat(1 << 20));
        let (mut bytes, mut writes) = (0usize, 0u32);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match bucket.take(cost("PROGRESS", &mib)) {
                Ok(()) => {
                    bytes += 1 << 20;
                    writes += 1;
                }
                Err(wait) => tokio::time::advance(wait).await,
            }
        }
        // One write of the burst, then 640 KiB a second: about 7 MiB in 10 s, not 100.
        let allowed = BURST as usize * BYTES_PER_WRITE + (1 << 20) + 10 * 10 * BYTES_PER_WRITE;
        assert!(
            bytes <= allowed,
            "{bytes} bytes in {writes} writes over 10 s"
        );
        assert!(writes >= 5, "large updates still go out: {writes}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_task_earns_back_no_more_than_its_burst() {
        let mut bucket = bucket();
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..10 {
            assert_eq!(bucket.take(1.0), Ok(()));
        }
        assert!(bucket.take(1.0).is_err());
    }
}
