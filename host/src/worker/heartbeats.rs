//! The worker's own events for monitors: worker-online, a heartbeat every
//! [`HEARTBEAT_FREQ`] while events are on, and worker-offline once the running tasks finished.

use super::{Monitor, Pool, Shared};
use crate::protocol::event::{HEARTBEAT_FREQ, WorkerEvent};
use std::sync::Arc;
use std::time::Duration;

/// (tasks running, tasks processed), as worker events and `inspect stats` report them.
pub(super) fn counts(pool: &Pool, monitor: &Monitor) -> (u64, u64) {
    let active = pool.held.running_count() as u64;
    let processed = monitor.metrics.totals().values().sum();
    (active, processed)
}

/// Sends worker-online, then a heartbeat every [`HEARTBEAT_FREQ`] while events are on, and
/// worker-offline when `gone` is set (after the running tasks finished).
pub(super) async fn heartbeats(shared: Arc<Shared>, mut gone: crate::shutdown::Stopping) {
    let events = &shared.monitor.events;
    let (active, processed) = counts(&shared.pool, &shared.monitor);
    events.worker(WorkerEvent::Online, active, processed);
    let mut ticks = tokio::time::interval(HEARTBEAT_FREQ);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let (active, processed) = counts(&shared.pool, &shared.monitor);
                events.worker(WorkerEvent::Heartbeat, active, processed);
            }
            () = crate::shutdown::stopped(&mut gone) => break,
        }
    }
    let (active, processed) = counts(&shared.pool, &shared.monitor);
    events.worker(WorkerEvent::Offline, active, processed);
    events.flush(Duration::from_secs(1)).await;
}
