//! Fleet deploys: `taskhost deploy` / `rollback` reach every worker started with `--fleet`,
//! including one that joins later; `taskhost deployments` shows what each runs.
//!
//! Which build a worker runs is read from Redis: the report each worker keeps of the plugin
//! versions it runs (`taskhost:running:<node>`), and the result of a task that says which build
//! ran it.

use serde_json::{Value, json};
use std::path::Path;
use std::process::ExitStatus;
use taskhost_tests::{
    Beside, Client, Process, RedisServer, TestDir, plugin_version, test_plugin_wasm, wait_for,
};

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

// --- signed deploys -------------------------------------------------------------------------

/// `taskhost keygen <dir>/<name>.key`; the public key it printed.
fn keygen(dir: &TestDir, name: &str) -> (String, String) {
    let path = dir.path().join(format!("{name}.key"));
    let out = Process::run(dir, &["keygen", &path.to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    let public = std::fs::read_to_string(format!("{}.pub", path.display())).expect("public key");
    assert!(out.stdout.contains(public.trim()), "{out:?}");
    (
        path.to_string_lossy().into_owned(),
        public.trim().to_owned(),
    )
}

#[test]
fn only_a_deploy_signed_by_a_trusted_key_installs_on_three_fleet_workers() {
    let dir = TestDir::new("fleet-signed");
    let redis = RedisServer::start(&dir);
    let (trusted, public) = keygen(&dir, "trusted");
    let (untrusted, _) = keygen(&dir, "untrusted");
    let config = dir.write(
        "taskhost.toml",
        &format!("[fleet]\ntrusted_keys = [{public:?}]\n"),
    );
    let config = config.to_string_lossy().into_owned();
    // Three fleet workers consuming `celery`, each serving demo from its own directory.
    let workers: Vec<Process> = (1..=3)
        .map(|n| {
            let plugins = dir.path().join(format!("plugins-{n}"));
            std::fs::create_dir_all(&plugins).expect("plugin dir");
            std::fs::copy(
                taskhost_tests::plugin_wasm("demo"),
                plugins.join("demo.wasm"),
            )
            .expect("demo");
            let node = format!("s{n}@fleet");
            let args = ["--fleet", "-n", node.as_str(), "--config", config.as_str()];
            Process::worker_logged(&dir, &format!("s{n}.log"), &redis, &plugins, &args)
        })
        .collect();
    let mut client = Client::new(&redis);
    let beside = Beside::start(&redis);
    let legacy = test_plugin_wasm("legacy");
    let legacy = legacy.to_string_lossy().into_owned();
    let deploy = |extra: &[&str]| {
        let broker = redis.url(0);
        let mut args = vec!["deploy", legacy.as_str(), "--broker", broker.as_str()];
        args.extend_from_slice(extra);
        let out = Process::run(&dir, &args);
        assert!(out.status.success(), "{out:?}");
    };
    // Unsigned, then signed by a key no worker trusts: each worker refuses, saying why.
    deploy(&[]);
    for w in &workers {
        w.wait_log("fleet deploy refused, the running version stays: the deploy is not signed");
    }
    deploy(&["--sign-key", &untrusted]);
    for w in &workers {
        w.wait_log("which is not among [fleet] trusted_keys");
    }
    for n in 1..=3 {
        let running: Option<String> = redis::cmd("HGET")
            .arg(format!("taskhost:running:s{n}@fleet"))
            .arg("legacy")
            .query(client.broker())
            .expect("HGET running plugins");
        assert_eq!(running, None, "s{n} installed a refused deploy");
    }
    // Signed by the trusted key: every worker installs it.
    deploy(&["--sign-key", &trusted]);
    let version = plugin_version(Path::new(&legacy));
    for n in 1..=3 {
        let key = format!("taskhost:running:s{n}@fleet");
        taskhost_tests::wait_for(&format!("s{n} to run legacy {version}"), || {
            let running: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg("legacy")
                .query(client.broker())
                .expect("HGET running plugins");
            (running.as_deref() == Some(version.as_str())).then_some(())
        });
    }
    let id = client.send("legacy.add", json!([20, 22]));
    assert_eq!(client.result(&id)["result"], 42);
    beside.all_succeed(&mut client, 20);
}

/// One `--fleet` worker (node `one@fleet`, empty directory) trusting a key of its own (unless
/// not `trusting`), with `extra` in its `[fleet]` section.
struct SignedFleet {
    worker: Process,
    client: Client,
    redis: RedisServer,
    /// The trusted secret key's path.
    key: String,
    dir: TestDir,
}

fn signed_fleet(name: &str, extra: &str, trusting: bool) -> SignedFleet {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let (key, public) = keygen(&dir, "trusted");
    let trusted = if trusting {
        format!("trusted_keys = [{public:?}]\n")
    } else {
        String::new()
    };
    let config = dir.write("taskhost.toml", &format!("[fleet]\n{trusted}{extra}"));
    let config = config.to_string_lossy().into_owned();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    let args = ["--fleet", "-n", "one@fleet", "--config", config.as_str()];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    let client = Client::new(&redis);
    SignedFleet {
        worker,
        client,
        redis,
        key,
        dir,
    }
}

impl SignedFleet {
    /// `taskhost COMMAND ARGS --broker .. --sign-key <trusted>`, which must succeed.
    fn signed(&self, args: &[&str]) {
        let broker = self.redis.url(0);
        let mut all = args.to_vec();
        all.extend_from_slice(&["--broker", &broker, "--sign-key", &self.key]);
        let out = Process::run(&self.dir, &all);
        assert!(out.status.success(), "{out:?}");
    }

    fn deploy_demo(&self, file: &Path) {
        self.signed(&["deploy", &file.to_string_lossy(), "--name", "demo"]);
    }

    /// Deploys `file` as demo, signed by the trusted key on a clock `skew_ms` off.
    fn deploy_demo_signed_at(&self, file: &Path, skew_ms: i64) {
        let broker = self.redis.url(0);
        let file = file.to_string_lossy();
        let args = [
            "deploy",
            &*file,
            "--name",
            "demo",
            "--broker",
            &broker,
            "--sign-key",
            &self.key,
        ];
        let mut command = Process::command(&self.dir, &args);
        command.env("TASKHOST_TEST_CLOCK_SKEW_MS", skew_ms.to_string());
        let out = Process::run_command(&self.dir, command);
        assert!(out.status.success(), "{out:?}");
    }

    /// The version `name` runs on the worker, if any.
    fn running(&mut self, name: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg("taskhost:running:one@fleet")
            .arg(name)
            .query(self.client.broker())
            .expect("HGET running plugins")
    }

    /// Waits until the worker reports running `file` as `name`.
    fn wait_running(&mut self, name: &str, file: &Path) {
        let version = plugin_version(file);
        taskhost_tests::wait_for(&format!("one@fleet to run {name} {version}"), || {
            let running: Option<String> = redis::cmd("HGET")
                .arg("taskhost:running:one@fleet")
                .arg(name)
                .query(self.client.broker())
                .expect("HGET running plugins");
            (running.as_deref() == Some(version.as_str())).then_some(())
        });
    }

    /// Points `name`'s deployment at `digest` with `record`, as a Redis writer could, and
    /// announces it.
    fn forge(&mut self, name: &str, digest: &str, record: Option<&str>) {
        let conn = self.client.broker();
        let () = redis::cmd("HSET")
            .arg("taskhost:deployed")
            .arg(name)
            .arg(digest)
            .query(conn)
            .expect("HSET deployed");
        if let Some(record) = record {
            let () = redis::cmd("HSET")
                .arg("taskhost:deploy-records")
                .arg(name)
                .arg(record)
                .query(conn)
                .expect("HSET record");
        }
        let () = redis::cmd("PUBLISH")
            .arg("/0.taskhost:deploy")
            .arg(json!({"name": name, "sha256": digest, "action": "deploy"}).to_string())
            .query(conn)
            .expect("PUBLISH notice");
    }

    fn record(&mut self, name: &str) -> String {
        redis::cmd("HGET")
            .arg("taskhost:deploy-records")
            .arg(name)
            .query(self.client.broker())
            .expect("a signed record")
    }
}

#[test]
fn an_older_signed_deploy_replayed_over_a_newer_one_is_refused() {
    let mut f = signed_fleet("fleet-replay", "", true);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    f.deploy_demo(&v1);
    f.wait_running("demo", &v1);
    let old_record = f.record("demo");
    let old: Value = serde_json::from_str(&old_record).expect("record is JSON");
    f.deploy_demo(&v2);
    f.wait_running("demo", &v2);
    let digest = old["sha256"].as_str().expect("digest").to_owned();
    f.forge("demo", &digest, Some(&old_record));
    f.worker.wait_log("is older");
    f.wait_running("demo", &v2);
}

#[test]
fn a_signed_rollback_installs_the_earlier_version() {
    let mut f = signed_fleet("fleet-signed-rollback", "", true);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    f.deploy_demo(&v1);
    f.wait_running("demo", &v1);
    f.deploy_demo(&v2);
    f.wait_running("demo", &v2);
    f.signed(&["rollback", "demo"]);
    f.wait_running("demo", &v1);
}

#[test]
fn a_name_outside_fleet_names_is_not_installed() {
    let mut f = signed_fleet("fleet-names", "names = [\"crucible\"]\n", true);
    let legacy = test_plugin_wasm("legacy");
    f.signed(&["deploy", &legacy.to_string_lossy()]);
    f.worker.wait_log("the name is not among [fleet] names");
    let running: Option<String> = redis::cmd("HGET")
        .arg("taskhost:running:one@fleet")
        .arg("legacy")
        .query(f.client.broker())
        .expect("HGET running plugins");
    assert_eq!(running, None);
}

#[test]
fn a_blob_over_the_size_cap_is_refused_without_fetching_it() {
    let mut f = signed_fleet("fleet-blob-cap", "max_blob_mb = 1\n", false);
    let digest = "f".repeat(64);
    let blob_key = format!("taskhost:plugin-blob:{digest}");
    let () = redis::cmd("SET")
        .arg(&blob_key)
        .arg(vec![0u8; 2 << 20])
        .query(f.client.broker())
        .expect("SET a 2 MiB blob");
    // Every command Redis runs, as Redis saw it.
    let mut command = std::process::Command::new("redis-cli");
    command.args(["-p", &f.redis.port().to_string(), "monitor"]);
    let monitor = Process::spawn(&f.dir, "monitor.log", command);
    monitor.wait_log("OK");
    // Unsigned, with no trusted keys: only the cap stands between it and the directory.
    f.forge("big", &digest, None);
    // Redis shows commands as the client spelled them.
    let strlen = format!("\"strlen\" \"{blob_key}\"");
    wait_for("the worker to measure the blob", || {
        monitor.log().to_lowercase().contains(&strlen).then_some(())
    });
    // A deploy after it is installed once the follower is past the big one.
    let v1 = test_plugin_wasm("versioned-v1");
    f.deploy_demo(&v1);
    f.wait_running("demo", &v1);
    let seen = monitor.log();
    // Its log holds the other deploy's blob: not to be printed if an assertion fails.
    drop(monitor);
    let on_blob: Vec<String> = seen
        .lines()
        .filter(|line| line.contains(&blob_key))
        .map(|line| {
            let command = line.split_once(']').map_or(line, |(_, c)| c);
            command.trim().to_lowercase()
        })
        .collect();
    // Measured, or removed; never read.
    let unread = ["\"strlen\"", "\"exists\"", "\"del\"", "\"unlink\""];
    assert!(
        on_blob
            .iter()
            .all(|c| unread.iter().any(|u| c.starts_with(u))),
        "the blob was read: {on_blob:?}"
    );
    assert!(
        !f.dir.path().join("plugins").join("big.wasm").exists(),
        "nothing was written"
    );
}

#[test]
fn a_fresh_worker_refuses_a_signed_record_older_than_max_record_age() {
    let mut f = signed_fleet("fleet-record-age", "max_record_age = \"1d\"\n", true);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    // A record signed two days ago, put back by a Redis writer: this worker never saw a newer
    // one, and refuses it on its age alone.
    f.deploy_demo_signed_at(&v1, -2 * 86_400_000);
    f.worker.wait_log("max_record_age");
    assert_eq!(f.running("demo"), None, "the old record was installed");
    f.deploy_demo(&v2);
    f.wait_running("demo", &v2);
}

#[test]
fn a_trusted_key_removed_by_a_config_reload_installs_nothing_more() {
    let mut f = signed_fleet("fleet-key-removed", "", true);
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    f.deploy_demo(&v1);
    f.wait_running("demo", &v1);
    // The key is compromised: the operator trusts another one instead.
    let (_, other) = keygen(&f.dir, "replacement");
    f.dir.write(
        "taskhost.toml",
        &format!("[fleet]\ntrusted_keys = [{other:?}]\n"),
    );
    f.worker.wait_log("config reloaded");
    f.deploy_demo(&v2);
    f.worker.wait_log("which is not among [fleet] trusted_keys");
    f.wait_running("demo", &v1);
}

#[test]
fn a_fleet_worker_without_trusted_keys_says_anyone_who_can_write_to_redis_can_deploy() {
    let f = signed_fleet("fleet-no-keys", "", false);
    // The warning is the behaviour under test: an operator reads it in the log.
    f.worker
        .wait_log("no [fleet] trusted_keys, so anyone who can write to Redis can deploy code");
    let trusting = signed_fleet("fleet-keys", "", true);
    trusting.worker.wait_log("worker ready");
    assert!(
        !trusting
            .worker
            .log()
            .contains("anyone who can write to Redis"),
        "a worker with trusted keys warned"
    );
}
