//! The whole bench, in one run on one Redis: every contender drains every workload, answers at
//! fixed rates, is weighed idle and under load, and is timed from start to first result; then
//! the Redis ceilings and the scaling over worker processes. Prints the table.

use crate::measure;
use crate::options::Options;
use crate::report::{Figure, Section, number, percent, times};
use crate::workers::{Contender, Memory, Stage};
use crate::workload::{self, Workload};
use std::collections::BTreeMap;
use taskhost_tests::RedisServer;
use taskhost_tests::bench::{cores, load_average};

/// The reference every ratio is taken against.
const REFERENCE: Contender = Contender::CeleryPrefork { concurrency: 2 };
/// taskhost's default concurrency, used for the scaling runs.
const DEFAULT_CONCURRENCY: usize = 4;

/// Seconds each contender is watched idle (at most; a smoke run watches for less).
const IDLE_SECONDS: f64 = 3.0;

pub fn run(options: &Options) {
    let o = options.effective();
    println!(
        "taskhost-bench: {} tasks per drain, {} repeat(s) per figure (min / median / max); {} cores; load average {}",
        o.tasks,
        o.repeat,
        cores(),
        load_average()
    );
    eprintln!("bench: the bare wasmtime loop ...");
    let floor = crate::bare::floor(o.tasks.max(2_000));
    let stage = Stage::new();
    let workloads = workload::all(o.tasks);
    // The floor first: every figure is shown beside it.
    let mut contenders = vec![Contender::Echo];
    if !o.no_celery {
        contenders.push(REFERENCE);
        contenders.push(Contender::CeleryThreads { concurrency: 8 });
    }
    contenders.extend(o.concurrency.iter().map(|c| Contender::taskhost(*c)));
    contenders.extend(
        o.concurrency
            .iter()
            .map(|c| Contender::TaskhostReusing { concurrency: *c }),
    );
    for lang in &o.languages {
        for concurrency in &o.language_concurrency {
            for reuse in [false, true] {
                contenders.push(Contender::Plugin {
                    lang: *lang,
                    concurrency: *concurrency,
                    reuse,
                });
            }
        }
    }

    let mut results = Results::default();
    let began = std::time::Instant::now();
    for (i, contender) in contenders.iter().enumerate() {
        eprintln!(
            "bench: [{}/{}] {} ({} drains, {} latency runs; {:.0} s so far) ...",
            i + 1,
            contenders.len(),
            contender.label(),
            workloads.len() * o.repeat,
            o.rates.len() * o.repeat,
            began.elapsed().as_secs_f64()
        );
        stage.flush();
        let running = stage.start(contender);
        let idle = running.memory();
        let mut peak = idle;
        for w in workloads.iter().filter(|w| contender.serves(w.task)) {
            for _ in 0..o.repeat {
                let drain = measure::drain(&stage, &running, w);
                peak = peak.max(drain.peak);
                results.drain(contender, w, drain.tasks_per_s, drain.cpu_us_per_task);
            }
        }
        for rate in &o.rates {
            for _ in 0..o.repeat {
                let latency = measure::latency(&stage, *rate, o.latency_seconds);
                results.latency(contender, *rate, &latency);
            }
        }
        // Idle once it has worked, as a worker waiting between bursts is.
        let idle_cost = measure::idle(&running, o.latency_seconds.min(IDLE_SECONDS));
        results.memory.insert(contender.label(), (idle, peak));
        results.idle.insert(contender.label(), idle_cost);
        running.stop();
    }

    eprintln!("bench: start to first result ...");
    let mut starts: Vec<(String, Vec<f64>)> = Vec::new();
    let taskhost = Contender::taskhost(DEFAULT_CONCURRENCY);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..o.repeat {
        let cache = stage.dir.path().join(format!("start-cache-{i}"));
        cold.push(ms(measure::first_result(&stage, &taskhost, Some(&cache))));
        warm.push(ms(measure::first_result(&stage, &taskhost, Some(&cache))));
    }
    starts.push((format!("{} cold (compiles)", taskhost.label()), cold));
    starts.push((format!("{} precompile cache", taskhost.label()), warm));
    if !o.no_celery {
        let runs = (0..o.repeat)
            .map(|_| ms(measure::first_result(&stage, &REFERENCE, None)))
            .collect();
        starts.push((REFERENCE.label(), runs));
    }

    eprintln!("bench: Redis ceilings ...");
    let (broker_url, backend_url) = (stage.redis.url(0), stage.redis.url(1));
    let mut ceilings: BTreeMap<&str, (Figure, Figure)> = BTreeMap::new();
    for w in &workloads {
        let bare = (0..o.repeat)
            .map(|_| crate::ceiling::bare(&broker_url, &backend_url, w))
            .collect();
        let own = (0..o.repeat)
            .map(|_| crate::ceiling::taskhost(&broker_url, &backend_url, w))
            .collect();
        ceilings.insert(
            w.label,
            (
                Figure::new("pop + SET EX + PUBLISH, pipelined", bare),
                Figure::new("taskhost's per-task Redis work, pipelined", own),
            ),
        );
    }

    eprintln!("bench: scaling over worker processes ...");
    let add = &workloads[0];
    let mut scaling = Vec::new();
    for processes in &o.processes {
        let contender = Contender::Taskhost {
            concurrency: DEFAULT_CONCURRENCY,
            processes: *processes,
        };
        stage.flush();
        let running = stage.start(&contender);
        let drains: Vec<measure::Drain> = (0..o.repeat)
            .map(|_| measure::drain(&stage, &running, add))
            .collect();
        running.stop();
        let figure = |f: fn(&measure::Drain) -> f64| {
            Figure::new(contender.label(), drains.iter().map(f).collect())
        };
        scaling.push(Scaled {
            tasks_per_s: figure(|d| d.tasks_per_s),
            worker_cpu_us: figure(|d| d.cpu_us_per_task).median(),
            redis_cpu_us: figure(|d| d.redis_cpu_us_per_task).median(),
            cores_busy: figure(|d| d.cores_busy).median(),
        });
    }

    let replicas = replica_cost(&stage, add, o.repeat);

    print_floor(&floor);
    results.print(&contenders, &workloads, &o.rates, &ceilings, &floor);
    let reference_start = starts
        .iter()
        .find(|(label, _)| *label == REFERENCE.label())
        .map(|(_, v)| Figure::new("", v.clone()).median());
    let mut section = Section::new("start to first result", "ms", &["x celery"]);
    for (label, values) in starts {
        let figure = Figure::new(label, values);
        let ratio = times(figure.median(), reference_start);
        section.row(figure, vec![ratio]);
    }
    section.print();
    let ceiling = ceilings.get(add.label).map(|(_, own)| own.median());
    print_scaling(scaling, ceiling);
    let mut section = Section::new(
        "a replica attached: demo.add drain, taskhost -c 4",
        "tasks/s",
        &["x no WAIT"],
    );
    let unwaited = replicas.first().map(Figure::median);
    for figure in replicas {
        let ratio = times(figure.median(), unwaited);
        section.row(figure, vec![ratio]);
    }
    section.print();
    println!();
    println!("load average at the end: {}", load_average());
    let path = o
        .svg
        .clone()
        .unwrap_or_else(|| taskhost_tests::target_dir().join("bench").join("bench.svg"));
    write_charts(&path, &results, &contenders, &o);
}

/// Throughput against concurrency and the latency distributions, as one SVG at `path`.
fn write_charts(path: &std::path::Path, results: &Results, contenders: &[Contender], o: &Options) {
    use crate::chart::{Panel, Series, nines, svg};
    let add = "demo.add";
    let median = |label: String| {
        results
            .throughput
            .get(&(label, add))
            .map(|v| Figure::new("", v.clone()).median())
    };
    // Concurrency on a log scale: 1, 2, 4, 16 evenly apart by doubling.
    let at = |c: usize| (c as f64).log2();
    let mut throughput = Panel {
        title: format!("drain of {} demo.add, median of {}", o.tasks, o.repeat),
        x_label: "concurrency (-c)".into(),
        y_label: "tasks/s".into(),
        log_y: false,
        x_ticks: o
            .concurrency
            .iter()
            .map(|c| (at(*c), c.to_string()))
            .collect(),
        series: Vec::new(),
    };
    for (label, reuse) in [
        ("taskhost, fresh instances", false),
        ("taskhost, reuse_instances", true),
    ] {
        let points = o
            .concurrency
            .iter()
            .filter_map(|c| {
                let contender = if reuse {
                    Contender::TaskhostReusing { concurrency: *c }
                } else {
                    Contender::taskhost(*c)
                };
                Some((at(*c), median(contender.label())?))
            })
            .collect();
        throughput.series.push(Series {
            label: label.into(),
            points,
        });
    }
    for lang in &o.languages {
        for reuse in [false, true] {
            let points = o
                .language_concurrency
                .iter()
                .filter_map(|c| {
                    let contender = Contender::Plugin {
                        lang: *lang,
                        concurrency: *c,
                        reuse,
                    };
                    Some((at(*c), median(contender.label())?))
                })
                .collect();
            let how = if reuse {
                "reuse_instances"
            } else {
                "fresh instances"
            };
            throughput.series.push(Series {
                label: format!("{lang} plugin, {how}"),
                points,
            });
        }
    }
    let single = |c: &&Contender| !c.is_taskhost() && !matches!(c, Contender::Plugin { .. });
    for contender in contenders.iter().filter(single) {
        if let Some(rate) = median(contender.label()) {
            throughput.series.push(Series {
                label: contender.label(),
                points: vec![(0.0, rate)],
            });
        }
    }
    let mut panels = vec![throughput];
    let percentiles = [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9];
    for rate in &o.rates {
        let mut panel = Panel {
            title: format!("latency of demo.add at {rate} tasks/s"),
            x_label: "percentile".into(),
            y_label: "ms (log scale)".into(),
            log_y: true,
            x_ticks: [50.0, 90.0, 99.0, 99.9]
                .iter()
                .map(|p| (nines(*p), format!("p{p}")))
                .chain([(0.0, "p0".to_owned())])
                .collect(),
            series: Vec::new(),
        };
        // The floors, Celery, and taskhost at the default and the largest concurrency.
        let largest = o
            .concurrency
            .iter()
            .copied()
            .max()
            .unwrap_or(DEFAULT_CONCURRENCY);
        let charted = |c: &&Contender| match c {
            Contender::Taskhost { concurrency, .. }
            | Contender::TaskhostReusing { concurrency } => {
                [DEFAULT_CONCURRENCY, largest].contains(concurrency)
            }
            // The languages with fresh instances only: the legend has ten colours.
            Contender::Plugin { reuse, .. } => !reuse,
            _ => true,
        };
        for contender in contenders.iter().filter(charted) {
            let Some(runs) = results.latency.get(&(contender.label(), *rate as u64)) else {
                continue;
            };
            let mut all: Vec<f64> = runs
                .iter()
                .flat_map(|l| l.samples_ms.iter().copied())
                .collect();
            if all.is_empty() {
                continue;
            }
            all.sort_by(f64::total_cmp);
            let last = all.len() - 1;
            let points = percentiles
                .iter()
                .map(|p| (nines(*p), all[(last as f64 * p / 100.0).round() as usize]))
                .collect();
            panel.series.push(Series {
                label: contender.label(),
                points,
            });
        }
        panels.push(panel);
    }
    let caption = format!(
        "taskhost-bench on {} cores: taskhost beside Celery 5.7 and the native echo floor, one private Redis",
        cores()
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the chart's directory");
    }
    std::fs::write(path, svg(&caption, &panels)).expect("write the chart");
    println!("charts: {}", path.display());
}

/// The bare loop's figures: what the sandbox itself costs per task.
fn print_floor(floor: &crate::bare::Floor) {
    let mut section = Section::new(
        "the sandbox's floor: a bare wasmtime loop over demo.add, one thread, no Redis",
        "CPU µs/task",
        &[],
    );
    section.row(
        Figure::new("fresh store + instantiate + call", vec![floor.fresh_us]),
        Vec::new(),
    );
    section.row(
        Figure::new("call on a kept instance", vec![floor.kept_us]),
        Vec::new(),
    );
    section.print();
}

/// `reference / value` as "1/31": how small a fraction of the reference `value` is.
fn fraction(value: f64, reference: Option<f64>) -> String {
    match reference {
        Some(r) if value > 0.0 && r.is_finite() => format!("1/{:.0}", r / value),
        _ => String::new(),
    }
}

/// Drains `add` with a replica attached to the bench's Redis, without and with `[worker]
/// wait_replicas = 1` (each batch's states on the replica before its acknowledgement).
fn replica_cost(stage: &Stage, add: &Workload, repeat: usize) -> Vec<Figure> {
    eprintln!("bench: a replica, and wait_replicas ...");
    let master = stage.redis.port().to_string();
    let replica = RedisServer::start_with(&stage.dir, &["--replicaof", "127.0.0.1", &master]);
    taskhost_tests::wait_for("the bench's replica to sync", || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.conn(0))
            .ok()?;
        info.contains("master_link_status:up").then_some(())
    });
    let figures = [0, 1]
        .into_iter()
        .map(|wait| {
            let config = stage.dir.write(
                &format!("replicas-{wait}.toml"),
                &format!(
                    "{}[worker]\nwait_replicas = {wait}\n",
                    crate::workers::BASE_CONFIG
                ),
            );
            stage.flush();
            let running = stage.start_configured(DEFAULT_CONCURRENCY, &config);
            let runs = (0..repeat)
                .map(|_| measure::drain(stage, &running, add).tasks_per_s)
                .collect();
            running.stop();
            Figure::new(format!("wait_replicas = {wait}"), runs)
        })
        .collect();
    drop(replica);
    figures
}

/// One row of the scaling table: throughput, and where the CPU went.
struct Scaled {
    tasks_per_s: Figure,
    worker_cpu_us: f64,
    redis_cpu_us: f64,
    cores_busy: f64,
}

/// The scaling table, and what bounds the largest run: the cores (workers and Redis keep them
/// all busy), Redis (its one thread near a core), or neither (waits: round trips).
fn print_scaling(scaling: Vec<Scaled>, ceiling: Option<f64>) {
    let mut section = Section::new(
        "scaling: demo.add drain over taskhost worker processes",
        "tasks/s",
        &[
            "% of ceiling",
            "worker CPU µs/task",
            "Redis CPU µs/task",
            "cores busy",
        ],
    );
    let last = scaling
        .last()
        .map(|s| (s.tasks_per_s.median(), s.redis_cpu_us, s.cores_busy));
    for row in scaling {
        let ratio = percent(row.tasks_per_s.median(), ceiling);
        let columns = vec![
            ratio,
            number(row.worker_cpu_us),
            number(row.redis_cpu_us),
            format!("{:.2}", row.cores_busy),
        ];
        section.row(row.tasks_per_s, columns);
    }
    section.print();
    if let Some((tasks_per_s, redis_us, busy)) = last {
        let redis_share = tasks_per_s * redis_us / 1e6;
        let bound = if redis_share > 0.9 {
            "Redis's one thread (near a whole core)"
        } else if busy > 0.9 * cores() as f64 {
            "the machine's cores (workers and Redis keep them all busy)"
        } else {
            "waits, not CPU: round trips to Redis and between the worker's threads"
        };
        println!(
            "  bound at the most processes: {bound}; Redis busy {:.0}% of a core, all cores {busy:.2} of {}",
            redis_share * 100.0,
            cores()
        );
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Figures by contender.
#[derive(Default)]
struct Results {
    /// (contender, workload) → tasks/s per repeat.
    throughput: BTreeMap<(String, &'static str), Vec<f64>>,
    /// (contender, workload) → worker CPU µs per task per repeat.
    cpu: BTreeMap<(String, &'static str), Vec<f64>>,
    /// (contender, rate) → (p50, p99, max, completed/s) per repeat.
    latency: BTreeMap<(String, u64), Vec<measure::Latency>>,
    /// contender → (idle, peak under load).
    memory: BTreeMap<String, (Memory, Memory)>,
    /// contender → its cost while idle.
    idle: BTreeMap<String, measure::Idle>,
}

impl Results {
    fn drain(&mut self, contender: &Contender, w: &Workload, tasks_per_s: f64, cpu_us: f64) {
        let key = (contender.label(), w.label);
        self.throughput
            .entry(key.clone())
            .or_default()
            .push(tasks_per_s);
        self.cpu.entry(key).or_default().push(cpu_us);
    }

    fn latency(&mut self, contender: &Contender, rate: f64, latency: &measure::Latency) {
        self.latency
            .entry((contender.label(), rate as u64))
            .or_default()
            .push(latency.clone());
    }

    fn print(
        &self,
        contenders: &[Contender],
        workloads: &[Workload],
        rates: &[f64],
        ceilings: &BTreeMap<&str, (Figure, Figure)>,
        floor: &crate::bare::Floor,
    ) {
        let reference = REFERENCE.label();
        for w in workloads {
            let median_of = |label: String| {
                self.throughput
                    .get(&(label, w.label))
                    .map(|v| Figure::new("", v.clone()).median())
            };
            let reference_rate = median_of(reference.clone());
            let echo_rate = median_of(Contender::Echo.label());
            let (bare, own) = ceilings
                .get(w.label)
                .map(|(b, o)| (Some(b.median()), Some(o.median())))
                .unwrap_or((None, None));
            let mut section = Section::new(
                format!(
                    "drain throughput: {} {} ",
                    workloads[0].messages.len(),
                    w.label
                ),
                "tasks/s",
                &[
                    "x celery -c 2",
                    "x echo",
                    "% bare ceiling",
                    "% own ceiling",
                    "CPU us/task",
                    "CPU of celery",
                    "CPU x bare",
                ],
            );
            let cpu_of = |label: String| {
                self.cpu
                    .get(&(label, w.label))
                    .map(|v| Figure::new("", v.clone()).median())
            };
            let reference_cpu = cpu_of(reference.clone());
            for contender in contenders {
                let key = (contender.label(), w.label);
                let Some(values) = self.throughput.get(&key) else {
                    continue;
                };
                let figure = Figure::new(contender.label(), values.clone());
                let cpu = cpu_of(contender.label());
                let median = figure.median();
                let own_ratio = if contender.is_celery() {
                    String::new()
                } else {
                    percent(median, own)
                };
                section.row(
                    figure,
                    vec![
                        times(median, reference_rate),
                        times(median, echo_rate),
                        percent(median, bare),
                        own_ratio,
                        cpu.map(number).unwrap_or_default(),
                        cpu.map(|c| fraction(c, reference_cpu)).unwrap_or_default(),
                        match cpu {
                            Some(c) if contender.is_taskhost() && w.task == "demo.add" => {
                                times(c, Some(floor.fresh_us))
                            }
                            _ => String::new(),
                        },
                    ],
                );
            }
            if let Some((bare, own)) = ceilings.get(w.label) {
                section.row(bare.clone(), vec![String::new(); 7]);
                section.row(own.clone(), vec![String::new(); 7]);
            }
            section.print();
        }
        for rate in rates {
            let mut section = Section::new(
                format!("latency of demo.add at {rate} tasks/s offered: p99"),
                "ms",
                &["x echo", "p50 (median)", "max (median)", "done/s (median)"],
            );
            let echo_p99 = self
                .latency
                .get(&(Contender::Echo.label(), *rate as u64))
                .map(|runs| Figure::new("", runs.iter().map(|l| l.p99_ms).collect()).median());
            for contender in contenders {
                let Some(runs) = self.latency.get(&(contender.label(), *rate as u64)) else {
                    continue;
                };
                let pick = |f: fn(&measure::Latency) -> f64| {
                    Figure::new("", runs.iter().map(f).collect()).median()
                };
                section.row(
                    Figure::new(contender.label(), runs.iter().map(|l| l.p99_ms).collect()),
                    vec![
                        times(pick(|l| l.p99_ms), echo_p99),
                        number(pick(|l| l.p50_ms)),
                        number(pick(|l| l.max_ms)),
                        number(pick(|l| l.completed_per_s)),
                    ],
                );
            }
            section.print();
        }
        let mut section = Section::new(
            "memory of the whole worker (all processes): RSS under load; and idle, its CPU \
             (ms per s) and threads woken (per s)",
            "MiB",
            &[
                "x celery -c 2",
                "idle RSS",
                "PSS under load",
                "idle CPU",
                "idle wake-ups",
            ],
        );
        let reference_peak = self
            .memory
            .get(&reference)
            .map(|(_, peak)| mib(peak.rss_kib));
        for contender in contenders {
            let Some((idle, peak)) = self.memory.get(&contender.label()) else {
                continue;
            };
            let figure = Figure::new(contender.label(), vec![mib(peak.rss_kib)]);
            let ratio = times(mib(peak.rss_kib), reference_peak);
            let cost = self.idle.get(&contender.label());
            section.row(
                figure,
                vec![
                    ratio,
                    number(mib(idle.rss_kib)),
                    number(mib(peak.pss_kib)),
                    cost.map_or_else(|| "-".into(), |c| number(c.cpu_ms_per_s)),
                    cost.map_or_else(|| "-".into(), |c| number(c.wakeups_per_s)),
                ],
            );
        }
        section.print();
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
