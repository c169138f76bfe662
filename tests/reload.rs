//! Hot reload: swapping, refusing, removing plugins and reloading the config while a worker
//! runs, and the precompile cache.

use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use taskhost_tests::{
    Client, HttpStub, Process, RedisServer, Reply, TestDir, plugin_version, plugin_wasm,
    test_plugin_wasm,
};

/// How a new version is put in place.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Written under a hidden name, then renamed over the old file (what deploy tools do).
    Rename,
    /// Truncated and rewritten in place.
    Overwrite,
    /// Truncated and rewritten in place in small chunks, with pauses, like a slow copy.
    SlowChunks,
}

fn put(target: &Path, source: &Path, how: Placement) {
    let bytes = std::fs::read(source).expect("read new version");
    match how {
        Placement::Rename => {
            let tmp = target.with_file_name(".incoming.wasm.tmp");
            std::fs::write(&tmp, &bytes).expect("write temp");
            std::fs::rename(&tmp, target).expect("rename into place");
        }
        Placement::Overwrite => std::fs::write(target, &bytes).expect("overwrite"),
        Placement::SlowChunks => {
            let mut file = std::fs::File::create(target).expect("truncate");
            for chunk in bytes.chunks(bytes.len() / 8 + 1) {
                file.write_all(chunk).expect("write chunk");
                file.flush().expect("flush");
                // The slow writer under test (not a wait for the worker): the watcher must
                // not serve the file before it is complete.
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        }
    }
}

#[test]
fn swapping_a_plugin_under_load_loses_and_fails_nothing() {
    let dir = TestDir::new("reload-load");
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    let target = plugins.join("demo.wasm");
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    std::fs::copy(&v1, &target).expect("install v1");
    let worker = Process::worker(&dir, &redis, &plugins, &["-c", "4"]);

    // A producer sending a steady stream while the main thread swaps versions.
    let total = 3000i64;
    let producer = {
        let mut client = Client::new(&redis);
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            for i in 0..total {
                let id = if i % 5 == 0 {
                    client.send("demo.echo", json!([{"i": i}]))
                } else {
                    client.send("demo.add", json!([i, 1]))
                };
                sent.push((id, i));
                if i % 100 == 0 {
                    // Pace the stream so it spans the swaps (a producer, not a wait).
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            sent
        })
    };
    let ways = [
        Placement::Rename,
        Placement::Overwrite,
        Placement::SlowChunks,
    ];
    let swaps = 12;
    for n in 0..swaps {
        let next = if n % 2 == 0 { &v2 } else { &v1 };
        put(&target, next, ways[n % ways.len()]);
        worker.wait_log_count(&format!("to={}", plugin_version(next)), n / 2 + 1);
    }
    let sent = producer.join().expect("producer thread");
    let mut client = Client::new(&redis);
    let mut versions: HashMap<String, usize> = HashMap::new();
    for (id, i) in &sent {
        let doc = client.result(id);
        assert_eq!(doc["status"], "SUCCESS", "task {i}: {doc}");
        let result = &doc["result"];
        if i % 5 == 0 {
            assert_eq!(result["value"], json!({"i": i}), "task {i}");
        } else {
            assert_eq!(result["sum"], i + 1, "task {i}");
        }
        let version = result["version"].as_str().expect("version").to_owned();
        *versions.entry(version).or_default() += 1;
    }
    assert_eq!(sent.len() as i64, total);
    assert!(
        versions.get("v1").is_some_and(|n| *n > 0) && versions.get("v2").is_some_and(|n| *n > 0),
        "both versions served: {versions:?}"
    );
    assert!(
        client.dead_letters().is_empty(),
        "{:?}",
        client.dead_letters()
    );
    assert_eq!(
        worker.log().matches("plugin swapped").count(),
        swaps,
        "one swap per change"
    );
    // Each task's success line names the version that ran it.
    assert!(
        worker
            .log()
            .contains(&format!("version={}", plugin_version(&v2)))
    );
}

#[test]
fn a_broken_file_is_refused_and_the_loaded_version_keeps_serving() {
    let dir = TestDir::new("reload-refuse");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let target = plugins.join("demo.wasm");
    let worker = Process::worker(&dir, &redis, &plugins, &[]);
    let mut client = Client::new(&redis);
    let good = std::fs::read(plugin_wasm("demo")).expect("read demo");
    let broken_dir = dir.path().join("broken");
    std::fs::create_dir_all(&broken_dir).expect("broken dir");
    let write = |name: &str, bytes: &[u8]| {
        let path = broken_dir.join(name);
        std::fs::write(&path, bytes).expect("write broken file");
        path
    };
    let cases = [
        (
            write("corrupt", b"\0asm\x0d\0\x01\0 this is not a component"),
            "not a WebAssembly component",
        ),
        (
            write("truncated", &good[..good.len() / 3]),
            "not a WebAssembly component",
        ),
        (
            test_plugin_wasm("wrongwit"),
            "built for taskhost:plugin@0.2.0",
        ),
    ];
    for (n, (bad, reason)) in cases.iter().enumerate() {
        put(&target, bad, Placement::Rename);
        worker.wait_log_count("plugin refused, the loaded version keeps serving", n + 1);
        let line = worker
            .log()
            .lines()
            .rfind(|l| l.contains("plugin refused"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            line.contains(reason) && line.contains("demo.wasm"),
            "{line}"
        );
        let id = client.send("demo.add", json!([2, 3]));
        assert_eq!(
            client.result(&id)["result"],
            5,
            "the old version still serves"
        );
    }
    // A second plugin claiming a task demo serves is refused; demo keeps it.
    std::fs::copy(plugin_wasm("demo"), plugins.join("copycat.wasm")).expect("copy");
    worker.wait_log("task \"demo.add\" is already served by plugin \"demo\"; refusing this one");
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(client.result(&id)["result"], 5);
    std::fs::remove_file(plugins.join("copycat.wasm")).expect("remove copycat");
    // The next good change of the refused file is loaded.
    put(
        &target,
        &test_plugin_wasm("versioned-v2"),
        Placement::Rename,
    );
    worker.wait_log("plugin swapped");
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(
        client.result(&id)["result"],
        json!({"sum": 5, "version": "v2"})
    );
}

#[test]
fn a_removed_plugin_stops_serving_and_is_served_again_when_added_back() {
    let dir = TestDir::new("reload-remove");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let target = plugins.join("demo.wasm");
    let worker = Process::worker(&dir, &redis, &plugins, &[]);
    let mut client = Client::new(&redis);
    std::fs::remove_file(&target).expect("remove demo");
    worker.wait_log("plugin removed");
    let id = client.send("demo.add", json!([2, 3]));
    let doc = client.result(&id);
    assert_eq!(doc["result"]["exc_type"], "NotRegistered", "{doc}");
    assert!(
        client
            .dead_letters()
            .iter()
            .any(|d| d["task_id"] == id.as_str())
    );
    put(&target, &plugin_wasm("demo"), Placement::Rename);
    worker.wait_log_count("plugin loaded", 2);
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(client.result(&id)["result"], 5);
}

#[test]
fn the_config_file_reloads_and_a_bad_edit_is_refused() {
    let dir = TestDir::new("reload-config");
    let redis = RedisServer::start(&dir);
    let executor = HttpStub::start(|_| Reply::json(200, json!({"status": "completed"})));
    let storage = HttpStub::start(|_| Reply::json(200, json!({})));
    let config = |allow: &[&str]| {
        let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
        format!(
            "[plugins.crucible]\nallow_http = [{}]\nconfig = {{ executor_service_url = {:?}, storage_service_url = {:?} }}\n",
            allow.join(", "),
            executor.url(),
            storage.url()
        )
    };
    let path = dir.write("taskhost.toml", &config(&[&storage.url()]));
    let plugins = dir.plugins(&["crucible"]);
    let path_arg = path.to_string_lossy().into_owned();
    let worker = Process::worker(&dir, &redis, &plugins, &["--config", &path_arg]);
    let mut client = Client::new(&redis);
    let evaluate = |client: &mut Client| {
        let id = client.send("tasks.evaluate_code", json!([1, "x", "python"]));
        client.result(&id)
    };
    assert_eq!(
        evaluate(&mut client)["result"]["exc_type"],
        "CapabilityDenied"
    );
    std::fs::write(&path, config(&[&storage.url(), &executor.url()])).expect("edit config");
    worker.wait_log("config reloaded");
    assert_eq!(evaluate(&mut client)["status"], "SUCCESS");
    std::fs::write(&path, "[plugins.crucible]\nallow_htttp = []\n").expect("bad edit");
    worker.wait_log("config change refused, the previous config stays");
    assert!(
        worker.log().contains("allow_htttp"),
        "the reason names the bad key"
    );
    assert_eq!(
        evaluate(&mut client)["status"],
        "SUCCESS",
        "the old grants stay"
    );
}

#[test]
fn the_precompile_cache_is_used_on_restart_and_a_corrupt_entry_is_rebuilt() {
    let dir = TestDir::new("reload-cache");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let cache = dir.path().join("precompiled");
    let cache_arg = cache.to_string_lossy().into_owned();
    let start = |log: &str| {
        Process::worker_logged(&dir, log, &redis, &plugins, &["--cache-dir", &cache_arg])
    };
    let mut client = Client::new(&redis);
    let mut check = |worker: &mut Process, code: &str| {
        assert!(
            worker.log().contains(&format!("code={code}")),
            "{}",
            worker.log()
        );
        let id = client.send("demo.add", json!([2, 3]));
        assert_eq!(client.result(&id)["result"], 5);
        assert!(worker.stop_with(libc::SIGTERM).success());
    };
    check(&mut start("first.log"), "compiled");
    check(&mut start("second.log"), "cache");
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let mut bytes = std::fs::read(&entries[0]).expect("read entry");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entries[0], &bytes).expect("corrupt entry");
    let mut third = start("third.log");
    assert!(
        third
            .log()
            .contains("precompile cache entry is corrupt; recompiling")
    );
    check(&mut third, "compiled");
    check(&mut start("fourth.log"), "cache");
}
