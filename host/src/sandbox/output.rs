//! A plugin's stdout and stderr: captured per task, bounded, and turned into log lines tagged
//! with the task, never written to the worker's own streams.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Bytes kept per stream and task; the rest is counted and dropped, never an error to the guest.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

/// One captured output stream.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Buffer>>);

impl Capture {
    /// What was written (up to [`CAPTURE_LIMIT`]) and how many bytes were dropped.
    pub fn take(&self) -> (String, usize) {
        let mut buffer = crate::lock(&self.0);
        let text = String::from_utf8_lossy(&buffer.bytes).into_owned();
        let dropped = buffer.dropped;
        *buffer = Buffer::default();
        (text, dropped)
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut buffer = crate::lock(&self.0);
        let room = CAPTURE_LIMIT.saturating_sub(buffer.bytes.len());
        let kept = room.min(buf.len());
        buffer.bytes.extend_from_slice(&buf[..kept]);
        buffer.dropped += buf.len() - kept;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Logs what the guest printed (within the task's log budget), and returns it for error
/// reports.
pub(super) fn drain(
    store: &mut wasmtime::Store<super::TaskState>,
    plugin: &str,
    task: &str,
    task_id: &str,
) -> (String, String) {
    let state = store.data_mut();
    let (stdout, dropped_out) = state.stdout.take();
    let (stderr, dropped_err) = state.stderr.take();
    let mut budget = crate::lock(&state.log_budget);
    for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(line) = budget.take(line) {
                tracing::info!(
                    target: "taskhost::plugin",
                    plugin = %plugin, task = %task, task_id = %task_id, stream = %stream, "{line}"
                );
            }
        }
    }
    let dropped_lines = budget.dropped;
    drop(budget);
    if dropped_out + dropped_err + dropped_lines > 0 {
        tracing::warn!(
            plugin = %plugin,
            task = %task,
            task_id = %task_id,
            dropped_bytes = dropped_out + dropped_err,
            dropped_lines,
            "plugin output over its budget was dropped ({} bytes per stream, {} lines per task)",
            CAPTURE_LIMIT,
            super::limits::LOG_LINES_PER_TASK
        );
    }
    (stdout, stderr)
}
