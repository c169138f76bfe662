//! `taskhost-bench`: taskhost beside a real Celery 5.7 worker, one private `redis-server`, one
//! producer, the very same protocol-v2 messages; prints a table of figures with their ratios.
//! `bench/run` is the documented way to run it (it builds the plugins and sets up Python).

mod bare;
mod ceiling;
mod chart;
mod compare;
mod echo;
mod edit;
mod idle;
mod measure;
mod options;
mod report;
mod run;
mod workers;
mod workload;

use clap::Parser as _;

fn main() {
    let options = options::Options::parse();
    if let [broker, backend] = options.echo_worker.as_slice() {
        echo::serve(broker, backend);
    }
    if options.edit_to_result {
        return edit::edit_to_result(&options);
    }
    if !options.idle_plugins.is_empty() {
        return idle::idle_plugins(&options);
    }
    if options.tracing_cost {
        return compare::tracing_cost(&options.effective());
    }
    match &options.baseline {
        Some(baseline) => compare::compare(&options.effective(), baseline),
        None => run::run(&options),
    }
}
