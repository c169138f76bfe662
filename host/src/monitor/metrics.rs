//! The worker's Prometheus metrics: counters and histograms the task path updates, and the
//! text exposition format (version 0.0.4) `/metrics` serves. Gauges whose truth lives
//! elsewhere (queue depths in Redis, plugins loaded, tasks running) are not kept here: the
//! endpoint reads them at scrape time and passes them to [`Metrics::render`].
//!
//! Names follow Prometheus' conventions: a `taskhost_` prefix, base units (seconds), `_total`
//! on counters, `_info` on a constant 1 carrying labels.

use crate::lock;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

/// Upper bounds of the runtime histogram's buckets, seconds: from the sub-millisecond tasks
/// the sandbox runs hot to the minutes a time limit allows.
pub const RUNTIME_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];

/// How a task ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(usize)]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    Retried,
    Revoked,
    /// Refused without running: undecodable, unregistered, or rejected by its plugin; the
    /// message went to the dead-letter list.
    Rejected,
}

impl TaskOutcome {
    const ALL: [Self; 5] = [
        Self::Succeeded,
        Self::Failed,
        Self::Retried,
        Self::Revoked,
        Self::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Retried => "retried",
            Self::Revoked => "revoked",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Per bucket, observations at or below its bound (not cumulative; summed when rendered).
    buckets: [u64; RUNTIME_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// One task name's counts.
#[derive(Debug, Clone, Default)]
struct PerTask {
    /// By [`TaskOutcome`] as index.
    outcomes: [u64; TaskOutcome::ALL.len()],
    runtime: Histogram,
}

#[derive(Debug, Default)]
struct Counts {
    /// Looked up by `&str`, so counting a known task allocates nothing.
    tasks: HashMap<String, PerTask>,
    limit_hits: BTreeMap<(String, &'static str), u64>,
    dead_lettered: u64,
    events_dropped: u64,
    settles_skipped: u64,
}

/// What the task path counts.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: Mutex<Counts>,
}

/// Values read at scrape time, for [`Metrics::render`].
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Messages waiting per queue (all priority buckets).
    pub queue_lengths: Vec<(String, u64)>,
    /// Messages waiting for their eta in the delayed set (all queues).
    pub delayed: Option<u64>,
    /// Entries in the dead-letter list.
    pub dead_letter_length: Option<u64>,
    pub running: u64,
    /// Fetched and not started.
    pub reserved: u64,
    pub concurrency: u64,
    /// (plugin, version, wit version) loaded.
    pub plugins: Vec<(String, String, String)>,
    pub reloads: u64,
    pub reload_failures: u64,
    /// Instances the sandbox made, and instances it recycled for another task.
    pub instances_made: u64,
    pub instances_recycled: u64,
    pub healthy: bool,
    pub uptime_seconds: f64,
    /// With tracing on: what became of the spans.
    pub spans: Option<crate::telemetry::export::SpanTotals>,
}

impl Metrics {
    /// Counts a task's outcome (and its runtime, if it ran).
    pub fn task(&self, task: &str, outcome: TaskOutcome, runtime_s: Option<f64>) {
        let mut counts = lock(&self.counts);
        if !counts.tasks.contains_key(task) {
            counts.tasks.insert(task.to_owned(), PerTask::default());
        }
        let Some(per_task) = counts.tasks.get_mut(task) else {
            return;
        };
        per_task.outcomes[outcome as usize] += 1;
        if let Some(runtime) = runtime_s {
            let histogram = &mut per_task.runtime;
            histogram.count += 1;
            histogram.sum += runtime;
            if let Some(i) = RUNTIME_BUCKETS.iter().position(|bound| runtime <= *bound) {
                histogram.buckets[i] += 1;
            }
        }
    }

    /// Counts a task stopped by a sandbox limit (`time`, `memory`, `stack`, `result_size`), or a task that found the instance pool full (`pool`).
    pub fn limit_hit(&self, plugin: &str, limit: &'static str) {
        *lock(&self.counts)
            .limit_hits
            .entry((plugin.to_owned(), limit))
            .or_default() += 1;
    }

    /// Counts a message this worker moved to the dead-letter list.
    pub fn dead_lettered(&self) {
        lock(&self.counts).dead_lettered += 1;
    }

    /// Counts a message this worker finished but found no longer in flight, so nothing moved.
    pub fn settle_skipped(&self) {
        lock(&self.counts).settles_skipped += 1;
    }

    /// Counts a Celery event dropped because the event publisher fell behind.
    pub fn event_dropped(&self) {
        lock(&self.counts).events_dropped += 1;
    }

    /// Tasks finished per task name, every outcome (Celery's `stats.total`).
    pub fn totals(&self) -> BTreeMap<String, u64> {
        lock(&self.counts)
            .tasks
            .iter()
            .map(|(task, counts)| (task.clone(), counts.outcomes.iter().sum()))
            .collect()
    }

    /// The exposition text: these counts and `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = Text::default();
        {
            let counts = lock(&self.counts);
            render_tasks(&mut out, &counts);
            render_counters(&mut out, &counts);
        }
        render_snapshot(&mut out, snapshot);
        out.0
    }
}

/// Per task name: outcomes, runtimes, retries.
fn render_tasks(out: &mut Text, counts: &Counts) {
    let tasks: BTreeMap<&String, &PerTask> = counts.tasks.iter().collect();
    out.family(
        "taskhost_tasks_total",
        "counter",
        "Tasks finished by this worker, by task name and outcome.",
    );
    for (task, per_task) in &tasks {
        for outcome in TaskOutcome::ALL {
            let n = per_task.outcomes[outcome as usize];
            if n > 0 {
                out.sample(
                    "taskhost_tasks_total",
                    &[("task", task), ("outcome", outcome.as_str())],
                    n as f64,
                );
            }
        }
    }
    out.family(
        "taskhost_task_runtime_seconds",
        "histogram",
        "Time from a task's start in the sandbox to its outcome.",
    );
    for (task, h) in tasks
        .iter()
        .map(|(task, t)| (task, &t.runtime))
        .filter(|(_, h)| h.count > 0)
    {
        let mut cumulative = 0;
        for (bound, n) in RUNTIME_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            out.sample(
                "taskhost_task_runtime_seconds_bucket",
                &[("task", task), ("le", &format_value(*bound))],
                cumulative as f64,
            );
        }
        out.sample(
            "taskhost_task_runtime_seconds_bucket",
            &[("task", task), ("le", "+Inf")],
            h.count as f64,
        );
        out.sample(
            "taskhost_task_runtime_seconds_sum",
            &[("task", task)],
            h.sum,
        );
        out.sample(
            "taskhost_task_runtime_seconds_count",
            &[("task", task)],
            h.count as f64,
        );
    }
    out.family(
        "taskhost_task_retries_total",
        "counter",
        "Retries scheduled by this worker, by task name.",
    );
    for (task, per_task) in &tasks {
        let n = per_task.outcomes[TaskOutcome::Retried as usize];
        if n > 0 {
            out.sample("taskhost_task_retries_total", &[("task", task)], n as f64);
        }
    }
}

/// The counters not kept per task.
fn render_counters(out: &mut Text, counts: &Counts) {
    out.family(
        "taskhost_sandbox_limit_hits_total",
        "counter",
        "Tasks stopped by a sandbox limit, or postponed for a full instance pool (limit=\"pool\"), by plugin and limit.",
    );
    for ((plugin, limit), n) in &counts.limit_hits {
        out.sample(
            "taskhost_sandbox_limit_hits_total",
            &[("plugin", plugin), ("limit", limit)],
            *n as f64,
        );
    }
    out.single(
        "taskhost_dead_lettered_total",
        "counter",
        "Messages this worker moved to the dead-letter list.",
        counts.dead_lettered as f64,
    );
    out.single(
        "taskhost_events_dropped_total",
        "counter",
        "Celery events dropped because Redis could not take them fast enough.",
        counts.events_dropped as f64,
    );
    out.single(
            "taskhost_settles_skipped_total",
            "counter",
            "Messages this worker finished but found no longer in flight (another worker had returned them): nothing was moved.",
            counts.settles_skipped as f64,
        );
}

/// The values read at scrape time.
fn render_snapshot(out: &mut Text, snapshot: &Snapshot) {
    out.family(
        "taskhost_queue_length",
        "gauge",
        "Messages waiting in a consumed queue, all priorities.",
    );
    for (queue, n) in &snapshot.queue_lengths {
        out.sample("taskhost_queue_length", &[("queue", queue)], *n as f64);
    }
    if let Some(n) = snapshot.delayed {
        out.single(
            "taskhost_delayed_messages",
            "gauge",
            "Messages waiting for their eta or countdown, all queues.",
            n as f64,
        );
    }
    if let Some(n) = snapshot.dead_letter_length {
        out.single(
            "taskhost_dead_letter_length",
            "gauge",
            "Entries in the dead-letter list (all workers).",
            n as f64,
        );
    }
    render_worker(out, snapshot);
    if let Some(spans) = snapshot.spans {
        out.single(
            "taskhost_trace_spans_exported_total",
            "counter",
            "Spans sent to the OTLP collector.",
            spans.exported as f64,
        );
        out.family(
            "taskhost_trace_spans_dropped_total",
            "counter",
            "Spans lost: the export queue was full (reason=\"queue_full\"), the collector did not take them (reason=\"export_failed\"), or a plugin's span was refused (reason=\"refused\"). Tasks are never slowed or lost for them.",
        );
        let reasons = [
            ("queue_full", spans.queue_full),
            ("export_failed", spans.export_failed),
            ("refused", spans.refused),
        ];
        for (reason, n) in reasons {
            out.sample(
                "taskhost_trace_spans_dropped_total",
                &[("reason", reason)],
                n as f64,
            );
        }
    }
}

/// The worker's own gauges: tasks, pool, plugins, health.
fn render_worker(out: &mut Text, snapshot: &Snapshot) {
    out.single(
        "taskhost_tasks_running",
        "gauge",
        "Tasks this worker is handling now.",
        snapshot.running as f64,
    );
    out.single(
        "taskhost_tasks_reserved",
        "gauge",
        "Messages this worker fetched and has not started.",
        snapshot.reserved as f64,
    );
    out.single(
        "taskhost_concurrency",
        "gauge",
        "Tasks this worker may run at once.",
        snapshot.concurrency as f64,
    );
    out.family(
        "taskhost_plugin_info",
        "gauge",
        "Plugins loaded: 1 per plugin, with its version and WIT version.",
    );
    for (plugin, version, wit) in &snapshot.plugins {
        out.sample(
            "taskhost_plugin_info",
            &[("plugin", plugin), ("version", version), ("wit", wit)],
            1.0,
        );
    }
    out.family(
        "taskhost_plugin_reloads_total",
        "counter",
        "Plugin files loaded or swapped in (result=success), or refused (result=failure).",
    );
    out.sample(
        "taskhost_plugin_reloads_total",
        &[("result", "success")],
        snapshot.reloads as f64,
    );
    out.sample(
        "taskhost_plugin_reloads_total",
        &[("result", "failure")],
        snapshot.reload_failures as f64,
    );
    out.family(
        "taskhost_instances_total",
        "counter",
        "Plugin instances made (how=instantiated), and instances put back in their state after \
         instantiation to serve another task as a fresh one would (how=recycled).",
    );
    out.sample(
        "taskhost_instances_total",
        &[("how", "instantiated")],
        snapshot.instances_made as f64,
    );
    out.sample(
        "taskhost_instances_total",
        &[("how", "recycled")],
        snapshot.instances_recycled as f64,
    );
    out.single(
        "taskhost_healthy",
        "gauge",
        "1 while the worker is consuming (connected, fetching, heartbeat fresh).",
        if snapshot.healthy { 1.0 } else { 0.0 },
    );
    out.single(
        "taskhost_uptime_seconds",
        "gauge",
        "Seconds since the worker started.",
        snapshot.uptime_seconds,
    );
}

/// The text format, written line by line.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape_label(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", format_value(value));
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value as the text format quotes it.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_escaped_labels() {
        let metrics = Metrics::default();
        metrics.task("demo.add", TaskOutcome::Succeeded, Some(0.0003));
        metrics.task("demo.add", TaskOutcome::Succeeded, Some(0.2));
        metrics.task("we\"ird\\name\n", TaskOutcome::Failed, Some(500.0));
        let text = metrics.render(&Snapshot::default());
        assert!(text.contains("taskhost_tasks_total{task=\"demo.add\",outcome=\"succeeded\"} 2\n"));
        assert!(text.contains("task=\"we\\\"ird\\\\name\\n\",outcome=\"failed\"} 1\n"));
        assert!(
            text.contains(
                "taskhost_task_runtime_seconds_bucket{task=\"demo.add\",le=\"0.0005\"} 1\n"
            )
        );
        assert!(
            text.contains(
                "taskhost_task_runtime_seconds_bucket{task=\"demo.add\",le=\"0.25\"} 2\n"
            )
        );
        assert!(text.contains("taskhost_task_runtime_seconds_count{task=\"demo.add\"} 2\n"));
        // Beyond the last bound: only in +Inf.
        assert!(text.contains("le=\"120\"} 0\n"));
        assert!(text.contains("le=\"+Inf\"} 1\n"));
        assert_eq!(metrics.totals().get("demo.add"), Some(&2));
    }
}
