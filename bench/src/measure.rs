//! One measurement each: draining pre-loaded tasks, latency at a fixed offered rate, and the
//! time from a worker's start to its first result.

use crate::workers::{Contender, Memory, Running, Stage};
use crate::workload::Workload;
use redis::Connection;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The queue every contender consumes.
const QUEUE: &str = "celery";
/// Where a drain's tasks are staged before they appear on the queue all at once.
const STAGING: &str = "bench:staging";

/// A drain: how fast, and the worker's largest memory meanwhile.
pub struct Drain {
    pub tasks_per_s: f64,
    pub peak: Memory,
    /// CPU time the worker's processes spent, per task, microseconds.
    pub cpu_us_per_task: f64,
    /// CPU time Redis spent, per task, microseconds (the bench's own polling included).
    pub redis_cpu_us_per_task: f64,
    /// Cores kept busy on average by the workers and Redis together.
    pub cores_busy: f64,
}

/// Pre-loads the workload's messages, makes them appear on the queue at once (`RENAME`, which
/// wakes blocked consumers), and times until every task has a result; then checks every
/// result is the expected success.
pub fn drain(stage: &Stage, running: &Running, workload: &Workload) -> Drain {
    let mut broker = stage.redis.conn(0);
    let mut backend = stage.redis.conn(1);
    redis::cmd("FLUSHDB")
        .exec(&mut backend)
        .expect("FLUSHDB results");
    let left: usize = redis::cmd("LLEN")
        .arg(QUEUE)
        .query(&mut broker)
        .expect("LLEN");
    assert_eq!(left, 0, "the queue is not empty before a drain");
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg(STAGING).ignore();
    for chunk in workload.messages.chunks(500) {
        pipe.cmd("LPUSH").arg(STAGING).arg(chunk).ignore();
    }
    pipe.exec(&mut broker).expect("stage the messages");
    let n = workload.messages.len();

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (pids, sampling) = (running.pids(), sampling.clone());
        std::thread::spawn(move || {
            let mut peak = Memory::of(&pids);
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(Memory::of(&pids));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(Memory::of(&pids))
        })
    };
    let cpu_before = cpu_seconds(&running.pids());
    let redis_before = redis_cpu_seconds(&mut broker);
    let start = Instant::now();
    redis::cmd("RENAME")
        .arg(STAGING)
        .arg(QUEUE)
        .exec(&mut broker)
        .expect("RENAME the staged messages onto the queue");
    let limit = Duration::from_secs(60) + Duration::from_millis(n as u64 * 10);
    let mut elapsed = loop {
        let stored: usize = redis::cmd("DBSIZE").query(&mut backend).expect("DBSIZE");
        let elapsed = start.elapsed();
        if stored >= n {
            break elapsed;
        }
        assert!(
            elapsed < limit,
            "{n} tasks of {} not done within {limit:?}: {stored} results",
            workload.task
        );
        // Sampling the count; a finer step would load the Redis being measured.
        std::thread::sleep(Duration::from_millis(1));
    };
    // Every task has a stored state; a task that stores progress first may not be final yet.
    while !all_final(&mut backend, workload) {
        assert!(
            start.elapsed() < limit,
            "results of {} not final",
            workload.task
        );
        std::thread::sleep(Duration::from_millis(1));
        elapsed = start.elapsed();
    }
    let cpu = cpu_seconds(&running.pids()) - cpu_before;
    let redis_cpu = redis_cpu_seconds(&mut broker) - redis_before;
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.join().expect("memory sampler");
    Drain {
        tasks_per_s: n as f64 / elapsed.as_secs_f64(),
        peak,
        cpu_us_per_task: cpu * 1e6 / n as f64,
        redis_cpu_us_per_task: redis_cpu * 1e6 / n as f64,
        cores_busy: (cpu + redis_cpu) / elapsed.as_secs_f64(),
    }
}

/// What an idle worker costs: CPU, and how often its threads wake.
#[derive(Debug, Clone, Copy)]
pub struct Idle {
    pub cpu_ms_per_s: f64,
    pub wakeups_per_s: f64,
}

/// The idle cost of `running`, measured over `seconds` with no task sent.
pub fn idle(running: &Running, seconds: f64) -> Idle {
    let pids = running.pids();
    let (cpu, switches) = (cpu_seconds(&pids), context_switches(&pids));
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let elapsed = began.elapsed().as_secs_f64();
    Idle {
        cpu_ms_per_s: (cpu_seconds(&pids) - cpu) * 1e3 / elapsed,
        wakeups_per_s: context_switches(&pids).saturating_sub(switches) as f64 / elapsed,
    }
}

/// Context switches (voluntary and not) of every thread of `pids`: each is a thread waking.
fn context_switches(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|line| line.contains("ctxt_switches:"))
                .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// User + system CPU time the Redis server has spent, seconds (`INFO cpu`).
fn redis_cpu_seconds(conn: &mut Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).expect("INFO cpu");
    info.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once(':')?;
            matches!(key, "used_cpu_sys" | "used_cpu_user")
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// User + system CPU time of `pids`, seconds (from /proc, in clock ticks of 10 ms).
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            // After the command: state is field 3, utime 14 and stime 15 (1-based).
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .sum();
    ticks as f64 / 100.0
}

/// True when every task of the workload has its expected result; panics on a wrong one.
fn all_final(backend: &mut Connection, workload: &Workload) -> bool {
    for chunk in workload.ids.chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|id| format!("celery-task-meta-{id}"))
            .collect();
        let docs: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(backend).expect("MGET");
        for (id, doc) in chunk.iter().zip(docs) {
            let Some(doc) = doc else { return false };
            let doc: serde_json::Value = serde_json::from_str(&doc).expect("a result is JSON");
            match doc["status"].as_str() {
                Some("SUCCESS") => assert_eq!(
                    doc["result"], workload.expected,
                    "task {id} of {} returned a wrong result",
                    workload.task
                ),
                Some("PENDING" | "STARTED" | "PROGRESS" | "RETRY") => return false,
                other => panic!("task {id} of {} ended {other:?}: {doc}", workload.task),
            }
        }
    }
    true
}

/// End-to-end latencies (send to result published) of `demo.add` at `rate` for `seconds`, and
/// the rate results came back at.
#[derive(Debug, Clone)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Completed tasks per second over the run (keeps up when close to the offered rate).
    pub completed_per_s: f64,
    /// Every task's latency, ms, smallest first.
    pub samples_ms: Vec<f64>,
}

pub fn latency(stage: &Stage, rate: f64, seconds: f64) -> Latency {
    let mut latencies = taskhost_tests::bench::latency_run(
        &stage.redis,
        "demo.add",
        rate,
        Duration::from_secs_f64(seconds),
        &mut |_| {},
    );
    let n = latencies.len();
    let (p50_ms, p99_ms, max_ms) = taskhost_tests::bench::percentiles(&mut latencies);
    // The run ends when the last result is in: that is the send window plus the last latency.
    let window = seconds + max_ms / 1000.0;
    Latency {
        p50_ms,
        p99_ms,
        max_ms,
        completed_per_s: n as f64 / window,
        samples_ms: latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
    }
}

/// Time from starting the worker process to the first task's result, with one `demo.add`
/// already queued.
pub fn first_result(stage: &Stage, contender: &Contender, cache_dir: Option<&Path>) -> Duration {
    stage.flush();
    let mut client = taskhost_tests::Client::new(&stage.redis);
    let id = client.send("demo.add", serde_json::json!([1, 2]));
    let mut backend = stage.redis.conn(1);
    let key = format!("celery-task-meta-{id}");
    let start = Instant::now();
    let running = stage.start_with(contender, cache_dir, false);
    let limit = Duration::from_secs(60);
    let took = loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut backend)
            .expect("EXISTS");
        let elapsed = start.elapsed();
        if exists {
            break elapsed;
        }
        assert!(
            elapsed < limit,
            "{} served nothing within {limit:?}",
            contender.label()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    running.stop();
    took
}
