//! What a stop does with what is left: running tasks get the grace period, the outcomes being
//! written are written, and what did not finish goes back to its queue.

use super::Shared;
use super::fetch::{Fetcher, Lists};
use crate::redis::Delivery;
use std::future::Future;
use tokio::task::JoinSet;

/// How long a stop waits for the outcomes being written before it returns what is left.
const FLUSH_AT_STOP: std::time::Duration = std::time::Duration::from_secs(10);

/// After a stop: lets running tasks finish within the grace period (or until `force`), then
/// returns what is left, unstarted or unfinished, to its queue. Returns how many were
/// returned, and whether every one could be.
pub(super) async fn wind_down(
    shared: &Shared,
    fetcher: Fetcher<Lists>,
    mut tasks: JoinSet<()>,
    force: impl Future<Output = ()>,
) -> (usize, bool) {
    let config = &shared.config;
    tracing::info!(
        running = shared.pool.held.running_count(),
        grace_s = config.shutdown_grace.as_secs_f64(),
        "stopping: no new tasks; waiting for running ones (a second signal stops them at once)"
    );
    let unstarted = fetcher.stop().await;
    let finished = tokio::select! {
        finished = tokio::time::timeout(config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        }) => finished.is_ok(),
        () = force => false,
    };
    if !finished {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // A task aborted while its outcome was being written is finished: once written, its
    // message is gone from the in-flight list, and the requeue below moves nothing for it.
    if !shared.settler.flush(FLUSH_AT_STOP).await {
        tracing::warn!(
            "finished tasks' outcomes were not all written within {FLUSH_AT_STOP:?} (is Redis \
             away?): returning the unfinished messages anyway"
        );
    }
    let unfinished: Vec<Delivery> = shared.pool.held.drain_running();
    let returned = unstarted.len() + unfinished.len();
    let mut all_returned = true;
    for delivery in unstarted.iter().chain(&unfinished) {
        if let Err(e) = shared.broker.requeue(delivery).await {
            all_returned = false;
            tracing::error!(
                "could not return a message to {}: {e}; it stays in {} until another worker \
                 returns it",
                delivery.source,
                shared.broker.inflight_key(&delivery.source)
            );
        }
    }
    (returned, all_returned)
}
