//! Finished spans on their way to the collector: a bounded queue the task path only ever
//! offers to, and one thread that sends them in batches. A collector that is down or slow
//! costs spans (dropped and counted), never a task's time: the task path does not wait, and
//! the thread waits at most the export timeout per batch.
//!
//! The SDK has a batch processor of its own; this one exists because its drop count is
//! private, and an operator must see spans being lost (`/metrics`).

use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

enum Message {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
    /// Export what is queued, shut the exporter down, answer, and end.
    Stop(mpsc::Sender<()>),
}

/// The processor the tracer provider ends its spans into.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: SyncSender<Message>,
    counts: Arc<SpanCounts>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Message")
    }
}

impl Batcher {
    /// Starts the export thread sending through `exporter`, batching as `batching` says.
    pub fn start<E: SpanExporter + 'static>(
        exporter: E,
        batching: Batching,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(batching.queue);
        let counts = Arc::new(SpanCounts::default());
        let thread = std::thread::Builder::new()
            .name("taskhost-spans".into())
            .spawn({
                let counts = counts.clone();
                move || export_loop(&exporter, &rx, &counts, batching)
            })?;
        Ok(Self {
            tx,
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
        match self.tx.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends `make(answer)` and waits at most `within` for the answer.
    fn ask(&self, make: fn(mpsc::Sender<()>) -> Message, within: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::channel();
        let deadline = Instant::now() + within;
        let mut message = make(done);
        // The queue may be full of spans: wait for room as long as `within` allows.
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => return Err(OTelSdkError::Timeout(within)),
            }
        }
        answered
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(within))
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.offer(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Message::Flush, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let asked = self.ask(Message::Stop, timeout);
        if asked.is_ok()
            && let Some(thread) = crate::lock(&self.thread).take()
        {
            let _ = thread.join();
        }
        asked
    }
}

fn export_loop<E: SpanExporter>(
    exporter: &E,
    rx: &mpsc::Receiver<Message>,
    counts: &SpanCounts,
    batching: Batching,
) {
    let Batching {
        delay, batch: most, ..
    } = batching;
    let mut batch: Vec<SpanData> = Vec::with_capacity(most);
    let mut due = Instant::now() + delay;
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= most {
                    send(exporter, &mut batch, counts);
                    due = Instant::now() + delay;
                }
            }
            Ok(Message::Flush(done)) => {
                send(exporter, &mut batch, counts);
                let _ = done.send(());
            }
            Ok(Message::Stop(done)) => {
                send(exporter, &mut batch, counts);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                send(exporter, &mut batch, counts);
                due = Instant::now() + delay;
            }
            Err(RecvTimeoutError::Disconnected) => {
                send(exporter, &mut batch, counts);
                return;
            }
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
