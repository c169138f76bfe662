//! Finished spans on their way to the collector: a bounded queue the task path only ever
//! offers to, and one thread that sends them in batches, woken once per batch. A collector that is down or slow
//! costs spans (dropped and counted), never a task's time: the task path does not wait, and
//! the thread waits at most the export timeout per batch.
//!
//! The SDK has a batch processor of its own; this one exists because its drop count is
//! private, and an operator must see spans being lost (`/metrics`).

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::tracing::Batching;

/// What became of the spans this worker finished.
#[derive(Debug, Default)]
pub struct SpanCounts {
    exported: AtomicU64,
    /// Dropped because the queue was full (the collector fell behind).
    queue_full: AtomicU64,
    /// Dropped because their export failed (the collector down, or refusing them).
    export_failed: AtomicU64,
    /// A plugin's spans the host refused (another trace, never started, over the count).
    refused: AtomicU64,
}

/// A reading of [`SpanCounts`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpanTotals {
    pub exported: u64,
    pub queue_full: u64,
    pub export_failed: u64,
    pub refused: u64,
}

impl SpanCounts {
    pub fn totals(&self) -> SpanTotals {
        SpanTotals {
            exported: self.exported.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            export_failed: self.export_failed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Counts a plugin's span the host refused.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the task path and the export thread share: the queue, and what the thread is asked.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<State>,
    /// Woken when a batch is full, or the thread is asked to flush or stop.
    wake: Condvar,
    /// Woken when the thread has done a flush or stop it was asked for.
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    spans: Vec<SpanData>,
    /// Flushes asked for and flushes done: a flush is done once `flushed` reaches its number.
    asked: u64,
    flushed: u64,
    stop: bool,
}

/// The processor the tracer provider ends its spans into. The task path only takes a lock to
/// push a span, and wakes the export thread once per full batch, not per span.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: Arc<Queue>,
    batching: Batching,
    counts: Arc<SpanCounts>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Batcher {
    /// Starts the export thread sending through `exporter`, batching as `batching` says.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        batching: Batching,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(Queue::default());
        let counts = Arc::new(SpanCounts::default());
        let thread = std::thread::Builder::new()
            .name("taskhost-spans".into())
            .spawn({
                let (queue, counts) = (queue.clone(), counts.clone());
                move || export_loop(&exporter, &queue, &counts, batching)
            })?;
        Ok(Self {
            queue,
            batching,
            counts,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn counts(&self) -> Arc<SpanCounts> {
        self.counts.clone()
    }

    /// Offers a finished span to the queue; a full queue drops it (counted).
    pub fn offer(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let mut state = crate::lock(&self.queue.state);
        if state.stop || state.spans.len() >= self.batching.queue {
            drop(state);
            self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.spans.push(span);
        let full = state.spans.len() == self.batching.batch;
        drop(state);
        if full {
            self.queue.wake.notify_one();
        }
    }

    /// Asks the thread to export what is queued (and to stop, with `stop`), waiting at most
    /// `within` for it.
    fn ask(&self, stop: bool, within: Duration) -> OTelSdkResult {
        let mut state = crate::lock(&self.queue.state);
        if state.stop {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        state.asked += 1;
        state.stop = stop;
        let mine = state.asked;
        self.queue.wake.notify_one();
        let (state, waited) = self
            .queue
            .done
            .wait_timeout_while(state, within, |s| s.flushed < mine)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(state);
        if waited.timed_out() {
            return Err(OTelSdkError::Timeout(within));
        }
        Ok(())
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.offer(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(false, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let asked = self.ask(true, timeout);
        if asked.is_ok()
            && let Some(thread) = crate::lock(&self.thread).take()
        {
            let _ = thread.join();
        }
        asked
    }
}

/// The export thread: sleeps until a batch is full, the delay is up, or it is asked; takes
/// what is queued and exports it in batches, outside the lock.
fn export_loop<E: SpanExporter>(
    exporter: &E,
    queue: &Queue,
    counts: &SpanCounts,
    batching: Batching,
) {
    loop {
        let state = crate::lock(&queue.state);
        let (mut state, _) = queue
            .wake
            .wait_timeout_while(state, batching.delay, |s| {
                s.spans.len() < batching.batch && s.asked == s.flushed && !s.stop
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let spans = std::mem::take(&mut state.spans);
        let (asked, stop) = (state.asked, state.stop);
        drop(state);
        let mut spans = spans.into_iter().peekable();
        while spans.peek().is_some() {
            let mut batch: Vec<SpanData> = spans.by_ref().take(batching.batch).collect();
            send(exporter, &mut batch, counts);
        }
        if stop {
            let _ = exporter.shutdown();
        }
        let mut state = crate::lock(&queue.state);
        if state.flushed < asked {
            state.flushed = asked;
            queue.done.notify_all();
        }
        drop(state);
        if stop {
            return;
        }
    }
}

/// Exports `batch` (emptying it), counting its spans as exported or lost.
fn send<E: SpanExporter>(exporter: &E, batch: &mut Vec<SpanData>, counts: &SpanCounts) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match futures_executor::block_on(exporter.export(spans)) {
        Ok(()) => {
            counts.exported.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            // One line per failed batch: a down collector makes them at most one per export
            // timeout.
            counts.export_failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!("{n} spans lost: the OTLP export failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCHING: Batching = Batching {
        delay: Duration::from_secs(5),
        queue: 2048,
        batch: 512,
    };

    /// An exporter that keeps what it is sent.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            crate::lock(&self.0).extend(batch);
            Ok(())
        }
    }

    fn span(sampled: bool) -> SpanData {
        use opentelemetry::trace::{
            SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState,
        };
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(2),
                flags,
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "s".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[test]
    fn a_flush_exports_what_was_offered_and_counts_it() {
        let exporter = Kept::default();
        let batcher = Batcher::start(exporter.clone(), BATCHING).expect("thread");
        batcher.offer(span(true));
        batcher.offer(span(false));
        batcher.force_flush().expect("flushed");
        assert_eq!(crate::lock(&exporter.0).len(), 1);
        assert_eq!(
            batcher.counts().totals().exported,
            1,
            "the unsampled span is not sent"
        );
        batcher.shutdown().expect("stopped");
    }

    /// An exporter that fails every export after holding it, as a collector that is down and
    /// lets the connection hang until the timeout.
    #[derive(Debug)]
    struct Down(Mutex<std::sync::mpsc::Receiver<()>>);

    impl SpanExporter for Down {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            let _ = crate::lock(&self.0).recv_timeout(Duration::from_secs(5));
            Err(OTelSdkError::InternalFailure("collector down".into()))
        }
    }

    #[test]
    fn a_collector_that_is_down_costs_spans_never_the_caller_and_they_are_counted() {
        use std::time::Instant;
        let (release, hold) = std::sync::mpsc::channel();
        let batcher = Batcher::start(Down(Mutex::new(hold)), BATCHING).expect("thread");
        let offered = (BATCHING.queue + BATCHING.batch) as u64 * 2;
        let started = Instant::now();
        for _ in 0..offered {
            batcher.offer(span(true));
        }
        // Never waits on the export: the whole offer loop is quicker than one held export.
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(release);
        batcher.force_flush().expect("flushed");
        let totals = batcher.counts().totals();
        assert_eq!(totals.exported, 0);
        assert!(totals.queue_full > 0, "{totals:?}");
        assert_eq!(
            totals.queue_full + totals.export_failed,
            offered,
            "{totals:?}"
        );
        batcher.shutdown().expect("stopped");
    }
}
