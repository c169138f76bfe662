//! Fleet deploys: `taskhost deploy` / `rollback` reach every worker started with `--fleet`,
//! including one that joins later; `taskhost deployments` shows what each runs.
//!
//! Which build a worker runs is read from Redis: the report each worker keeps of the plugin
//! versions it runs (`taskhost:running:<node>`), and the result of a task that says which build
//! ran it.

use serde_json::json;
use std::path::Path;
use std::process::ExitStatus;
use taskhost_tests::{Client, Process, RedisServer, TestDir, plugin_version, test_plugin_wasm};

/// What a finished `taskhost` command printed.
#[derive(Debug)]
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// A Redis, fleet workers started on it, and the fleet commands.
struct Fleet {
    dir: TestDir,
    redis: RedisServer,
    client: Client,
    workers: Vec<Process>,
}

/// A fleet with a worker per queue in `queues` (node `<queue>@fleet`), each with its own,
/// initially empty, plugin directory.
fn fleet(name: &str, queues: &[&str]) -> Fleet {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let client = Client::new(&redis);
    let mut fleet = Fleet {
        dir,
        redis,
        client,
        workers: Vec::new(),
    };
    for queue in queues {
        fleet.join(queue);
    }
    fleet
}

impl Fleet {
    /// Starts a fleet worker consuming `queue`, as node `<queue>@fleet`.
    fn join(&mut self, queue: &str) {
        let plugins = self.dir.path().join(format!("plugins-{queue}"));
        std::fs::create_dir_all(&plugins).expect("plugin dir");
        let node = format!("{queue}@fleet");
        self.workers.push(Process::worker_logged(
            &self.dir,
            &format!("{queue}.log"),
            &self.redis,
            &plugins,
            &["--fleet", "-Q", queue, "-n", &node],
        ));
    }

    /// `taskhost ARGS --broker <the fleet's Redis>`.
    fn run(&self, args: &[&str]) -> Out {
        let broker = self.redis.url(0);
        let mut all = args.to_vec();
        all.extend_from_slice(&["--broker", &broker]);
        let out = Process::run(&self.dir, &all);
        Out {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    /// `taskhost deploy <file> --name demo`, which must succeed.
    fn deploy(&self, file: &Path) {
        let out = self.run(&["deploy", &file.to_string_lossy(), "--name", "demo"]);
        assert!(out.status.success(), "{out:?}");
        assert!(out.stdout.contains("deployed demo version"), "{out:?}");
    }

    /// `taskhost rollback demo`, which must succeed.
    fn rollback(&self) {
        let out = self.run(&["rollback", "demo"]);
        assert!(
            out.status.success() && out.stdout.starts_with("rolled back demo"),
            "{out:?}"
        );
    }

    /// Waits until each worker consuming one of `queues` reports running `file` as demo.
    fn wait_running(&mut self, queues: &[&str], file: &Path) {
        let version = plugin_version(file);
        for queue in queues {
            let key = format!("taskhost:running:{queue}@fleet");
            taskhost_tests::wait_for(&format!("{queue}@fleet to run demo {version}"), || {
                let running: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("demo")
                    .query(self.client.broker())
                    .expect("HGET running plugins");
                (running.as_deref() == Some(version.as_str())).then_some(())
            });
        }
    }

    /// Which build serves each of `queues`: the version a `demo.add` sent to it reports.
    fn versions(&mut self, queues: &[&str]) -> Vec<String> {
        queues
            .iter()
            .map(|q| {
                let id = self.client.send_to(q, "demo.add", json!([1, 2]), json!({}));
                let doc = self.client.result(&id);
                assert_eq!(doc["result"]["sum"], 3, "{doc}");
                doc["result"]["version"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }
}

const QUEUES: [&str; 3] = ["w1", "w2", "w3"];

#[test]
fn a_deploy_reaches_every_fleet_worker() {
    let mut f = fleet("fleet-deploy", &QUEUES);
    let v1 = test_plugin_wasm("versioned-v1");
    f.deploy(&v1);
    f.wait_running(&QUEUES, &v1);
    assert_eq!(f.versions(&QUEUES), ["v1", "v1", "v1"]);
}

#[test]
fn a_new_deploy_replaces_the_version_on_every_worker() {
    let mut f = fleet("fleet-replace", &QUEUES);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    f.deploy(&v1);
    f.wait_running(&QUEUES, &v1);
    f.deploy(&v2);
    f.wait_running(&QUEUES, &v2);
    assert_eq!(f.versions(&QUEUES), ["v2", "v2", "v2"]);
}

#[test]
fn a_rollback_returns_every_worker_to_the_previous_version() {
    let mut f = fleet("fleet-rollback", &QUEUES);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    f.deploy(&v1);
    f.deploy(&v2);
    f.wait_running(&QUEUES, &v2);
    f.rollback();
    f.wait_running(&QUEUES, &v1);
    assert_eq!(f.versions(&QUEUES), ["v1", "v1", "v1"]);
}

#[test]
fn a_worker_joining_later_runs_the_current_version() {
    let mut f = fleet("fleet-late", &[]);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    // Current after these: v1, though v2 was deployed last.
    f.deploy(&v1);
    f.deploy(&v2);
    f.rollback();
    f.join("w4");
    f.wait_running(&["w4"], &v1);
    assert_eq!(f.versions(&["w4"]), ["v1"]);
}

#[test]
fn deployments_shows_what_each_worker_runs() {
    let mut f = fleet("fleet-deployments", &QUEUES);
    let v1 = test_plugin_wasm("versioned-v1");
    f.deploy(&v1);
    f.wait_running(&QUEUES, &v1);
    let out = f.run(&["deployments"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("demo  sha256"), "{}", out.stdout);
    for node in ["w1@fleet", "w2@fleet", "w3@fleet"] {
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
}

#[test]
fn a_rollback_with_nothing_earlier_to_return_to_is_refused() {
    let f = fleet("fleet-rollback-refused", &[]);
    f.deploy(&test_plugin_wasm("versioned-v1"));
    f.deploy(&test_plugin_wasm("versioned-v2"));
    f.rollback();
    // Back at the first version: nothing earlier.
    let out = f.run(&["rollback", "demo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("no earlier deployed version"),
        "{out:?}"
    );
}

#[test]
fn a_file_that_is_no_plugin_is_refused_before_it_reaches_the_fleet() {
    let mut f = fleet("fleet-junk", &[]);
    let junk = f.dir.write("junk.wasm", "not a component");
    let out = f.run(&["deploy", &junk.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("refused"), "{out:?}");
    let deployed: usize = redis::cmd("HLEN")
        .arg("taskhost:deployed")
        .query(f.client.broker())
        .expect("HLEN deployed");
    assert_eq!(deployed, 0, "nothing deployed");
}
