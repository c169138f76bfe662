//! Sandbox benchmark (not a test: it prints figures).
//!
//!     cargo bench -p taskhost-tests --bench sandbox
//!
//! CPU fairness: latency of `demo.add` at a fixed rate on a worker with `-c 2`, with both slots
//! free, and with one slot held by a plugin spinning in an infinite loop (it is interrupted
//! only by its hard time limit, longer than the run, or by the end of the benchmark) — on the
//! default threads (per core, for I/O and for guests), and with one I/O thread and one guest
//! thread, where only the spinner's epoch yields let the other guests run at all.

use serde_json::json;
use std::time::Duration;
use taskhost_tests::bench::{cores, latency_run, load_average, percentiles};
use taskhost_tests::{Client, Process, RedisServer, TestDir, test_plugin_wasm};

fn main() {
    println!(
        "machine: {} cores, load average {}",
        cores(),
        load_average()
    );
    for threads in [None, Some("1")] {
        measure(threads);
    }
}

fn measure(runtime_threads: Option<&str>) {
    let dir = TestDir::new("bench-sandbox");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    std::fs::copy(test_plugin_wasm("hostile"), plugins.join("hostile.wasm")).expect("hostile");
    let (broker, backend, plugin_dir) = (
        redis.url(0),
        redis.url(1),
        plugins.to_string_lossy().into_owned(),
    );
    let mut command = Process::command(
        &dir,
        &[
            "worker",
            "-c",
            "2",
            "--broker",
            &broker,
            "--result-backend",
            &backend,
            "--plugins",
            &plugin_dir,
        ],
    );
    if let Some(threads) = runtime_threads {
        command.env("TASKHOST_IO_THREADS", threads);
        command.env("TASKHOST_GUEST_THREADS", threads);
    }
    let worker = Process::spawn(&dir, "worker.log", command);
    worker.wait_log("worker ready");
    let label = runtime_threads.map_or_else(
        || "threads = cores".to_owned(),
        |t| format!("{t} I/O thread and {t} guest thread"),
    );
    let rate = 200.0;
    let run = Duration::from_secs(5);
    let mut free = latency_run(&redis, "demo.add", rate, run, &mut |_| {});
    let mut client = Client::new(&redis);
    let spinner = client.send_with_time_limit("hostile.spin", json!([]), (None, Some(30.0)));
    let mut beside = latency_run(&redis, "demo.add", rate, run, &mut |_| {});
    assert!(
        client.state(&spinner).is_none(),
        "the spinner must still be running at the end of the measurement: {:?}",
        client.state(&spinner)
    );
    for (name, run) in [
        ("both slots free", &mut free),
        ("one slot spinning", &mut beside),
    ] {
        let n = run.len();
        let (p50, p99, max) = percentiles(run);
        println!(
            "demo.add at {rate}/s, -c 2, {label}, {name} ({n} tasks): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
    }
}
