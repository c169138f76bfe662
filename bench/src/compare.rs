//! This build beside an earlier one (`--baseline`): the same `demo.add` drains, alternating
//! between the two builds round by round so that both meet the same machine, with the worker's
//! CPU per task. Shows whether a change made the worker slower.

use crate::measure;
use crate::options::Options;
use crate::report::{Figure, Section};
use crate::workers::Stage;
use crate::workload;
use std::path::Path;
use taskhost_tests::bench::{cores, load_average};

pub fn compare(options: &Options, baseline: &Path) {
    assert!(
        baseline.is_file(),
        "--baseline {} is not a file",
        baseline.display()
    );
    let current = taskhost_tests::taskhost_bin();
    println!(
        "taskhost-bench --baseline: {} demo.add per drain, {} round(s), builds alternating; {} cores; load average {}",
        options.tasks,
        options.repeat,
        cores(),
        load_average()
    );
    println!("baseline: {}", baseline.display());
    println!("this build: {}", current.display());
    let stage = Stage::new();
    let add = workload::all(options.tasks)
        .into_iter()
        .next()
        .expect("the demo.add workload");
    let builds = [("baseline", baseline), ("this build", current.as_path())];
    let mut throughput = Section::new("drain demo.add", "tasks/s", &["vs baseline"]);
    let mut cpu = Section::new("worker CPU per task", "µs", &["vs baseline"]);
    for concurrency in &options.concurrency {
        // Per build: tasks/s and CPU µs per task of each round.
        let mut rates: [Vec<f64>; 2] = Default::default();
        let mut cpus: [Vec<f64>; 2] = Default::default();
        for round in 0..options.repeat {
            for (i, (label, binary)) in builds.iter().enumerate() {
                eprintln!("bench: {label} -c {concurrency}, round {} ...", round + 1);
                stage.flush();
                let running = stage.start_build(binary, *concurrency);
                let drain = measure::drain(&stage, &running, &add);
                rates[i].push(drain.tasks_per_s);
                cpus[i].push(drain.cpu_us_per_task);
                running.stop();
            }
        }
        let figures = |values: &[Vec<f64>; 2]| -> Vec<Figure> {
            builds
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
