//! The test harness: real `redis-server` processes on free ports, really compiled plugins, the
//! `taskhost` binary driven as a user would, Python Celery from PyPI, and stand-in HTTP services.
//!
//! Every process a test starts is killed and reaped when its handle drops (and dies with the
//! test process if that is killed). Waits poll a real condition under one deadline and fail with
//! what they waited for; on a failing test the worker's log is printed.

pub mod bench;
mod beside;
mod certs;
mod feed;
mod http;
mod process;
mod python;
mod templates;

pub use beside::Beside;
pub use certs::Certs;
pub use feed::ResultFeed;
pub use http::{HttpStub, Reply, Request, get as http_get};
pub use process::{Output, Process, RedisServer, free_port, signal};
pub use python::{DEMO_CELERY_APP, python, python_in, python_on, run_snippet, run_snippet_in};
pub use templates::{source_plugin_wasm, template_wasm};

use base64::Engine as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Celery's ready states: a result in one of them no longer changes. Written here from
/// Celery's `celery.states.READY_STATES`, not taken from the host, so the tests check the host
/// against Celery and not against itself.
pub const READY_STATES: [&str; 3] = ["SUCCESS", "FAILURE", "REVOKED"];

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    // current_exe is <target>/<profile>/deps/<test binary>, or <target>/<profile>/<binary>
    // for a binary using the harness (the bench).
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            let profile_dir = if dir.file_name()? == "deps" {
                dir.parent()?
            } else {
                dir
            };
            profile_dir.parent().map(Path::to_path_buf)
        })
        .unwrap_or_else(|| root().join("target"))
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

struct Built {
    taskhost: PathBuf,
    plugins: PathBuf,
    test_plugins: PathBuf,
}

/// Builds the `taskhost` binary (in this test's profile) and the plugins (for wasm32-wasip2,
/// in release, as a plugin author builds them), once per test binary.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // No `-p`: the workspace's default members, as `cargo test` selects them, so features
        // unify the same way and the test run's own dependency builds are reused.
        let mut host = std::process::Command::new(&cargo);
        host.current_dir(root())
            .args(["build", "--bin", "taskhost"]);
        if profile() == "release" {
            host.arg("--release");
        }
        run_build(host, "the taskhost binary");
        let mut plugins = std::process::Command::new(&cargo);
        plugins.current_dir(root()).args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "demo",
            "-p",
            "crucible",
        ]);
        run_build(
            plugins,
            "the plugins (is the wasm32-wasip2 target installed?)",
        );
        let target = target_dir();
        let wasm = target.join("wasm32-wasip2").join("release");
        let test_plugins = target.join("test-plugins");
        std::fs::create_dir_all(&test_plugins).expect("create target/test-plugins");
        // Test plugins; `versioned` twice, as two versions of one plugin.
        for (features, from, to) in [
            ("", "wrongwit", "wrongwit"),
            ("", "legacy", "legacy"),
            ("", "hostile", "hostile"),
            ("", "versioned", "versioned-v1"),
            ("versioned/v2", "versioned", "versioned-v2"),
            ("versioned/nested", "versioned", "versioned-nested-v1"),
            (
                "versioned/nested,versioned/v2",
                "versioned",
                "versioned-nested-v2",
            ),
        ] {
            let mut build = std::process::Command::new(&cargo);
            build.current_dir(root()).args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                from,
            ]);
            if !features.is_empty() {
                build.args(["--features", features]);
            }
            run_build(build, &format!("the test plugin {to}"));
            let (src, dst) = (
                wasm.join(format!("{from}.wasm")),
                test_plugins.join(format!("{to}.wasm")),
            );
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy test plugin {to}: {e}"));
        }
        Built {
            taskhost: target.join(profile()).join("taskhost"),
            plugins: wasm,
            test_plugins,
        }
    })
}

fn run_build(mut command: std::process::Command, what: &str) {
    // `cargo test` gives the test process this package's CARGO_PKG_* and CARGO_MANIFEST_*;
    // build scripts that watch those (ring's does) would see a change and rebuild half the
    // tree, twice per run. The nested build gets the environment a shell would give it.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            command.env_remove(&*key);
        }
    }
    let status = command
        .env("CARGO_TARGET_DIR", target_dir())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {what}: {e}"));
    assert!(status.success(), "building {what} failed: {status}");
}

/// The code block of README.md that follows the line `<!-- NAME -->`: the README's examples
/// are run by the tests, so they stay true.
pub fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let marker = format!("<!-- {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no code block after {marker}"));
    body.split_once("```")
        .unwrap_or_else(|| panic!("unterminated code block after {marker}"))
        .0
        .to_owned()
}

/// The `taskhost` binary.
pub fn taskhost_bin() -> PathBuf {
    built().taskhost.clone()
}

/// The compiled plugin `name`: a Rust one (`demo`, `crucible`), or a Python one
/// (`crucible-py`: `plugins/NAME/app.py`).
pub fn plugin_wasm(name: &str) -> PathBuf {
    let source = root().join("plugins").join(name);
    if source.join("app.py").is_file() {
        return python_plugin_wasm(name, &source);
    }
    built().plugins.join(format!("{name}.wasm"))
}

/// A Python plugin, built by `taskhost build` as its author would (componentize-py installed
/// from PyPI into the build cache on first use); built again only when its sources, the Python
/// SDK or the WIT changed since.
fn python_plugin_wasm(name: &str, source: &Path) -> PathBuf {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = target_dir()
        .join("python-plugins")
        .join(format!("{name}.wasm"));
    let inputs = [
        source.to_path_buf(),
        root().join("plugins").join("sdk-python"),
        root().join("plugins").join("sdk-wit"),
        root().join("wit"),
    ];
    let built_at = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
    if built_at.is_some_and(|at| inputs.iter().all(|dir| newest_mtime(dir) <= at)) {
        return out;
    }
    let mut build = std::process::Command::new(taskhost_bin());
    build
        .arg("build")
        .arg(source)
        .arg("-o")
        .arg(&out)
        .env("TASKHOST_CACHE_DIR", target_dir().join("build-cache"));
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run taskhost build for {name}: {e}"));
    assert!(status.success(), "taskhost build {name} failed: {status}");
    out
}

/// The latest modification time of any file under `dir`.
fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(at) = std::fs::metadata(&path).and_then(|m| m.modified()) {
                newest = newest.max(at);
            }
        }
    }
    newest
}

/// A test plugin: `versioned-v1`, `versioned-v2` (one plugin serving demo.add and demo.echo,
/// reporting which build ran), `versioned-nested-v1`/`-v2` (the same serving demo.sub.add and
/// demo.sub.echo), `wrongwit` (built for a WIT version the host does not support),
/// `legacy` (built for taskhost:plugin@0.1.0, before `host.send`).
pub fn test_plugin_wasm(name: &str) -> PathBuf {
    built().test_plugins.join(format!("{name}.wasm"))
}

/// The version the host reports for a plugin file: declared version + SHA-256 prefix.
pub fn plugin_version(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read plugin");
    let digest: String = sha2::Sha256::digest(&bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}+{digest}", env!("CARGO_PKG_VERSION"))
}

/// The resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}

/// How a fault run ended: tasks sent, with a result, without one, and run to their end more
/// than once (counted from the results Redis published).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: usize,
    pub completed: usize,
    pub lost: usize,
    pub duplicated: usize,
}

impl Tally {
    /// Tallies `ids` against their stored results and what `feed` saw published. Take it once
    /// every worker has stopped: a second run still going when the first result landed would
    /// otherwise be missed.
    pub fn of(ids: &[String], results: &HashMap<String, Value>, feed: &ResultFeed) -> Self {
        Self {
            sent: ids.len(),
            completed: results.len(),
            lost: ids.len() - results.len(),
            duplicated: ids.iter().filter(|id| feed.endings(id) > 1).count(),
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} / completed {} / lost {} / duplicated {}",
            self.sent, self.completed, self.lost, self.duplicated
        )
    }
}

/// A fresh directory for one test, removed when dropped (kept if the test fails).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<target>/test-runs/<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = target_dir().join("test-runs").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A plugin directory holding copies of the named plugins.
    pub fn plugins(&self, names: &[&str]) -> PathBuf {
        let dir = self.path.join("plugins");
        std::fs::create_dir_all(&dir).expect("create plugin dir");
        for name in names {
            std::fs::copy(plugin_wasm(name), dir.join(format!("{name}.wasm")))
                .unwrap_or_else(|e| panic!("copy plugin {name}: {e}"));
        }
        dir
    }

    /// Writes a file into the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Pauses the thread driving traffic for `interval`: the rhythm of a producer, a slow writer
/// or a fault injector a test runs. Never a wait for the system under test: that is
/// [`wait_for`], which polls a real condition under a deadline.
pub fn pace(interval: Duration) {
    std::thread::sleep(interval); // the rhythm of what the test drives, not a poll
}

/// The messages crash recovery has returned to their queues on `conn`'s Redis: each return
/// counts the message in `taskhost:redelivered:<delivery tag>`, so none means no task was taken
/// from a worker for dead.
pub fn returned_by_recovery(conn: &mut redis::Connection) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("taskhost:redelivered:*")
        .query(conn)
        .expect("KEYS taskhost:redelivered:*")
}

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`] with `what`.
pub fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_for_within(what, WAIT, check)
}

/// [`wait_for`] with a bound of its own, for long runs.
pub fn wait_for_within<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    let mut poll_interval = Duration::from_millis(2);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(poll_interval);
        poll_interval = (poll_interval * 2).min(Duration::from_millis(50));
    }
}

/// A protocol-v2 task message as Celery 5.7's `send_task` builds it (see
/// `tests/fixtures/task_message_delay.json`), written independently of the host's encoder.
pub fn celery_message(id: &str, task: &str, args: Value, kwargs: Value, queue: &str) -> String {
    let body =
        json!([args, kwargs, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": id, "shadow": null, "eta": null, "expires": null,
            "group": null, "group_index": null, "retries": 0, "timelimit": [null, null],
            "root_id": id, "parent_id": null, "argsrepr": args.to_string(),
            "kwargsrepr": kwargs.to_string(), "origin": "gen1@test", "ignore_result": false,
            "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}
        },
        "properties": {
            "correlation_id": id, "reply_to": uuid::Uuid::new_v4().to_string(),
            "delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string()
        }
    })
    .to_string()
}

/// Whether a stored result document is in a ready state.
pub fn is_ready(doc: &Value) -> bool {
    doc["status"]
        .as_str()
        .is_some_and(|s| READY_STATES.contains(&s))
}

/// A producer and result reader on a test Redis: broker db 0, backend db 1 (as the worker
/// started by [`Process::worker`] uses them).
pub struct Client {
    broker: redis::Connection,
    backend: redis::Connection,
}

impl Client {
    pub fn new(redis: &RedisServer) -> Self {
        Self {
            broker: redis.conn(0),
            backend: redis.conn(1),
        }
    }

    /// A client of a worker whose broker and backend are both db 0.
    pub fn on_one_database(redis: &RedisServer) -> Self {
        Self {
            broker: redis.conn(0),
            backend: redis.conn(0),
        }
    }

    /// Sends `task(*args)` to the `celery` queue; returns the task id.
    pub fn send(&mut self, task: &str, args: Value) -> String {
        self.send_to("celery", task, args, json!({}))
    }

    /// Sends `task(*args, **kwargs)` to `queue`; returns the task id.
    pub fn send_to(&mut self, queue: &str, task: &str, args: Value, kwargs: Value) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.push_raw(
            queue,
            celery_message(&id, task, args, kwargs, queue).as_bytes(),
        );
        id
    }

    /// Sends `task(*args)` to `celery` under the task id `id`.
    pub fn send_as(&mut self, id: &str, task: &str, args: Value) {
        self.push_raw(
            "celery",
            celery_message(id, task, args, json!({}), "celery").as_bytes(),
        );
    }

    /// Sends `task(*args)` to `celery` with time limits (soft, hard) in seconds, in Celery's
    /// `timelimit` header.
    pub fn send_with_time_limit(
        &mut self,
        task: &str,
        args: Value,
        time_limit: (Option<f64>, Option<f64>),
    ) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let message = celery_message(&id, task, args, json!({}), "celery");
        let mut message: Value = serde_json::from_str(&message).expect("message is JSON");
        // Celery's order on the wire: [hard, soft].
        message["headers"]["timelimit"] = json!([time_limit.1, time_limit.0]);
        self.push_raw("celery", message.to_string().as_bytes());
        id
    }

    /// Pushes raw bytes onto a queue list, as a producer's LPUSH.
    pub fn push_raw(&mut self, queue: &str, bytes: &[u8]) {
        redis::cmd("LPUSH")
            .arg(queue)
            .arg(bytes)
            .query::<()>(&mut self.broker)
            .expect("LPUSH");
    }

    /// The task's stored state, if any.
    pub fn state(&mut self, id: &str) -> Option<Value> {
        let doc: Option<String> = redis::cmd("GET")
            .arg(format!("celery-task-meta-{id}"))
            .query(&mut self.backend)
            .expect("GET result");
        doc.map(|d| serde_json::from_str(&d).expect("result is JSON"))
    }

    /// Waits until the task is in a ready state and returns its stored document.
    pub fn result(&mut self, id: &str) -> Value {
        wait_for(&format!("the result of task {id}"), || {
            self.state(id).filter(is_ready)
        })
    }

    /// Sends `task(args)`, waits for its result, checks it succeeded and returns the result.
    pub fn success(&mut self, task: &str, args: Value) -> Value {
        let id = self.send(task, args);
        let doc = self.result(&id);
        assert_eq!(doc["status"], "SUCCESS", "{task}: {doc}");
        doc["result"].clone()
    }

    /// The dead-letter entries, newest first.
    pub fn dead_letters(&mut self) -> Vec<Value> {
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg("taskhost:dead")
            .arg(0)
            .arg(-1)
            .query(&mut self.broker)
            .expect("LRANGE dead letters");
        entries
            .iter()
            .map(|e| serde_json::from_str(e).expect("dead letter is JSON"))
            .collect()
    }

    /// Size of a sorted set on the broker.
    pub fn zcard(&mut self, key: &str) -> usize {
        redis::cmd("ZCARD")
            .arg(key)
            .query(&mut self.broker)
            .expect("ZCARD")
    }

    /// Waits until every task in `ids` has a final result, or `within` has passed; returns the
    /// results found and the ids still without one.
    pub fn results(
        &mut self,
        ids: &[String],
        within: Duration,
    ) -> (HashMap<String, Value>, Vec<String>) {
        let deadline = Instant::now() + within;
        let mut done = HashMap::new();
        let mut pending: Vec<String> = ids.to_vec();
        loop {
            let mut still = Vec::new();
            for chunk in pending.chunks(500) {
                let keys: Vec<String> = chunk
                    .iter()
                    .map(|id| format!("celery-task-meta-{id}"))
                    .collect();
                let docs: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query(&mut self.backend)
                    .expect("MGET results");
                for (id, doc) in chunk.iter().zip(docs) {
                    let doc: Option<Value> = doc.and_then(|d| serde_json::from_str(&d).ok());
                    match doc {
                        Some(doc) if is_ready(&doc) => {
                            done.insert(id.clone(), doc);
                        }
                        _ => still.push(id.clone()),
                    }
                }
            }
            pending = still;
            if pending.is_empty() || Instant::now() > deadline {
                return (done, pending);
            }
            let poll_interval = Duration::from_millis(50);
            std::thread::sleep(poll_interval);
        }
    }

    /// Runs a raw Redis command on the broker.
    pub fn broker(&mut self) -> &mut redis::Connection {
        &mut self.broker
    }

    /// Messages in worker `node`'s in-flight lists (every queue it fetched from).
    pub fn in_flight(&mut self, node: &str) -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("taskhost:inflight:{node}:*"))
            .query(&mut self.broker)
            .expect("KEYS in-flight lists");
        keys.iter().map(|k| self.llen(k)).sum()
    }

    /// Worker `node`'s entry in the worker registry (`taskhost:workers`), if it has one.
    pub fn registry_entry(&mut self, node: &str) -> Option<Value> {
        let entry: Option<String> = redis::cmd("HGET")
            .arg("taskhost:workers")
            .arg(node)
            .query(&mut self.broker)
            .expect("HGET worker registry");
        entry.map(|e| serde_json::from_str(&e).expect("a registry entry is JSON"))
    }

    /// Length of a list on the broker.
    pub fn llen(&mut self, key: &str) -> usize {
        redis::cmd("LLEN")
            .arg(key)
            .query(&mut self.broker)
            .expect("LLEN")
    }
}
