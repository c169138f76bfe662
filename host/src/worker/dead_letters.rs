//! The one way into the dead-letter list, whoever sends a message there (a refusal, a settle
//! that failed for good, a follow-up whose queue key refused it): the entry says why and
//! where from, the move is counted in `/metrics`, and the list is kept within
//! `[worker] dead_letter_max`.

use crate::monitor::metrics::Metrics;
use crate::redis::deadletter::{self, Origin};
use crate::redis::settle::Outgoing;
use crate::redis::{Broker, Delivery, RedisError};
use std::sync::Arc;

/// Where this worker's dead letters go, and what each one counts.
#[derive(Clone)]
pub struct DeadLetters {
    broker: Broker,
    /// The worker's node name, for entries.
    node: String,
    metrics: Arc<Metrics>,
    /// `[worker] dead_letter_max`.
    max: u64,
}

impl DeadLetters {
    pub fn new(broker: Broker, node: String, metrics: Arc<Metrics>, max: u64) -> Self {
        Self {
            broker,
            node,
            metrics,
            max,
        }
    }

    /// Moves `delivery`'s message out of the in-flight list into the dead-letter list, saying
    /// `reason`; whether it moved (false: it was no longer in flight, nothing was written).
    pub async fn message(
        &self,
        delivery: &Delivery,
        reason: &str,
        task_id: Option<&str>,
        task: Option<&str>,
    ) -> Result<bool, RedisError> {
        let origin = Origin {
            reason,
            task_id,
            task,
            source: &delivery.source,
            worker: &self.node,
        };
        let entry = deadletter::entry(&delivery.raw, &origin);
        let moved = self.broker.dead_letter(delivery, &entry).await?;
        if moved {
            self.added().await;
        }
        Ok(moved)
    }

    /// Adds a follow-up that was never pushed, its queue key holding another type, to the
    /// dead-letter list.
    pub async fn unpushed(&self, message: &Outgoing) -> Result<(), RedisError> {
        let entry = deadletter::unpushed_entry(message, &self.node);
        self.broker.add_dead_letter(&entry).await?;
        self.added().await;
        Ok(())
    }

    /// Counts an entry added, and drops the oldest past the cap.
    async fn added(&self) {
        self.metrics.dead_lettered();
        match deadletter::trim(&mut self.broker.connection(), self.max).await {
            Ok(0) => {}
            Ok(dropped) => tracing::warn!(
                dropped,
                "dead-letter list over dead_letter_max ({}): the oldest entries were dropped",
                self.max
            ),
            Err(e) => tracing::warn!("cannot trim the dead-letter list: {e}"),
        }
    }
}
