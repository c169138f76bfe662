//! The worker as remote control sees and steers it: the answers to `celery inspect`,
//! `celery control` and Flower. The worker's status for `/metrics` and `/healthz` is
//! `status.rs`'s, its heartbeat events `heartbeats.rs`'s, its resource usage `rusage.rs`'s.

use super::Shared;
use crate::config::Rate;
use crate::config::resolve::is_queue_name;
use crate::monitor::control::{BoxFuture, Context, ControlError, Worker};
use crate::protocol::message::tree_or_text;
use crate::protocol::time::{format_time, from_epoch_ms};
use crate::protocol::{Meta, RevokeReason, State, TaskMessage, exception_document};
use crate::redis::keys::{queue_of, source_keys};
use crate::redis::{Delivery, redact};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Delayed messages `inspect scheduled` lists at most.
const SCHEDULED_SHOWN: usize = 1_000;

/// What remote control works with.
pub(super) fn context(shared: &Arc<Shared>) -> Context {
    Context {
        node: shared.config.node.clone(),
        worker: Arc::new(Remote(shared.clone())),
        revocations: shared.revocations.clone(),
        events: shared.monitor.events.clone(),
    }
}

/// A message as Celery's `Request.info()` describes it in `inspect active|reserved|scheduled`.
fn request(shared: &Shared, delivery: &Delivery, time_start: Option<f64>) -> Option<Value> {
    let message = TaskMessage::decode(&delivery.raw).ok()?;
    Some(json!({
        "id": message.id,
        "name": message.task,
        "args": tree_or_text(&message.args),
        "kwargs": tree_or_text(&message.kwargs),
        "type": message.task,
        "hostname": shared.config.node,
        "time_start": time_start,
        "acknowledged": false,
        "delivery_info": {
            "exchange": "",
            "routing_key": queue_of(&delivery.source),
            "priority": message.priority,
            "redelivered": false,
        },
        "worker_pid": std::process::id(),
    }))
}

struct Remote(Arc<Shared>);

impl Worker for Remote {
    fn active(&self) -> Vec<Value> {
        self.0
            .pool
            .held
            .running()
            .iter()
            .filter_map(|(delivery, started)| request(&self.0, delivery, Some(*started)))
            .collect()
    }

    fn reserved(&self) -> Vec<Value> {
        self.0
            .pool
            .held
            .reserved()
            .iter()
            .filter_map(|delivery| request(&self.0, delivery, None))
            .collect()
    }

    fn scheduled(&self) -> BoxFuture<'_, Vec<Value>> {
        Box::pin(async move {
            let consumed = self.0.queues.borrow().clone();
            let delayed = match self.0.broker.delayed(SCHEDULED_SHOWN).await {
                Ok(delayed) => delayed,
                Err(e) => {
                    tracing::warn!("cannot read the delayed set for inspect scheduled: {e}");
                    return Vec::new();
                }
            };
            delayed
                .iter()
                .filter(|(_, d)| consumed.iter().any(|q| q == queue_of(&d.source)))
                .filter_map(|(due_ms, delivery)| {
                    let request = request(&self.0, delivery, None)?;
                    let eta = from_epoch_ms(*due_ms).map(format_time);
                    Some(json!({
                        "eta": eta,
                        "priority": request["delivery_info"]["priority"],
                        "request": request,
                    }))
                })
                .collect()
        })
    }

    fn registered(&self) -> Vec<String> {
        self.0
            .plugins
            .registry()
            .task_names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    fn stats(&self) -> Value {
        let shared = &self.0;
        let concurrency = shared.pool.concurrency.load(Ordering::Relaxed);
        let (host, port) = shared.broker.client().address();
        let db = shared.broker.client().db();
        let defaults = shared.grants.load().defaults();
        let limits = &defaults.limits;
        let plugins: serde_json::Map<String, Value> = shared
            .plugins
            .registry()
            .plugins()
            .map(|p| (p.name.to_string(), Value::from(p.version.clone())))
            .collect();
        json!({
            "total": shared.monitor.metrics.totals(),
            "pid": std::process::id(),
            "clock": shared.monitor.events.clock().to_string(),
            "uptime": shared.monitor.started.elapsed().as_secs(),
            "pool": {
                "implementation": "taskhost:wasm",
                "max-concurrency": concurrency,
                "processes": [std::process::id()],
                "max-tasks-per-child": null,
                "put-guarded-by-semaphore": true,
                "timeouts": [
                    limits.soft_time_limit.map_or(0.0, |d| d.as_secs_f64()),
                    limits.time_limit.map_or(0.0, |d| d.as_secs_f64()),
                ],
            },
            "broker": {
                "hostname": host,
                "userid": null,
                "virtual_host": db.to_string(),
                "port": port,
                "insist": false,
                "ssl": shared.broker.client().uses_tls(),
                "transport": "redis",
                "connect_timeout": 5,
                "transport_options": {},
                "login_method": null,
                "uri_prefix": null,
                "heartbeat": 120.0,
                "failover_strategy": "round-robin",
                "alternates": [],
            },
            "prefetch_count": concurrency.saturating_mul(shared.config.prefetch_multiplier),
            "rusage": super::rusage::rusage(),
            "taskhost": {
                "version": env!("CARGO_PKG_VERSION"),
                "plugins": plugins,
                "queues": shared.queues.borrow().clone(),
            },
        })
    }

    fn queues(&self) -> Vec<String> {
        self.0.queues.borrow().clone()
    }

    fn conf(&self) -> Value {
        let config = &self.0.config;
        json!({
            "broker_url": redact(&config.broker_url),
            "result_backend": redact(&config.backend_url),
            "result_expires": config.result_expires,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "worker_concurrency": self.0.pool.concurrency.load(Ordering::Relaxed),
            "worker_prefetch_multiplier": config.prefetch_multiplier,
            "worker_send_task_events": self.0.monitor.events.enabled(),
            "task_queues": self.0.queues.borrow().clone(),
            "plugins_dir": config.plugins_dir.display().to_string(),
            "heartbeat_lapse": config.heartbeat_lapse.as_secs_f64(),
            "max_redeliveries": config.max_redeliveries,
            "shutdown_grace": config.shutdown_grace.as_secs_f64(),
        })
    }

    fn set_rate_limit(&self, task: &str, rate: Option<&str>) -> Result<(), ControlError> {
        if self.0.plugins.registry().resolve(task).is_none() {
            return Err(ControlError::UnknownTask);
        }
        let parsed = rate.map(Rate::parse).transpose()?;
        self.0.gates.rates.set(task, parsed);
        tracing::info!(
            task,
            rate = rate.unwrap_or("none"),
            "rate limit set by remote control"
        );
        Ok(())
    }

    fn set_time_limit(
        &self,
        task: &str,
        soft: Option<f64>,
        hard: Option<f64>,
    ) -> Result<(), ControlError> {
        if self.0.plugins.registry().resolve(task).is_none() {
            return Err(ControlError::UnknownTask);
        }
        let valid = |s: Option<f64>| s.is_none_or(|s| s.is_finite() && s >= 0.0);
        if !valid(soft) || !valid(hard) {
            return Err(ControlError::BadTimeLimit);
        }
        // 0 or none lifts a limit, as in Celery.
        let positive = |s: Option<f64>| s.filter(|s| *s > 0.0);
        self.0
            .gates
            .set_time_limits(task, positive(soft), positive(hard));
        tracing::info!(task, ?soft, ?hard, "time limits set by remote control");
        Ok(())
    }

    fn add_consumer(&self, queue: &str) -> BoxFuture<'_, Result<bool, ControlError>> {
        let queue = queue.to_owned();
        Box::pin(async move {
            if !is_queue_name(&queue) {
                return Err(ControlError::BadQueue(queue));
            }
            if self.0.queues.borrow().contains(&queue) {
                return Ok(false);
            }
            // Recorded before the first fetch, so a crash never strands its in-flight list.
            self.0
                .registration
                .add_sources(&source_keys(std::slice::from_ref(&queue)))
                .await
                .map_err(|e| ControlError::Register(e.to_string()))?;
            let added = self.0.queues.send_if_modified(|queues| {
                if queues.contains(&queue) {
                    return false;
                }
                queues.push(queue.clone());
                true
            });
            if added {
                tracing::info!(queue, "consuming a new queue (remote control)");
            }
            Ok(added)
        })
    }

    fn cancel_consumer(&self, queue: &str) -> Result<bool, ControlError> {
        let mut last = false;
        let removed = self.0.queues.send_if_modified(|queues| {
            if queues.len() == 1 && queues[0] == queue {
                last = true;
                return false;
            }
            let before = queues.len();
            queues.retain(|q| q != queue);
            queues.len() != before
        });
        if last {
            return Err(ControlError::LastQueue(queue.to_owned()));
        }
        if removed {
            tracing::info!(queue, "no longer consuming a queue (remote control)");
        }
        Ok(removed)
    }

    /// Grows at most back to the concurrency the worker started with, which the sandbox's
    /// instance pool was sized for; shrinks to one slot at the least.
    fn resize_pool(&self, delta: i64) -> usize {
        self.0.pool.resize(self.0.config.concurrency, delta)
    }

    fn shutdown(&self) {
        let _ = self.0.stop_tx.send(true);
    }

    /// A task waiting in a queue or the delayed set is REVOKED at once, so its waiters need not
    /// wait for its turn. A task some worker holds is left to that worker: a running one ends
    /// with its own outcome, as in Celery (only `terminate` stops it), and one not yet started
    /// meets the revoke at its gates. A ready result is never replaced.
    fn revoked(&self, task_ids: Vec<String>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let shared = &self.0;
            let held = match crate::redis::control::in_flight_anywhere(
                &mut shared.broker.connection(),
                &task_ids,
            )
            .await
            {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!("cannot tell whether a worker holds the revoked tasks: {e}");
                    return;
                }
            };
            let exception = RevokeReason::Revoked.exception();
            for task_id in task_ids.iter().filter(|id| !held.contains(*id)) {
                let doc = exception_document(
                    &Meta::of(task_id),
                    State::Revoked,
                    &exception,
                    crate::clock::now(),
                );
                if let Err(e) = shared.backend.store_unless_ready(task_id, &doc).await {
                    tracing::warn!(task_id, "cannot store the REVOKED result: {e}");
                }
            }
        })
    }

    fn counts(&self) -> (u64, u64) {
        super::heartbeats::counts(&self.0.pool, &self.0.monitor)
    }
}
