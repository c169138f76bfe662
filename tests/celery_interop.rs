//! Interoperability with real Python Celery 5.7 from PyPI, both ways: Python producers and
//! `AsyncResult.get()` against a taskhost worker, and `taskhost call` against a Celery worker.
//!
//! A Python snippet states what a Celery user sees (its `assert`s); what the worker did is read
//! from Redis.

use base64::Engine as _;
use serde_json::{Value, json};
use std::process::Command;
use taskhost_tests::{
    Client, Process, READY_STATES, RedisServer, ResultFeed, TestDir, WAIT, wait_for,
};

/// Python tasks of the demo plugin's names, for the Celery side.
const CELERY_APP: &str = r#"
import os
from celery import Celery

app = Celery("interop", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
app.conf.broker_connection_retry_on_startup = True

@app.task(name="demo.add")
def add(x, y):
    return x + y

@app.task(name="demo.fail")
def fail(message):
    raise ValueError(message)
"#;

/// What every producer snippet starts with.
const PRELUDE: &str = r#"
from datetime import datetime, timedelta, timezone
import celery.exceptions
from celery_app import app, add

def raises(result, kind):
    try:
        result.get(timeout=10)
    except kind as e:
        return e
    raise SystemExit(f"{result.id} did not raise {kind.__name__}")
"#;

/// The node name of the taskhost worker the producer tests run against.
const NODE: &str = "interop@test";

fn python_command(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> Command {
    dir.write("celery_app.py", CELERY_APP);
    taskhost_tests::python_in(dir, redis, args)
}

/// A taskhost worker serving the demo plugin, and Python Celery to produce for it.
struct Setup {
    dir: TestDir,
    redis: RedisServer,
    worker: Process,
    client: Client,
}

fn setup(name: &str, extra: &[&str]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let mut flags = vec!["-n", NODE];
    flags.extend_from_slice(extra);
    let worker = Process::worker(&dir, &redis, &plugins, &flags);
    let client = Client::new(&redis);
    Setup {
        dir,
        redis,
        worker,
        client,
    }
}

impl Setup {
    /// Runs `code` (after [`PRELUDE`]) with Python Celery; fails the test, with the worker's
    /// log, unless it runs to its end.
    fn python(&self, code: &str) {
        self.dir.write("celery_app.py", CELERY_APP);
        let logs = || self.worker.log();
        taskhost_tests::run_snippet(&self.dir, &self.redis, PRELUDE, code, logs);
    }
}

/// Every state Redis published for task `id`, once a final one has been published.
fn published_states(feed: &ResultFeed, id: &str) -> Vec<String> {
    wait_for(&format!("a final state of task {id} published"), || {
        let states = feed.states(id);
        states
            .last()
            .is_some_and(|s| READY_STATES.contains(&s.as_str()))
            .then_some(states)
    })
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// --- Python producers, a taskhost worker ----------------------------------------------------

#[test]
fn delay_and_send_task_get_the_result_from_a_taskhost_worker() {
    let s = setup("py-delay", &[]);
    s.python(
        r#"
assert add.delay(2, 3).get(timeout=10) == 5
assert app.send_task("demo.add", (2, 3)).get(timeout=10) == 5
"#,
    );
}

#[test]
fn python_keyword_arguments_reach_the_task() {
    let s = setup("py-kwargs", &[]);
    s.python(r#"assert app.send_task("demo.add", kwargs={"x": 40, "y": 2}).get(timeout=10) == 42"#);
}

#[test]
fn python_values_come_back_unchanged() {
    let s = setup("py-echo", &[]);
    s.python(
        r#"
value = {"nested": [1, None, "ü", {"big": 2**62}], "f": 1.5}
assert app.send_task("demo.echo", (value,)).get(timeout=10) == value
"#,
    );
}

#[test]
fn a_task_failure_is_raised_in_python_with_its_message() {
    let s = setup("py-fail", &[]);
    s.python(
        r#"
e = raises(app.send_task("demo.fail", ("boom from python",)), RuntimeError)
assert str(e) == "boom from python", repr(e)
"#,
    );
}

#[test]
fn an_unknown_task_is_raised_in_python_as_not_registered() {
    let s = setup("py-unknown", &[]);
    s.python(
        r#"
e = raises(app.send_task("demo.nobody"), celery.exceptions.NotRegistered)
assert "demo.nobody" in str(e), repr(e)
"#,
    );
}

#[test]
fn a_retried_task_ends_successful_in_python() {
    let s = setup("py-retry", &[]);
    s.python(
        r#"
r = app.send_task("demo.retry", (2,))
assert r.get(timeout=10) == 2 and r.status == "SUCCESS"
"#,
    );
}

// --- Celery's scheduling and revokes, a taskhost worker -------------------------------------

#[test]
fn a_celery_countdown_delays_the_task() {
    let s = setup("py-countdown", &[]);
    s.python(
        r#"
sent = datetime.now(timezone.utc)
r = app.send_task("demo.add", (1, 2), countdown=1)
assert r.get(timeout=10) == 3
assert r.date_done >= sent + timedelta(seconds=1), (r.date_done, sent)
"#,
    );
}

#[test]
fn a_celery_eta_is_honoured() {
    let s = setup("py-eta", &[]);
    s.python(
        r#"
eta = datetime.now(timezone.utc) + timedelta(seconds=1)
r = app.send_task("demo.add", (2, 2), eta=eta)
assert r.get(timeout=10) == 4
assert r.date_done >= eta, (r.date_done, eta)
"#,
    );
}

#[test]
fn a_celery_task_past_its_expiry_is_revoked_as_expired() {
    let mut s = setup("py-expires", &[]);
    let id = new_id();
    s.python(&format!(
        r#"
r = app.send_task("demo.add", (1, 1), task_id={id:?},
                  expires=datetime.now(timezone.utc) - timedelta(seconds=1))
e = raises(r, celery.exceptions.TaskRevokedError)
assert "expired" in str(e), repr(e)
"#
    ));
    assert_eq!(
        s.client.result(&id)["result"]["exc_message"],
        json!(["expired"])
    );
}

/// Waits until task `id`'s message is settled: in none of the delayed set, the `celery` queue
/// and `node`'s in-flight list. Read in one MULTI, so that a message moving between them (each
/// move one atomic step) is always seen somewhere until it is settled.
fn wait_settled(client: &mut Client, node: &str, id: &str) {
    let in_flight = format!("taskhost:inflight:{node}:celery");
    wait_for(&format!("task {id} settled"), || {
        let (delayed, queued, held): (usize, usize, usize) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg("taskhost:delayed")
            .cmd("LLEN")
            .arg("celery")
            .cmd("LLEN")
            .arg(&in_flight)
            .query(client.broker())
            .expect("read where the message is");
        (delayed + queued + held == 0).then_some(())
    });
    assert_eq!(client.in_flight(node), 0, "nothing else in flight");
}

#[test]
fn a_task_revoked_while_it_waits_for_its_countdown_never_runs() {
    let mut s = setup("py-revoke-waiting", &["-c", "1"]);
    let feed = ResultFeed::start(&s.redis);
    let id = new_id();
    s.python(&format!(
        r#"
r = app.send_task("demo.add", (5, 5), countdown=2, task_id={id:?})
app.control.revoke(r.id)
raises(r, celery.exceptions.TaskRevokedError)
assert app.AsyncResult(r.id).state == "REVOKED"
"#
    ));
    // Due after its countdown, taken, and settled without running: its result, written before
    // its message left the in-flight list, is still REVOKED (a run would have stored SUCCESS).
    wait_settled(&mut s.client, NODE, &id);
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "REVOKED", "{doc}");
    assert_eq!(doc["result"]["exc_message"], json!(["revoked"]));
    let states = published_states(&feed, &id);
    assert!(states.iter().all(|s| s == "REVOKED"), "{states:?}");
}

/// Sends `demo.sleep(60 s)` as task `id` to a worker started with `-E`, waits until Redis
/// carries its `task-started` event (from then on a revoke with `terminate` has a running task
/// to stop), runs the Python `code`, and returns the task's `task-revoked` event.
fn revoke_a_running_task(s: &mut Setup, id: &str, code: &str) -> Value {
    let mut conn = s.redis.conn(0);
    let mut events = task_events(&mut conn);
    s.client.send_as(id, "demo.sleep", json!([60_000]));
    until_event(&mut events, id, "task-started");
    s.python(code);
    until_event(&mut events, id, "task-revoked").1
}

/// `conn` subscribed to the worker's task events, each read waiting at most [`WAIT`].
fn task_events(conn: &mut redis::Connection) -> redis::PubSub<'_> {
    let mut events = conn.as_pubsub();
    events
        .subscribe("/0.celeryev/task.multi")
        .expect("subscribe to task events");
    events.set_read_timeout(Some(WAIT)).expect("read timeout");
    events
}

/// Reads task events until task `id`'s `kind` event: the types of `id`'s events up to it, and
/// the event.
fn until_event(events: &mut redis::PubSub<'_>, id: &str, kind: &str) -> (Vec<String>, Value) {
    let mut seen = Vec::new();
    loop {
        let message = events
            .get_message()
            .unwrap_or_else(|e| panic!("no {kind} event for {id} within the wait ({seen:?}): {e}"));
        let payload: String = message.get_payload().expect("payload");
        let envelope: Value = serde_json::from_str(&payload).expect("envelope is JSON");
        let body = base64::engine::general_purpose::STANDARD
            .decode(envelope["body"].as_str().unwrap_or_default())
            .expect("body is base64");
        let batch: Vec<Value> = serde_json::from_slice(&body).expect("a list of events");
        for event in batch.into_iter().filter(|e| e["uuid"] == id) {
            seen.push(event["type"].as_str().unwrap_or_default().to_owned());
            if event["type"] == kind {
                return (seen, event);
            }
        }
    }
}

#[test]
fn a_revoke_with_terminate_stops_a_running_task() {
    let mut s = setup("py-terminate", &["-c", "1", "-E"]);
    let feed = ResultFeed::start(&s.redis);
    let id = new_id();
    let revoked = revoke_a_running_task(
        &mut s,
        &id,
        &format!(
            r#"
app.control.revoke({id:?}, terminate=True)
raises(app.AsyncResult({id:?}), celery.exceptions.TaskRevokedError)
assert app.AsyncResult({id:?}).state == "REVOKED"
"#
        ),
    );
    assert_eq!(revoked["terminated"], true, "{revoked}");
    wait_settled(&mut s.client, NODE, &id);
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "REVOKED", "{doc}");
    assert_eq!(doc["result"]["exc_type"], "TaskRevokedError");
    let states = published_states(&feed, &id);
    assert!(states.iter().all(|s| s == "REVOKED"), "{states:?}");
}

#[test]
fn a_task_terminated_by_a_revoke_frees_its_slot_at_once() {
    let mut s = setup("py-terminate-slot", &["-c", "1", "-E"]);
    let id = new_id();
    // The one slot (-c 1) serves the next task long before the 60 s sleep would have ended.
    revoke_a_running_task(
        &mut s,
        &id,
        &format!(
            r#"
app.control.revoke({id:?}, terminate=True)
assert app.send_task("demo.add", (1, 1)).get(timeout=10) == 2
"#
        ),
    );
}

#[test]
fn a_revoke_reaches_workers_started_after_it() {
    let dir = TestDir::new("py-revoke-later");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let mut client = Client::new(&redis);
    let mut first =
        Process::worker_logged(&dir, "first.log", &redis, &plugins, &["-n", "first@test"]);
    let id = "revoked-before-it-was-sent";
    dir.write(
        "revoke.py",
        &format!("from celery_app import app\napp.control.revoke({id:?})\nprint('revoked')\n"),
    );
    let out = Process::run_command(&dir, python_command(&dir, &redis, &["revoke.py"]));
    assert!(out.status.success(), "{out:?}");
    wait_for("the revoke recorded in Redis's revoked set", || {
        redis::cmd("ZSCORE")
            .arg("taskhost:revoked")
            .arg(id)
            .query::<Option<f64>>(client.broker())
            .expect("ZSCORE")
    });
    assert!(first.stop_with(libc::SIGTERM).success());
    let _second = Process::worker_logged(
        &dir,
        "second.log",
        &redis,
        &plugins,
        &["-n", "second@test", "-E"],
    );
    // Nobody held it when the revoke was heard: REVOKED was stored at once, and is final.
    let stored = client
        .state(id)
        .expect("REVOKED stored when the revoke was heard");
    assert_eq!(stored["status"], "REVOKED", "{stored}");
    let mut conn = redis.conn(0);
    let mut events = task_events(&mut conn);
    client.send_as(id, "demo.add", json!([1, 2]));
    // Met as revoked by the second worker: its events for the task end in task-revoked,
    // with no task-started before it.
    let (seen, _) = until_event(&mut events, id, "task-revoked");
    assert!(
        !seen.iter().any(|t| t == "task-started"),
        "it ran: {seen:?}"
    );
    wait_settled(&mut client, "second@test", id);
    let doc = client.result(id);
    assert_eq!(doc["status"], "REVOKED", "{doc}");
    assert_eq!(doc["result"]["exc_message"], json!(["revoked"]));
}

// --- `taskhost call`, a Celery worker -------------------------------------------------------

/// A Celery worker (solo pool) serving [`CELERY_APP`], and `taskhost call` to send to it.
struct CelerySetup {
    dir: TestDir,
    redis: RedisServer,
    celery: Process,
}

fn celery_setup(name: &str) -> CelerySetup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let celery = Process::spawn(
        &dir,
        "celery.log",
        python_command(
            &dir,
            &redis,
            &[
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "solo",
                "-Q",
                "celery",
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "INFO",
                "-n",
                "py@%h",
            ],
        ),
    );
    // Celery says nothing in Redis when it is ready; its log does.
    celery.wait_log("ready.");
    CelerySetup { dir, redis, celery }
}

impl CelerySetup {
    /// `taskhost call --wait ARGS` against the Celery worker's Redis.
    fn call(&self, args: &[&str]) -> Called {
        let (broker, backend) = (self.redis.url(0), self.redis.url(1));
        let mut all = vec![
            "call",
            "--broker",
            &broker,
            "--result-backend",
            &backend,
            "--wait",
        ];
        all.extend_from_slice(args);
        let out = Process::run(&self.dir, &all);
        Called {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }
}

/// What a finished `taskhost call` printed.
#[derive(Debug)]
struct Called {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

#[test]
fn taskhost_call_prints_the_result_of_a_celery_worker() {
    let s = celery_setup("py-worker");
    let out = s.call(&["demo.add", "--args", "[2, 3]"]);
    assert!(
        out.status.success(),
        "{out:?}\ncelery log:\n{}",
        s.celery.log()
    );
    assert_eq!(out.stdout.trim(), "5");
}

#[test]
fn taskhost_call_passes_keyword_arguments_to_a_celery_worker() {
    let s = celery_setup("py-worker-kwargs");
    let out = s.call(&["demo.add", "--kwargs", r#"{"x": 1, "y": 2}"#]);
    assert_eq!(out.stdout.trim(), "3", "{out:?}");
}

#[test]
fn taskhost_call_reports_a_celery_failure_and_exits_1() {
    let s = celery_setup("py-worker-fail");
    let out = s.call(&["demo.fail", "--args", r#"["from rust"]"#]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("ValueError: from rust"), "{out:?}");
}
