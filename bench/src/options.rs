//! What the bench measures and how hard.

use clap::Parser;

/// taskhost beside a real Celery 5.7 worker on one private Redis: drain throughput, latency at
/// fixed rates, memory, start time, scaling, and the Redis ceiling; each figure repeated.
#[derive(Debug, Clone, Parser)]
#[command(name = "taskhost-bench")]
pub struct Options {
    /// Tasks pre-loaded for each drain.
    #[arg(long, default_value_t = 5_000)]
    pub tasks: usize,
    /// Times each figure is measured (the table shows min / median / max).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Seconds each fixed-rate latency run sends for.
    #[arg(long, default_value_t = 3.0)]
    pub latency_seconds: f64,
    /// The fixed offered rates, tasks/s.
    #[arg(long, value_delimiter = ',', default_values_t = [200.0, 2000.0])]
    pub rates: Vec<f64>,
    /// taskhost concurrencies for the drain runs.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 16])]
    pub concurrency: Vec<usize>,
    /// Plugin languages beside Rust: their templates (`demo.add`, `demo.progress`) drained and
    /// timed as the Rust demo plugin is, fresh instances and reused.
    #[arg(long, value_delimiter = ',', default_values_t = [crate::workers::Lang::Python, crate::workers::Lang::Js])]
    pub languages: Vec<crate::workers::Lang>,
    /// taskhost concurrencies for the language plugins' runs.
    #[arg(long, value_delimiter = ',', default_values_t = [16])]
    pub language_concurrency: Vec<usize>,
    /// Numbers of taskhost worker processes for the scaling runs.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4, 8])]
    pub processes: Vec<usize>,
    /// Leave Celery out (taskhost and the ceiling only).
    #[arg(long)]
    pub no_celery: bool,
    /// A quick run that only shows the bench works: few tasks, one repeat, short latency runs.
    #[arg(long)]
    pub smoke: bool,
    /// Instead of the whole bench: drain `demo.add` with this earlier `taskhost` binary and
    /// with this build, alternately, at each `--concurrency`, `--repeat` rounds; prints both
    /// and their ratio (to show a change made nothing slower).
    #[arg(long, value_name = "TASKHOST_BINARY")]
    pub baseline: Option<std::path::PathBuf>,
    /// Instead of the whole bench: drain `demo.add` with tracing off, with every task traced
    /// and exported (to a collector in the bench), and with the collector down, alternately,
    /// at each `--concurrency`, `--repeat` rounds; prints them and their ratios.
    #[arg(long)]
    pub tracing_cost: bool,
    /// Instead of the whole bench: how long after a save `taskhost dev --watch` serves the new
    /// version of each `--languages` template (`--repeat` edits, after a first that fills the
    /// caches).
    #[arg(long)]
    pub edit_to_result: bool,
    /// Instead of the whole bench: the memory of one idle worker holding each of these numbers
    /// of distinct Python plugins (built once and kept in the target directory), and one such
    /// plugin's cold compile.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub idle_plugins: Vec<usize>,
    /// Where to write the charts (SVG) [default: bench.svg in the target directory].
    #[arg(long, value_name = "PATH")]
    pub svg: Option<std::path::PathBuf>,
    /// Run as the native echo worker on BROKER and BACKEND (the bench starts it itself).
    #[arg(long, num_args = 2, value_names = ["BROKER", "BACKEND"], hide = true)]
    pub echo_worker: Vec<String>,
}

impl Options {
    /// The options with `--smoke` applied.
    pub fn effective(&self) -> Self {
        if !self.smoke {
            return self.clone();
        }
        Self {
            tasks: self.tasks.min(40),
            repeat: 1,
            latency_seconds: 0.3,
            rates: vec![50.0],
            concurrency: vec![1, 4],
            processes: vec![1, 2],
            // Building the language templates takes minutes: a smoke run shows the rest works.
            languages: Vec::new(),
            ..self.clone()
        }
    }
}
