//! Fleet deploys: `taskhost deploy` / `rollback` reach every worker started with `--fleet`,
//! including one that joins later; `taskhost deployments` shows what each runs.

use serde_json::json;
use std::path::PathBuf;
use taskhost_tests::{Client, Process, RedisServer, TestDir, plugin_version, test_plugin_wasm};

/// A fleet worker with its own, initially empty, plugin directory, consuming queue `queue`.
fn fleet_worker(dir: &TestDir, redis: &RedisServer, queue: &str) -> Process {
    let plugins = dir.path().join(format!("plugins-{queue}"));
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    let node = format!("{queue}@fleet");
    Process::worker_logged(
        dir,
        &format!("{queue}.log"),
        redis,
        &plugins,
        &["--fleet", "-Q", queue, "-n", &node],
    )
}

/// Which build each worker's queue is served by.
fn versions(client: &mut Client, queues: &[&str]) -> Vec<String> {
    queues
        .iter()
        .map(|q| {
            let id = client.send_to(q, "demo.add", json!([1, 2]), json!({}));
            let doc = client.result(&id);
            assert_eq!(doc["result"]["sum"], 3, "{doc}");
            doc["result"]["version"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn deploy_and_rollback_reach_every_worker_and_a_late_joiner() {
    let dir = TestDir::new("fleet");
    let redis = RedisServer::start(&dir);
    let workers: Vec<Process> = ["w1", "w2", "w3"]
        .iter()
        .map(|q| fleet_worker(&dir, &redis, q))
        .collect();
    let broker = redis.url(0);
    let deploy = |file: &PathBuf| {
        let file = file.to_string_lossy().into_owned();
        let out = Process::run(
            &dir,
            &["deploy", &file, "--name", "demo", "--broker", &broker],
        );
        assert!(out.status.success(), "{out:?}");
        assert!(out.stdout.contains("deployed demo version"), "{out:?}");
    };
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    let mut client = Client::new(&redis);
    let queues = ["w1", "w2", "w3"];

    deploy(&v1);
    for w in &workers {
        w.wait_log(&format!(
            "plugin loaded plugin=demo version={}",
            plugin_version(&v1)
        ));
    }
    assert_eq!(versions(&mut client, &queues), ["v1", "v1", "v1"]);

    deploy(&v2);
    for w in &workers {
        w.wait_log(&format!("to={}", plugin_version(&v2)));
    }
    assert_eq!(versions(&mut client, &queues), ["v2", "v2", "v2"]);

    let out = Process::run(&dir, &["rollback", "demo", "--broker", &broker]);
    assert!(
        out.status.success() && out.stdout.starts_with("rolled back demo"),
        "{out:?}"
    );
    for w in &workers {
        w.wait_log(&format!("to={}", plugin_version(&v1)));
    }
    assert_eq!(versions(&mut client, &queues), ["v1", "v1", "v1"]);

    // A worker joining now gets the current version.
    let late = fleet_worker(&dir, &redis, "w4");
    late.wait_log(&format!(
        "plugin loaded plugin=demo version={}",
        plugin_version(&v1)
    ));
    assert_eq!(versions(&mut client, &["w4"]), ["v1"]);

    let out = Process::run(&dir, &["deployments", "--broker", &broker]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("demo  sha256"), "{}", out.stdout);
    for node in ["w1@fleet", "w2@fleet", "w3@fleet", "w4@fleet"] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(node))
            .unwrap_or_else(|| panic!("{node} missing:\n{}", out.stdout));
        assert!(
            line.contains(&format!("demo {}", plugin_version(&v1))),
            "{line}"
        );
    }

    // Nothing earlier to return to: a clear refusal.
    let out = Process::run(&dir, &["rollback", "demo", "--broker", &broker]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("no earlier deployed version"),
        "{out:?}"
    );
    // A file that is no plugin is refused before it reaches the fleet.
    let junk = dir.write("junk.wasm", "not a component");
    let out = Process::run(
        &dir,
        &["deploy", &junk.to_string_lossy(), "--broker", &broker],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("refused"), "{out:?}");
}
