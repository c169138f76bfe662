//! The worker as monitors see and steer it: the answers to remote control (`celery inspect`,
//! `celery control`, Flower), the status behind `/metrics` and `/healthz`, and the worker
//! heartbeat events.

use super::Shared;
use crate::config::Rate;
use crate::config::resolve::is_queue_name;
use crate::monitor::control::{BoxFuture, Context, ControlError, Worker};
use crate::monitor::endpoint::{Health as HealthReport, Status as StatusSource};
use crate::monitor::metrics::Snapshot;
use crate::protocol::event::{HEARTBEAT_FREQ, WorkerEvent};
use crate::protocol::message::tree_or_text;
use crate::protocol::time::{format_time, from_epoch_ms};
use crate::protocol::{Meta, RevokeReason, State, TaskMessage, exception_document};
use crate::redis::keys::{queue_of, source_keys};
use crate::redis::{Delivery, redact};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Delayed messages `inspect scheduled` lists at most.
const SCHEDULED_SHOWN: usize = 1_000;

/// What remote control works with.
pub(super) fn context(shared: &Arc<Shared>) -> Context {
    Context {
        node: shared.config.node.clone(),
        worker: Arc::new(Remote(shared.clone())),
        revocations: shared.revocations.clone(),
        events: shared.events.clone(),
    }
}

/// (tasks running, tasks processed), as worker events report them.
fn counts(shared: &Shared) -> (u64, u64) {
    let active = shared.held.running_count() as u64;
    let processed = shared.metrics.totals().values().sum();
    (active, processed)
}

/// Sends worker-online, then a heartbeat every [`HEARTBEAT_FREQ`] while events are on, and
/// worker-offline when `gone` is set (after the running tasks finished).
pub(super) async fn heartbeats(shared: Arc<Shared>, mut gone: crate::shutdown::Stopping) {
    let events = &shared.events;
    let (active, processed) = counts(&shared);
    events.worker(WorkerEvent::Online, active, processed);
    let mut ticks = tokio::time::interval(HEARTBEAT_FREQ);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let (active, processed) = counts(&shared);
                events.worker(WorkerEvent::Heartbeat, active, processed);
            }
            () = crate::shutdown::stopped(&mut gone) => break,
        }
    }
    let (active, processed) = counts(&shared);
    events.worker(WorkerEvent::Offline, active, processed);
    events.flush(Duration::from_secs(1)).await;
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
            .held
            .running()
            .iter()
            .filter_map(|(delivery, started)| request(&self.0, delivery, Some(*started)))
            .collect()
    }

    fn reserved(&self) -> Vec<Value> {
        self.0
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
        let concurrency = shared.concurrency.load(Ordering::Relaxed);
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
            "total": shared.metrics.totals(),
            "pid": std::process::id(),
            "clock": shared.events.clock().to_string(),
            "uptime": shared.started.elapsed().as_secs(),
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
                "ssl": false,
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
            "rusage": rusage(),
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
            "worker_concurrency": self.0.concurrency.load(Ordering::Relaxed),
            "worker_prefetch_multiplier": config.prefetch_multiplier,
            "worker_send_task_events": self.0.events.enabled(),
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
        super::autoscale::resize(&self.0, delta)
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
        counts(&self.0)
    }
}

/// This process's resource usage, as Celery's `stats.rusage` (from /proc: the fields Linux
/// keeps; CPU times in seconds at the kernel's usual 100 ticks per second).
fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let status_field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // In /proc/self/stat after the name: state is 0, minflt 7, majflt 9, utime 11, stime 12.
    json!({
        "utime": field(11) as f64 / 100.0,
        "stime": field(12) as f64 / 100.0,
        "maxrss": status_field("VmHWM:"),
        "minflt": field(7),
        "majflt": field(9),
        "nvcsw": status_field("voluntary_ctxt_switches:"),
        "nivcsw": status_field("nonvoluntary_ctxt_switches:"),
    })
}

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
        let fetching = shared.health.is_fetching();
        let heartbeat = shared.registration.beat_within(
            crate::redis::recovery::heartbeat_interval(shared.config.heartbeat_lapse) * 2
                + Duration::from_secs(1),
        );
        let stopped_loops = shared
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
                running: shared.held.running_count() as u64,
                reserved: shared.held.reserved_count() as u64,
                concurrency: shared.concurrency.load(Ordering::Relaxed) as u64,
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
                uptime_seconds: shared.started.elapsed().as_secs_f64(),
                spans: shared.telemetry.as_ref().map(|t| t.totals()),
            };
            shared.metrics.render(&snapshot)
        })
    }

    fn health(&self) -> BoxFuture<'_, HealthReport> {
        Box::pin(Status::health(self))
    }
}
