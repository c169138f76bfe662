//! Per-task resource accounting: the memory and table limiter (which remembers that it said
//! no, so a trap after a refused allocation is reported as `MemoryLimitExceeded`), the budget
//! of log lines a task may write, and the fixed bounds on what else a plugin makes the host
//! hold: WASI resources, HTTP header fields, requests in flight, and the text of its errors.

use wasmtime::ResourceLimiter;

/// Limits linear memory and tables of one store, and records refusals. The memory limit is
/// over all of the store's memories together: a component with two memories gets the limit
/// once, not twice.
pub struct Limiter {
    memory_bytes: usize,
    /// Bytes of every memory of the store, as last grown.
    memory_used: usize,
    table_elements: usize,
    /// A memory growth was refused (or failed): the guest hit its memory limit.
    pub memory_denied: bool,
}

impl Limiter {
    pub fn new(memory_bytes: usize, table_elements: u32) -> Self {
        Self {
            memory_bytes,
            memory_used: 0,
            table_elements: usize::try_from(table_elements).unwrap_or(usize::MAX),
            memory_denied: false,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Memories are created (from 0) and grown through here, and never shrink.
        let total = self
            .memory_used
            .saturating_sub(current)
            .saturating_add(desired);
        let allowed = total <= self.memory_bytes;
        if allowed {
            self.memory_used = total;
        }
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_denied = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }
}

/// Resources (streams, pollables, HTTP fields, requests, ...) one task may hold at once:
/// wasmtime's default is 1,000,000.
pub const MAX_RESOURCES: usize = 1_000;
/// Bytes one HTTP fields resource (a request's headers, say) may hold, as wasmtime counts
/// them: wasmtime's default is 128 KiB; proxies take 8 KiB of headers.
pub const FIELD_BYTES: usize = 16 * 1024;
/// Outgoing HTTP requests one task may have in flight; more fail at once with
/// `connection-limit-reached`.
pub const MAX_CONCURRENT_REQUESTS: usize = 8;
/// The longest error kind a plugin may report, bytes.
pub const ERROR_KIND_BYTES: usize = 128;
/// The longest error message (and retry or reject reason), bytes.
pub const ERROR_MESSAGE_BYTES: usize = 64 * 1024;
/// The longest traceback, bytes.
pub const TRACEBACK_BYTES: usize = 256 * 1024;

/// `text` cut to at most `max` bytes (at a character boundary), saying how long it was.
pub fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}… ({} bytes)", &text[..at], text.len()).into()
}

/// Log lines (from the log import and from stdout/stderr) one task may write.
pub const LOG_LINES_PER_TASK: usize = 200;
/// Longest log line kept, bytes; longer ones are cut.
pub const LOG_LINE_BYTES: usize = 4096;

/// What is left of a task's log budget.
pub struct LogBudget {
    left: usize,
    /// Lines not logged because the budget ran out.
    pub dropped: usize,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self {
            left: LOG_LINES_PER_TASK,
            dropped: 0,
        }
    }
}

impl LogBudget {
    /// Takes one line from the budget: the line cut to [`LOG_LINE_BYTES`], its control
    /// characters escaped, or none when the budget is spent.
    pub fn take<'a>(&mut self, line: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        if self.left == 0 {
            self.dropped += 1;
            return None;
        }
        self.left -= 1;
        match cut(line, LOG_LINE_BYTES) {
            std::borrow::Cow::Borrowed(line) => Some(escape_controls(line)),
            std::borrow::Cow::Owned(cut) => Some(escape_controls(&cut).into_owned().into()),
        }
    }
}

/// `line` with newlines and other control characters written as escapes (`\n`, `\u{1b}`),
/// so a plugin's text stays one line of the worker's log in every format: it cannot forge a
/// line of its own or move a terminal's cursor.
fn escape_controls(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.chars().any(char::is_control) {
        return line.into();
    }
    let mut escaped = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() => escaped.extend(c.escape_unicode()),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_cuts_long_lines_and_counts_what_it_drops() {
        let mut budget = LogBudget::default();
        let long = "é".repeat(LOG_LINE_BYTES);
        let kept = budget.take(&long).expect("first line kept");
        assert!(kept.len() < long.len() && kept.ends_with("bytes)"));
        for _ in 1..LOG_LINES_PER_TASK {
            assert!(budget.take("x").is_some());
        }
        assert!(budget.take("over").is_none());
        assert_eq!(budget.dropped, 1);
    }

    #[test]
    fn a_plugins_line_cannot_forge_another_or_move_the_cursor() {
        let mut budget = LogBudget::default();
        let forged = "done\n2026-12-02T00:00:00Z  INFO taskhost::worker: task succeeded\r\x1b[2K";
        let kept = budget.take(forged).expect("kept");
        assert!(!kept.contains('\n') && !kept.contains('\r') && !kept.contains('\x1b'));
        assert_eq!(
            kept,
            "done\\n2026-12-02T00:00:00Z  INFO taskhost::worker: task succeeded\\r\\u{1b}[2K"
        );
        assert_eq!(budget.take("plain line").as_deref(), Some("plain line"));
    }

    #[test]
    fn the_limiter_remembers_a_refused_growth() {
        let mut limiter = Limiter::new(1 << 20, 10);
        assert!(limiter.memory_growing(0, 1 << 20, None).unwrap_or(false));
        assert!(!limiter.memory_denied);
        assert!(!limiter.memory_growing(0, 2 << 20, None).unwrap_or(true));
        assert!(limiter.memory_denied);
        assert!(!limiter.table_growing(0, 11, None).unwrap_or(true));
    }

    #[test]
    fn the_memory_limit_is_over_all_memories_together() {
        let mut limiter = Limiter::new(1 << 20, 10);
        let kib = 1 << 10;
        assert!(limiter.memory_growing(0, 600 * kib, None).unwrap_or(false));
        assert!(
            !limiter.memory_growing(0, 600 * kib, None).unwrap_or(true),
            "a second memory"
        );
        assert!(
            limiter
                .memory_growing(600 * kib, 1 << 20, None)
                .unwrap_or(false),
            "the first grows"
        );
    }
}
