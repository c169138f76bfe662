//! What settling and refusing both need: publishing messages now (one whose queue key holds
//! another type dead-lettered alone), whether a step moved a message out of the in-flight list,
//! and the metrics label of a task that may not be served.

use super::Shared;
use crate::redis::deadletter;
use crate::redis::keys::queue_of;
use crate::redis::settle::Outgoing;
use crate::redis::{Delivery, RedisError, retrying};

/// Publishes `messages` now, retrying while Redis is away. A message whose queue key holds
/// another type is dead-lettered alone (the others were pushed); one Redis refuses to the
/// ACL user is said so (the worker then stops). Neither is tried again: the task settles on.
pub(super) async fn publish(shared: &Shared, what: &str, messages: &[Outgoing]) {
    if messages.is_empty() {
        return;
    }
    match retrying(what, || shared.broker.push(messages)).await {
        Ok(refused) => {
            for message in refused.into_iter().filter_map(|i| messages.get(i)) {
                let reason = deadletter::unpushed_reason(&message.key);
                tracing::error!(queue = %message.key, "{reason}; the message is dead-lettered");
                if let Err(e) = retrying("dead-letter a message", || {
                    shared.dead_letters.unpushed(message)
                })
                .await
                {
                    tracing::error!("cannot dead-letter it either ({e}): it is lost");
                }
            }
        }
        Err(e) => {
            let queues: Vec<&str> = messages.iter().map(|m| m.key.as_str()).collect();
            tracing::error!(?queues, "cannot {what} (Redis refuses it for good): {e}");
        }
    }
}

/// Whether the step `what` moved the message out of the in-flight list; if not, it was gone
/// (another worker returned it) or Redis refused the step for good, and it stays for recovery.
pub(super) fn moved_or_not(
    shared: &Shared,
    what: &str,
    moved: Result<bool, RedisError>,
    delivery: &Delivery,
) -> bool {
    match moved {
        Ok(true) => true,
        Ok(false) => {
            shared.monitor.metrics.settle_skipped();
            tracing::warn!(
                queue = %queue_of(&delivery.source),
                "a message this worker settled was no longer in its in-flight list (another \
                 worker returned it): nothing was moved"
            );
            false
        }
        Err(e) => {
            tracing::error!(
                "cannot {what} (Redis refuses it for good), so the message stays in flight: {e}"
            );
            false
        }
    }
}

/// The `task` label of a task that may not be served: its name only when a plugin serves it,
/// since names from producers are unbounded.
pub(super) fn metrics_label<'a>(shared: &Shared, task: Option<&'a str>) -> &'a str {
    task.filter(|t| shared.plugins.registry().resolve(t).is_some())
        .unwrap_or("(unregistered)")
}
