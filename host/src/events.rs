//! Celery's monitoring events (`celery worker -E`), as Flower and `celery events` read them:
//! worker-online/heartbeat/offline and task-received/started/succeeded/failed/retried/
//! revoked/rejected, published on Redis Pub/Sub `/<db>.celeryev/<type>` in Celery's envelope.
//!
//! Events are off unless the operator turns them on (`-E`) or a monitor asks for them (the
//! `enable_events` broadcast Flower sends); off, the task path pays one atomic load. Task
//! events are batched into one `task.multi` list per flush, as Celery's dispatcher does, by a
//! publisher task behind a bounded channel: a Redis that cannot keep up loses events (counted
//! in the metrics), never slows or stops a task. Events are not stored by Redis either: with no
//! subscriber they are gone, as in Celery.

use crate::metrics::Metrics;
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a worker heartbeat is sent (Celery's `freq`); monitors take a worker for gone
/// after two missed beats.
pub const HEARTBEAT_FREQ: Duration = Duration::from_secs(2);
/// Task events sent in one `task.multi` message at most (Celery flushes at 24 too).
const BATCH: usize = 24;
/// Events waiting for the publisher before new ones are dropped.
const BACKLOG: usize = 10_000;

/// The event dispatcher of one worker; also keeps its Lamport clock, which remote-control
/// replies share.
pub struct Events {
    enabled: AtomicBool,
    clock: AtomicU64,
    hostname: String,
    pid: u32,
    tx: mpsc::Sender<Outgoing>,
    metrics: Arc<Metrics>,
}

enum Outgoing {
    Task(Value),
    Worker(Value),
    /// Answered once everything sent before it is published.
    Flushed(tokio::sync::oneshot::Sender<()>),
}

impl Events {
    /// Starts the publisher on `conn`, for the database `client` points at.
    pub fn start(
        client: &redis::Client,
        conn: ConnectionManager,
        hostname: &str,
        enabled: bool,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let prefix = format!(
            "/{}.celeryev/",
            client.get_connection_info().redis_settings().db()
        );
        tokio::spawn(publish(conn, prefix, hostname.to_owned(), rx));
        Arc::new(Self {
            enabled: AtomicBool::new(enabled),
            clock: AtomicU64::new(0),
            hostname: hostname.to_owned(),
            pid: std::process::id(),
            tx,
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns events on or off (the `enable_events`/`disable_events` broadcasts); says whether
    /// they were on before.
    pub fn set_enabled(&self, on: bool) -> bool {
        self.enabled.swap(on, Ordering::Relaxed)
    }

    /// Advances the Lamport clock for an event or reply sent now.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Merges a clock value received from another node.
    pub fn observe_clock(&self, other: u64) {
        self.clock.fetch_max(other, Ordering::Relaxed);
        self.tick();
    }

    /// The clock's current value.
    pub fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Sends a task event of `kind` (`task-succeeded`...) for task `uuid`, with the fields
    /// `fields` builds (only called when events are on).
    pub fn task(&self, kind: &str, uuid: &str, fields: impl FnOnce(&mut Map<String, Value>)) {
        if !self.enabled() {
            return;
        }
        let mut event = self.common(kind);
        event.insert("uuid".into(), uuid.into());
        fields(&mut event);
        self.send(Outgoing::Task(Value::Object(event)));
    }

    /// Sends a worker event of `kind` (`worker-online`, `worker-heartbeat`, `worker-offline`)
    /// with the worker's `active` and `processed` counts.
    pub fn worker(&self, kind: &str, active: u64, processed: u64) {
        if !self.enabled() {
            return;
        }
        let mut event = self.common(kind);
        event.insert("freq".into(), HEARTBEAT_FREQ.as_secs_f64().into());
        event.insert("active".into(), active.into());
        event.insert("processed".into(), processed.into());
        event.insert("loadavg".into(), load_average().into());
        event.insert("sw_ident".into(), "taskhost".into());
        event.insert("sw_ver".into(), env!("CARGO_PKG_VERSION").into());
        event.insert("sw_sys".into(), std::env::consts::OS.into());
        self.send(Outgoing::Worker(Value::Object(event)));
    }

    fn common(&self, kind: &str) -> Map<String, Value> {
        let mut event = Map::with_capacity(12);
        event.insert("hostname".into(), self.hostname.clone().into());
        event.insert("utcoffset".into(), 0.0.into());
        event.insert("pid".into(), self.pid.into());
        event.insert("clock".into(), self.tick().into());
        event.insert("timestamp".into(), now_s().into());
        event.insert("type".into(), kind.into());
        event
    }

    /// Waits (at most `within`) until the events sent so far are published: before the
    /// process exits, so its worker-offline is not lost.
    pub async fn flush(&self, within: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Outgoing::Flushed(tx)).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }

    fn send(&self, event: Outgoing) {
        if self.tx.try_send(event).is_err() {
            self.metrics.event_dropped();
        }
    }
}

/// Publishes what the dispatcher queues: task events batched into `task.multi` lists, worker
/// events one by one, in the order they were sent.
async fn publish(
    mut conn: ConnectionManager,
    prefix: String,
    hostname: String,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut tasks = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Outgoing::Task(event) => {
                    tasks.push(event);
                    if tasks.len() >= BATCH {
                        flush(&mut conn, &prefix, &hostname, &mut tasks).await;
                    }
                }
                Outgoing::Worker(event) => {
                    flush(&mut conn, &prefix, &hostname, &mut tasks).await;
                    let routing_key = event["type"].as_str().unwrap_or("").replace('-', ".");
                    send(&mut conn, &prefix, &hostname, &routing_key, &event).await;
                }
                Outgoing::Flushed(done) => {
                    flush(&mut conn, &prefix, &hostname, &mut tasks).await;
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        flush(&mut conn, &prefix, &hostname, &mut tasks).await;
    }
}

async fn flush(conn: &mut ConnectionManager, prefix: &str, hostname: &str, tasks: &mut Vec<Value>) {
    if tasks.is_empty() {
        return;
    }
    let batch = Value::Array(std::mem::take(tasks));
    send(conn, prefix, hostname, "task.multi", &batch).await;
}

async fn send(
    conn: &mut ConnectionManager,
    prefix: &str,
    hostname: &str,
    routing_key: &str,
    body: &Value,
) {
    let envelope = crate::protocol::transient_envelope(
        &body.to_string(),
        json!({"hostname": hostname}),
        "celeryev",
        routing_key,
    );
    let published: Result<i64, _> = redis::cmd("PUBLISH")
        .arg(format!("{prefix}{routing_key}"))
        .arg(envelope)
        .query_async(conn)
        .await;
    if let Err(e) = published {
        tracing::debug!("cannot publish a Celery event: {e}");
    }
}

/// Seconds since the Unix epoch, as Celery's event timestamps.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
