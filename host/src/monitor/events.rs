//! Sending Celery's monitoring events (`celery worker -E`) as Flower and `celery events` read
//! them: when, to whom, and at what cost. What each event holds is `protocol::event`'s.
//!
//! Events are off unless the operator turns them on (`-E`) or a monitor asks for them (the
//! `enable_events` broadcast Flower sends); off, the task path pays one atomic load. Task
//! events are batched into one `task.multi` list per flush, as Celery's dispatcher does, by a
//! publisher task behind a bounded channel: a Redis that cannot keep up loses events (counted
//! in the metrics), never slows or stops a task.

use super::metrics::Metrics;
use crate::clock::now_s;
use crate::protocol::event::{Stamp, TaskEvent, WorkerEvent, event_message, routing_key};
use crate::redis::events::EventChannels;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

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
    Worker(WorkerEvent, Value),
    /// Answered once everything sent before it is published.
    Flushed(tokio::sync::oneshot::Sender<()>),
}

impl Events {
    /// Starts the publisher on `channels`.
    pub fn start(
        channels: EventChannels,
        hostname: &str,
        enabled: bool,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(publish(channels, hostname.to_owned(), rx));
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
        // Saturating: a producer's clock of u64::MAX is merged in as it is.
        let before = self
            .clock
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_add(1))
            })
            .unwrap_or_else(|c| c);
        before.saturating_add(1)
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

    /// Sends `event` for task `uuid` (its fields are only built when events are on).
    pub fn task(&self, uuid: &str, event: TaskEvent<'_>) {
        if !self.enabled() {
            return;
        }
        let body = self.stamp().task(uuid, &event);
        self.send(Outgoing::Task(body));
    }

    /// Sends a worker event with the worker's `active` and `processed` counts.
    pub fn worker(&self, event: WorkerEvent, active: u64, processed: u64) {
        if !self.enabled() {
            return;
        }
        let body = self
            .stamp()
            .worker(event, active, processed, &load_average());
        self.send(Outgoing::Worker(event, body));
    }

    fn stamp(&self) -> Stamp<'_> {
        Stamp {
            hostname: &self.hostname,
            pid: self.pid,
            clock: self.tick(),
            timestamp: now_s(),
        }
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
async fn publish(mut channels: EventChannels, hostname: String, mut rx: mpsc::Receiver<Outgoing>) {
    let mut tasks = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Outgoing::Task(event) => {
                    tasks.push(event);
                    if tasks.len() >= BATCH {
                        flush(&mut channels, &hostname, &mut tasks).await;
                    }
                }
                Outgoing::Worker(kind, event) => {
                    flush(&mut channels, &hostname, &mut tasks).await;
                    send(&mut channels, &hostname, &routing_key(Some(kind)), &event).await;
                }
                Outgoing::Flushed(done) => {
                    flush(&mut channels, &hostname, &mut tasks).await;
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        flush(&mut channels, &hostname, &mut tasks).await;
    }
}

async fn flush(channels: &mut EventChannels, hostname: &str, tasks: &mut Vec<Value>) {
    if tasks.is_empty() {
        return;
    }
    let batch = Value::Array(std::mem::take(tasks));
    send(channels, hostname, &routing_key(None), &batch).await;
}

async fn send(channels: &mut EventChannels, hostname: &str, routing_key: &str, body: &Value) {
    let message = event_message(hostname, routing_key, body);
    if let Err(e) = channels.publish(routing_key, message).await {
        tracing::debug!("cannot publish a Celery event: {e}");
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> Vec<f64> {
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
