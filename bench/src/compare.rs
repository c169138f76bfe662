//! Two ways of running the worker side by side: the same `demo.add` drains, alternating between
//! them round by round so that both meet the same machine, with the worker's CPU per task.
//! `--baseline` sets this build beside an earlier one (did a change make it slower?);
//! `--tracing-cost` sets tracing off beside every task traced and exported.

use crate::measure;
use crate::options::Options;
use crate::report::{Figure, Section};
use crate::workers::{Running, Stage};
use crate::workload;
use std::path::Path;
use taskhost_tests::bench::{cores, load_average};

/// One way of running the worker: its label, and how to start it at a concurrency.
type Variant<'a> = (&'a str, Box<dyn Fn(&Stage, usize) -> Running + 'a>);

pub fn compare(options: &Options, baseline: &Path) {
    assert!(
        baseline.is_file(),
        "--baseline {} is not a file",
        baseline.display()
    );
    let current = taskhost_tests::taskhost_bin();
    println!("baseline: {}", baseline.display());
    println!("this build: {}", current.display());
    let variants: [Variant; 2] = [
        (
            "baseline",
            Box::new(|stage, c| stage.start_build(baseline, c)),
        ),
        (
            "this build",
            Box::new(|stage, c| stage.start_build(&current, c)),
        ),
    ];
    side_by_side(options, "--baseline", &variants);
}

/// Tracing off beside every task traced (a `run/<task>` span per task, exported over OTLP/HTTP
/// to a collector in this process that takes every batch) and beside a collector that is down
/// (every export refused: spans dropped, and the worker's CPU per task should not grow).
pub fn tracing_cost(options: &Options) {
    let collector = taskhost_tests::HttpStub::start(|_| {
        taskhost_tests::Reply::json(200, serde_json::json!({}))
    });
    let dir = taskhost_tests::TestDir::new("bench-tracing");
    let off = dir.write("off.toml", "");
    let on = dir.write(
        "on.toml",
        &format!(
            "[tracing]\nendpoint = \"{}\"\nsampler = \"always_on\"\n",
            collector.url()
        ),
    );
    // A collector that is down: nothing listens on this port, so every export fails.
    let down = dir.write(
        "down.toml",
        &format!(
            "[tracing]\nendpoint = \"http://127.0.0.1:{}\"\nsampler = \"always_on\"\n",
            taskhost_tests::free_port()
        ),
    );
    let variants: [Variant; 3] = [
        (
            "tracing off",
            Box::new(|stage, c| stage.start_configured(c, &off)),
        ),
        (
            "every task traced",
            Box::new(|stage, c| stage.start_configured(c, &on)),
        ),
        (
            "collector down",
            Box::new(|stage, c| stage.start_configured(c, &down)),
        ),
    ];
    side_by_side(options, "--tracing-cost", &variants);
    let batches = collector.requests().len();
    println!("the collector took {batches} OTLP batches");
    assert!(
        batches > 0,
        "no span reached the collector: tracing was not on"
    );
}

/// Drains `demo.add` with each variant, alternately, at each `--concurrency`, `--repeat`
/// rounds; prints both and their ratio to the first.
fn side_by_side(options: &Options, what: &str, variants: &[Variant]) {
    println!(
        "taskhost-bench {what}: {} demo.add per drain, {} round(s), alternating; {} cores; load average {}",
        options.tasks,
        options.repeat,
        cores(),
        load_average()
    );
    let stage = Stage::new();
    let add = workload::all(options.tasks)
        .into_iter()
        .next()
        .expect("the demo.add workload");
    let first = variants.first().map_or("", |(label, _)| *label);
    let versus = format!("vs {first}");
    let mut throughput = Section::new("drain demo.add", "tasks/s", &[versus.as_str()]);
    let mut cpu = Section::new("worker CPU per task", "µs", &[versus.as_str()]);
    for concurrency in &options.concurrency {
        // Per variant: tasks/s and CPU µs per task of each round.
        let mut rates = vec![Vec::new(); variants.len()];
        let mut cpus = vec![Vec::new(); variants.len()];
        for round in 0..options.repeat {
            for (i, (label, start)) in variants.iter().enumerate() {
                eprintln!("bench: {label} -c {concurrency}, round {} ...", round + 1);
                stage.flush();
                let running = start(&stage, *concurrency);
                let drain = measure::drain(&stage, &running, &add);
                rates[i].push(drain.tasks_per_s);
                cpus[i].push(drain.cpu_us_per_task);
                running.stop();
            }
        }
        let figures = |values: &[Vec<f64>]| -> Vec<Figure> {
            variants
                .iter()
                .zip(values)
                .map(|((label, _), v)| Figure::new(format!("{label} -c {concurrency}"), v.clone()))
                .collect()
        };
        for (section, figures) in [
            (&mut throughput, figures(&rates)),
            (&mut cpu, figures(&cpus)),
        ] {
            let base = figures[0].median();
            for figure in figures {
                let ratio = format!("{:.2}x", figure.median() / base);
                section.row(figure, vec![ratio]);
            }
        }
    }
    throughput.print();
    cpu.print();
}
