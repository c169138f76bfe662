//! The command line as a user meets it: `exec`, `plugins`, `dev` with `call`, `dead`, and clear
//! errors. What a command prints and its exit status are the behaviour under test here; what a
//! worker did is read from Redis.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use taskhost_tests::{
    Client, Process, RedisServer, TestDir, plugin_wasm, test_plugin_wasm, wait_for,
};

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// What a finished `taskhost` command printed.
#[derive(Debug)]
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `taskhost ARGS` in `dir` to completion.
fn run(dir: &TestDir, args: &[&str]) -> Out {
    let out = Process::run(dir, args);
    Out {
        status: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

/// A loopback Redis URL nothing listens on.
fn unreachable_redis() -> String {
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    format!("redis://127.0.0.1:{dead_port}/0")
}

// --- exec -----------------------------------------------------------------------------------

/// `taskhost exec <demo.wasm> ARGS`, in a fresh directory.
fn exec_demo(args: &[&str]) -> Out {
    let dir = TestDir::new("exec");
    let demo = path(&plugin_wasm("demo"));
    let mut all = vec!["exec", &demo];
    all.extend_from_slice(args);
    run(&dir, &all)
}

#[test]
fn exec_runs_one_task_locally_and_prints_its_result() {
    let out = exec_demo(&["demo.add", "--args", "[2, 3]"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "5");
}

#[test]
fn a_plugin_built_for_an_earlier_minor_wit_version_still_runs() {
    let dir = TestDir::new("exec-legacy");
    let legacy = path(&test_plugin_wasm("legacy"));
    let out = run(&dir, &["exec", &legacy, "legacy.add", "--args", "[2, 3]"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "5");
}

#[test]
fn exec_of_a_task_that_sends_tasks_says_sending_needs_a_worker() {
    let out = exec_demo(&["demo.fanout", "--args", "[1]"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("needs a worker"), "{out:?}");
}

#[test]
fn exec_binds_keyword_arguments() {
    let out = exec_demo(&["demo.echo", "--kwargs", r#"{"value": {"a": [1, null]}}"#]);
    assert_eq!(out.stdout.trim(), r#"{"a":[1,null]}"#, "{out:?}");
}

#[test]
fn exec_reports_a_bad_argument_as_a_type_error_and_exits_1() {
    let out = exec_demo(&["demo.add", "--args", r#"[2, "x"]"#]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("TypeError") && out.stderr.contains("argument 'y'"),
        "{out:?}"
    );
}

#[test]
fn exec_reports_a_task_failure_in_one_line_and_exits_1() {
    let out = exec_demo(&["demo.fail", "--args", r#"["nope"]"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.trim(), "FAILURE RuntimeError: nope");
}

#[test]
fn exec_exits_3_when_the_task_asks_for_a_retry_and_says_how_to_run_it() {
    let out = exec_demo(&["demo.retry", "--args", "[1]"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a retry request has its own exit code: {out:?}"
    );
    assert!(out.stderr.contains("--retries 1"), "{out:?}");
}

#[test]
fn exec_with_retries_runs_that_try() {
    let out = exec_demo(&["demo.retry", "--args", "[1]", "--retries", "1"]);
    assert_eq!(out.stdout.trim(), "1", "{out:?}");
}

#[test]
fn exec_of_an_unknown_task_names_the_tasks_the_plugin_serves() {
    let out = exec_demo(&["demo.nothing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("does not serve task \"demo.nothing\"")
            && out.stderr.contains("demo.add"),
        "{out:?}"
    );
}

// --- plugins --------------------------------------------------------------------------------

/// crucible's grant of the Celery service's task names, as in the repository's taskhost.toml;
/// written into a test's directory, where the commands run and read it.
const CRUCIBLE_GRANT: &str = "[plugins.crucible]\ntasks = [\"tasks.*\"]\n";

#[test]
fn plugins_lists_each_plugin_with_its_tasks() {
    let dir = TestDir::new("plugins-cmd");
    let plugins = dir.plugins(&["demo", "crucible"]);
    dir.write("taskhost.toml", CRUCIBLE_GRANT);
    let out = run(&dir, &["plugins", &path(&plugins)]);
    assert!(out.status.success(), "{out:?}");
    for expected in [
        "demo  version",
        "wit taskhost:plugin@0.1.1",
        "demo.add",
        "tasks.evaluate_code",
        "max_retries=3",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} missing:\n{}",
            out.stdout
        );
    }
}

#[test]
fn plugins_refuses_what_is_not_a_plugin_and_still_lists_the_rest() {
    let dir = TestDir::new("plugins-refused");
    let plugins = dir.plugins(&["demo", "crucible"]);
    dir.write("taskhost.toml", CRUCIBLE_GRANT);
    std::fs::write(plugins.join("junk.wasm"), b"\0asm but not really").expect("write junk");
    let bytes = std::fs::read(plugin_wasm("demo")).expect("read demo");
    std::fs::write(plugins.join("truncated.wasm"), &bytes[..bytes.len() / 2])
        .expect("write truncated");
    let out = run(&dir, &["plugins", &path(&plugins)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("junk.wasm  REFUSED: not a WebAssembly component"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("truncated.wasm  REFUSED"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("demo.add"),
        "good plugins still listed:\n{}",
        out.stdout
    );
}

// --- dev and call ---------------------------------------------------------------------------

/// `taskhost dev` with the demo plugin, once its worker is ready. Its private Redis is found
/// by `call` through the state file `dev` writes (`TASKHOST_DEV_STATE`, private to the test).
fn start_dev(name: &str) -> (TestDir, Process) {
    let dir = TestDir::new(name);
    let plugins = dir.plugins(&["demo"]);
    let dev = Process::spawn(
        &dir,
        "dev.log",
        Process::command(&dir, &["dev", "--plugins", &path(&plugins)]),
    );
    // As `Process::worker` waits for a worker: dev's Redis is private until then.
    dev.wait_log("worker ready");
    (dir, dev)
}

/// The broker URL `dev` wrote into its state file.
fn dev_broker(dir: &TestDir) -> String {
    let state = std::fs::read_to_string(dir.path().join("dev-state.json")).expect("dev state file");
    let state: serde_json::Value = serde_json::from_str(&state).expect("state is JSON");
    state["broker_url"].as_str().expect("broker url").to_owned()
}

const CALL_ADD: [&str; 5] = ["call", "demo.add", "--args", "[2,3]", "--wait"];

#[test]
fn dev_tells_the_user_how_to_send_it_a_task() {
    let (_dir, dev) = start_dev("dev-hint");
    // The behaviour under test is the hint dev prints for its user, so it is read from the log.
    assert!(
        dev.log().contains("call demo.add --args '[2,3]' --wait"),
        "{}",
        dev.log()
    );
}

#[test]
fn call_finds_the_redis_dev_started() {
    let (dir, dev) = start_dev("dev-call");
    let out = run(&dir, &CALL_ADD);
    assert!(out.status.success(), "{out:?}\n{}", dev.log());
    assert_eq!(out.stdout.trim(), "5");
}

#[test]
fn dev_stopped_with_ctrl_c_exits_cleanly_and_removes_its_state_file() {
    let (dir, mut dev) = start_dev("dev-stop");
    let status = dev.stop_with(libc::SIGINT);
    assert!(status.success(), "{status}");
    assert!(
        !dir.path().join("dev-state.json").exists(),
        "state file removed on exit"
    );
}

#[test]
fn dev_stopped_by_a_terminals_ctrl_c_stops_without_a_warning() {
    let dir = TestDir::new("dev-terminal");
    let plugins = dir.plugins(&["demo"]);
    let mut command = Process::command(&dir, &["dev", "--plugins", &path(&plugins)]);
    // As a shell runs a foreground job: a process group of its own, which Ctrl-C signals whole.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut dev = Process::spawn(&dir, "dev.log", command);
    dev.wait_log("worker ready");
    let status = dev.stop_group_with(libc::SIGINT);
    assert!(status.success(), "{status}");
    // What the user sees at the terminal is the behaviour under test: had the private Redis
    // been stopped by the same Ctrl-C, the worker would warn that it could not leave the
    // registry or return its messages.
    let log = dev.log();
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

#[test]
fn dev_stopped_takes_its_redis_server_with_it() {
    let (dir, mut dev) = start_dev("dev-stop-redis");
    let url = dev_broker(&dir);
    assert!(dev.stop_with(libc::SIGINT).success());
    wait_for("the private redis-server to be gone", || {
        redis::Client::open(url.as_str())
            .ok()
            .and_then(|c| c.get_connection().err())
            .map(|_| ())
    });
}

#[test]
fn call_after_dev_stopped_says_there_is_no_broker() {
    let (dir, mut dev) = start_dev("dev-gone");
    assert!(dev.stop_with(libc::SIGINT).success());
    let out = run(&dir, &CALL_ADD);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("no broker"), "{out:?}");
}

// --- errors ---------------------------------------------------------------------------------

/// Runs `taskhost ARGS` and checks it failed with exit 1 and one line, `error: ...`, holding
/// `expected`, and no panic.
fn assert_one_clear_error(dir: &TestDir, args: &[&str], expected: &str) {
    let out = run(dir, args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
    let line = out.stderr.trim();
    assert!(
        line.starts_with("error: ") && line.contains(expected),
        "{args:?}: {line}"
    );
    assert_eq!(line.lines().count(), 1, "{args:?}: one line, got:\n{line}");
    assert!(!out.stderr.contains("panicked"), "{args:?}: {line}");
}

/// A directory with the demo plugin and a live Redis, for commands that are refused anyway.
struct ErrorSetup {
    dir: TestDir,
    plugins: String,
    _redis: RedisServer,
    broker: String,
}

fn error_setup(name: &str) -> ErrorSetup {
    let dir = TestDir::new(name);
    let plugins = path(&dir.plugins(&["demo"]));
    let redis = RedisServer::start(&dir);
    let broker = redis.url(0);
    ErrorSetup {
        dir,
        plugins,
        _redis: redis,
        broker,
    }
}

#[test]
fn a_worker_with_bad_settings_gives_one_clear_line_and_exits_1() {
    let s = error_setup("worker-errors");
    let config = path(&s.dir.write("bad.toml", "[plugins.demo]\nallow_htp = []\n"));
    let (broker, plugins) = (s.broker.as_str(), s.plugins.as_str());
    fn worker<'a>(flags: &[&'a str]) -> Vec<&'a str> {
        [&["worker"], flags].concat()
    }
    for (args, expected) in [
        (
            worker(&["--broker", "amqp://guest@localhost//", "--plugins", plugins]),
            "Redis transport",
        ),
        (
            worker(&["--broker", "redis://:99999999/x", "--plugins", plugins]),
            "invalid Redis URL",
        ),
        (
            worker(&["--broker", broker, "--plugins", "/no/such/dir"]),
            "plugin directory /no/such/dir does not exist",
        ),
        (
            worker(&[
                "--broker",
                broker,
                "--plugins",
                plugins,
                "--prefetch-multiplier",
                "0",
            ]),
            "--prefetch-multiplier must be between 1 and 1000, got 0",
        ),
        (
            worker(&[
                "--broker",
                broker,
                "--plugins",
                plugins,
                "--config",
                &config,
            ]),
            "allow_htp",
        ),
        (
            worker(&["--broker", broker, "--plugins", plugins, "-c", "0"]),
            "concurrency",
        ),
        (worker(&["--plugins", plugins]), "no broker"),
    ] {
        assert_one_clear_error(&s.dir, &args, expected);
    }
}

#[test]
fn call_with_bad_arguments_gives_one_clear_line_and_exits_1() {
    let s = error_setup("call-errors");
    let broker = s.broker.as_str();
    let unreachable = unreachable_redis();
    for (args, expected) in [
        (
            ["call", "demo.add", "--broker", broker, "--args", "[2,"].as_slice(),
            "--args is not JSON",
        ),
        (
            &["call", "demo.add", "--broker", broker, "--args", "{}"],
            "must be a JSON array",
        ),
        (
            &["call", "demo.add", "--broker", &unreachable],
            "cannot connect to Redis",
        ),
    ] {
        assert_one_clear_error(&s.dir, args, expected);
    }
}

#[test]
fn exec_of_a_missing_plugin_file_gives_one_clear_line_and_exits_1() {
    let dir = TestDir::new("exec-missing");
    assert_one_clear_error(
        &dir,
        &["exec", "/no/such.wasm", "demo.add"],
        "does not exist",
    );
}

#[test]
fn a_usage_error_exits_2() {
    let dir = TestDir::new("usage");
    let out = run(&dir, &["worker", "--concurrency", "many"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2: {out:?}");
}

#[test]
fn every_command_has_help() {
    let dir = TestDir::new("help");
    for command in ["worker", "dev", "call", "exec", "plugins"] {
        let out = run(&dir, &[command, "--help"]);
        assert!(
            out.status.success() && out.stdout.contains("Usage: taskhost"),
            "{command} --help: {out:?}"
        );
    }
}

#[test]
fn the_help_of_new_and_build_names_every_plugin_language() {
    let dir = TestDir::new("help-languages");
    let top = run(&dir, &["--help"]);
    for command in ["new", "build"] {
        let line = top
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_else(|| panic!("no {command} in --help: {top:?}"));
        for language in ["Rust", "Python", "JavaScript"] {
            assert!(line.contains(language), "{command}: {line}");
        }
    }
    let new = run(&dir, &["new", "--help"]);
    assert!(
        new.stdout.contains("[possible values: rust, python, js]"),
        "{new:?}"
    );
}

// --- a worker without Redis -----------------------------------------------------------------

/// A worker pointed at a Redis nothing listens on, once it has said it is retrying.
fn worker_without_redis(name: &str) -> (TestDir, Process) {
    let dir = TestDir::new(name);
    let plugins = path(&dir.plugins(&["demo"]));
    let worker = Process::spawn(
        &dir,
        "worker.log",
        Process::command(
            &dir,
            &[
                "worker",
                "--broker",
                &unreachable_redis(),
                "--plugins",
                &plugins,
            ],
        ),
    );
    // No Redis to observe: the log says when it is waiting.
    worker.wait_log("Redis is not reachable (retrying in");
    (dir, worker)
}

#[test]
fn a_worker_keeps_retrying_an_unreachable_redis() {
    let (_dir, worker) = worker_without_redis("unreachable");
    // The behaviour under test is what the operator is told, so it is read from the log.
    worker.wait_log_count("Redis is not reachable (retrying in", 2);
}

#[test]
fn a_worker_waiting_for_redis_stops_cleanly() {
    let (_dir, mut worker) = worker_without_redis("unreachable-stop");
    let status = worker.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
}

// --- dead letters ---------------------------------------------------------------------------

/// A worker without the demo plugin, and two dead letters: a `demo.add` it does not serve and
/// an undecodable message.
struct Dead {
    dir: TestDir,
    redis: RedisServer,
    plugins: PathBuf,
    _worker: Process,
    client: Client,
    /// The id of the `demo.add` task.
    id: String,
}

const DEAD_NODE: &str = "dead@test";

fn dead_setup(name: &str) -> Dead {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["crucible"]);
    dir.write("taskhost.toml", CRUCIBLE_GRANT);
    let worker = Process::worker(&dir, &redis, &plugins, &["-n", DEAD_NODE]);
    let mut client = Client::new(&redis);
    let id = client.send("demo.add", json!([2, 3]));
    client.push_raw("celery", b"garbage");
    wait_for("two dead letters", || {
        (client.dead_letters().len() == 2).then_some(())
    });
    Dead {
        dir,
        redis,
        plugins,
        _worker: worker,
        client,
        id,
    }
}

impl Dead {
    /// `taskhost dead ARGS --broker <the test's Redis>`.
    fn dead(&self, args: &[&str]) -> Out {
        let broker = self.redis.url(0);
        let mut all = vec!["dead"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--broker", &broker]);
        run(&self.dir, &all)
    }

    /// The `demo.add` entry's line in `dead list`.
    fn listed_line(&self) -> String {
        let out = self.dead(&["list"]);
        assert!(out.status.success(), "{out:?}");
        out.stdout
            .lines()
            .find(|l| l.contains(&self.id))
            .unwrap_or_else(|| panic!("the demo.add entry listed:\n{}", out.stdout))
            .to_owned()
    }

    /// The `demo.add` entry's index, as `dead list` shows it.
    fn index(&self) -> String {
        let line = self.listed_line();
        line.split_whitespace().next().expect("index").to_owned()
    }
}

#[test]
fn dead_list_counts_the_entries() {
    let s = dead_setup("dead-list");
    let out = s.dead(&["list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("2 dead-letter entries"),
        "{}",
        out.stdout
    );
}

#[test]
fn dead_list_names_each_entrys_task_and_reason() {
    let s = dead_setup("dead-list-line");
    let line = s.listed_line();
    assert!(
        line.contains("demo.add") && line.contains("not served"),
        "{line}"
    );
}

#[test]
fn dead_show_prints_an_entry_in_full() {
    let s = dead_setup("dead-show");
    let out = s.dead(&["show", &s.index()]);
    assert!(
        out.stdout.contains("\"task_id\"") && out.stdout.contains(&s.id),
        "{}",
        out.stdout
    );
}

#[test]
fn dead_requeue_replays_an_entry_once_a_plugin_serves_it() {
    let mut s = dead_setup("dead-requeue");
    let index = s.index();
    std::fs::copy(plugin_wasm("demo"), s.plugins.join("demo.wasm")).expect("add demo");
    // Served once the worker reports the plugin among those it runs.
    wait_for("the worker to run the demo plugin", || {
        redis::cmd("HGET")
            .arg(format!("taskhost:running:{DEAD_NODE}"))
            .arg("demo")
            .query::<Option<String>>(s.client.broker())
            .expect("HGET running plugins")
    });
    let out = s.dead(&["requeue", &index]);
    assert!(
        out.status.success() && out.stdout.contains("onto celery"),
        "{out:?}"
    );
    wait_for("the requeued task to succeed", || {
        s.client.state(&s.id).filter(|d| d["status"] == "SUCCESS")
    });
    assert_eq!(s.client.dead_letters().len(), 1);
}

#[test]
fn dead_requeue_of_a_missing_entry_fails() {
    let s = dead_setup("dead-requeue-missing");
    let out = s.dead(&["requeue", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("no dead-letter entry 7"), "{out:?}");
}

#[test]
fn dead_purge_wants_yes() {
    let mut s = dead_setup("dead-purge-no");
    let out = s.dead(&["purge"]);
    assert_eq!(out.status.code(), Some(1), "purge wants --yes");
    assert_eq!(s.client.dead_letters().len(), 2, "nothing purged");
}

#[test]
fn dead_purge_yes_empties_the_list() {
    let mut s = dead_setup("dead-purge");
    let out = s.dead(&["purge", "--yes"]);
    assert!(out.stdout.contains("purged 2"), "{out:?}");
    assert!(s.client.dead_letters().is_empty());
}
