//! The worker's status behind `/metrics` and `/healthz` (`monitor::endpoint` serves them).

use super::Shared;
use crate::monitor::control::BoxFuture;
use crate::monitor::endpoint::{Health as HealthReport, Status as StatusSource};
use crate::monitor::metrics::Snapshot;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The status behind `/metrics` and `/healthz`.
pub(super) struct Status(pub(super) Arc<Shared>);

impl Status {
    async fn health(&self) -> HealthReport {
        let shared = &self.0;
        let ping = tokio::time::timeout(
            Duration::from_secs(1),
            crate::redis::ping(&mut shared.broker.connection()),
        )
        .await;
        let connected = matches!(ping, Ok(Ok(_)));
        let fetching = shared.monitor.health.is_fetching();
        let heartbeat = shared.registration.beat_within(
            crate::redis::recovery::heartbeat_interval(shared.config.heartbeat_lapse) * 2
                + Duration::from_secs(1),
        );
        let stopped_loops = shared
            .monitor
            .loops
            .down()
            .into_iter()
            .map(|(name, restarts)| format!("{name} (restarted {restarts} times)"))
            .collect();
        HealthReport {
            connected,
            fetching,
            heartbeat,
            stopped_loops,
        }
    }
}

impl StatusSource for Status {
    fn metrics(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let shared = &self.0;
            let queues = shared.queues.borrow().clone();
            let health = self.health().await;
            let (queue_lengths, delayed, dead_letter_length) =
                match shared.broker.lengths(&queues).await {
                    Ok((lengths, delayed, dead)) => (
                        queues.into_iter().zip(lengths).collect(),
                        Some(delayed),
                        Some(dead),
                    ),
                    Err(e) => {
                        tracing::debug!("cannot read queue lengths for /metrics: {e}");
                        (Vec::new(), None, None)
                    }
                };
            let (reloads, reload_failures) = shared.plugins.reload_counts();
            let (instances_made, instances_recycled) = shared.sandbox.instance_counts();
            let snapshot = Snapshot {
                queue_lengths,
                delayed,
                dead_letter_length,
                running: shared.pool.held.running_count() as u64,
                reserved: shared.pool.held.reserved_count() as u64,
                concurrency: shared.pool.concurrency.load(Ordering::Relaxed) as u64,
                plugins: shared
                    .plugins
                    .registry()
                    .plugins()
                    .map(|p| {
                        (
                            p.name.to_string(),
                            p.version.clone(),
                            p.wit_version.to_string(),
                        )
                    })
                    .collect(),
                reloads,
                reload_failures,
                instances_made,
                instances_recycled,
                healthy: health.healthy(),
                uptime_seconds: shared.monitor.started.elapsed().as_secs_f64(),
                spans: shared.monitor.telemetry.as_ref().map(|t| t.totals()),
            };
            shared.monitor.metrics.render(&snapshot)
        })
    }

    fn health(&self) -> BoxFuture<'_, HealthReport> {
        Box::pin(Status::health(self))
    }
}
