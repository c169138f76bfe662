//! Hot-reload benchmark (not a test: it prints figures).
//!
//!     cargo bench -p taskhost-tests --bench reload
//!
//! On one private redis-server and one worker (`-c 4`, precompile cache on):
//! 1. swap latency: from renaming a new version into the plugin directory to the first task
//!    served by it, over 20 swaps (p50 / max);
//! 2. task latency (send → result published) at a fixed rate, without swaps and with a swap
//!    every 250 ms (p50 / p99 / max);
//! 3. worker start to ready: cold (empty precompile cache) and warm, 3 runs each.

use serde_json::json;
use std::time::{Duration, Instant};
use taskhost_tests::bench::{cores, latency_run, load_average, min_median_max, percentiles};
use taskhost_tests::{Client, Process, RedisServer, TestDir, plugin_wasm, test_plugin_wasm};

fn main() {
    let dir = TestDir::new("bench-reload");
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    let target = plugins.join("demo.wasm");
    let versions = [
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    ];
    std::fs::copy(&versions[0], &target).expect("install v1");
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let worker = Process::worker(
        &dir,
        &redis,
        &plugins,
        &["-c", "4", "--cache-dir", &cache_arg],
    );
    println!(
        "machine: {} cores, load average {}",
        cores(),
        load_average()
    );

    // 1. Swap latency.
    let mut client = Client::new(&redis);
    let mut swaps = Vec::new();
    for n in 1..=20 {
        let next = &versions[n % 2];
        let expected = if n % 2 == 1 { "v2" } else { "v1" };
        let tmp = plugins.join(".demo.wasm.tmp");
        std::fs::copy(next, &tmp).expect("stage");
        let start = Instant::now();
        std::fs::rename(&tmp, &target).expect("rename into place");
        loop {
            let id = client.send("demo.add", json!([1, 1]));
            let doc = client.result(&id);
            if doc["result"]["version"] == expected {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "swap {n} never served"
            );
        }
        swaps.push(start.elapsed());
    }
    let (p50, _, max) = percentiles(&mut swaps);
    println!(
        "swap: rename -> first task served by the new version, 20 swaps: p50 {p50:.1} ms, max {max:.1} ms"
    );

    // 2. Latency at a fixed rate, without and with swaps.
    let rate = 200.0;
    let quiet = latency_run(
        &redis,
        "demo.add",
        rate,
        Duration::from_secs(5),
        &mut |_| {},
    );
    let mut swaps = 0;
    let mut next_swap = Instant::now() + Duration::from_millis(250);
    let swapping = latency_run(
        &redis,
        "demo.add",
        rate,
        Duration::from_secs(5),
        &mut |now| {
            if now >= next_swap {
                swaps += 1;
                let tmp = target.with_file_name(".demo.wasm.tmp");
                std::fs::copy(&versions[swaps % 2], &tmp).expect("stage");
                std::fs::rename(&tmp, &target).expect("swap");
                next_swap += Duration::from_millis(250);
            }
        },
    );
    for (name, mut run) in [("no swaps", quiet), ("a swap every 250 ms", swapping)] {
        let n = run.len();
        let (p50, p99, max) = percentiles(&mut run);
        println!(
            "latency at {rate}/s, {name} ({n} tasks): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
        );
    }
    drop(worker);

    // 3. Start to ready, cold and warm.
    let _ = std::fs::remove_file(&target);
    std::fs::copy(plugin_wasm("demo"), plugins.join("demo.wasm")).expect("install demo");
    std::fs::copy(plugin_wasm("crucible"), plugins.join("crucible.wasm"))
        .expect("install crucible");
    for (label, clear) in [("cold (empty cache)", true), ("warm (cache hit)", false)] {
        let mut times = Vec::new();
        for run in 0..3 {
            if clear {
                let _ = std::fs::remove_dir_all(&cache);
            }
            let start = Instant::now();
            let mut w = Process::worker_logged(
                &dir,
                &format!("start-{clear}-{run}.log"),
                &redis,
                &plugins,
                &["--cache-dir", &cache_arg],
            );
            times.push(start.elapsed());
            w.stop_with(libc::SIGTERM);
        }
        let (min, median, max) = min_median_max(&mut times);
        println!(
            "start -> worker ready with demo + crucible, {label}: min {min:.0} ms, median {median:.0} ms, max {max:.0} ms"
        );
    }
}
