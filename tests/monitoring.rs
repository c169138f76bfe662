//! Monitoring with the operators' real tools from PyPI: `celery inspect`/`celery control`
//! against a taskhost worker, Flower 2.2 (with basic auth) watching it, Prometheus' own parser
//! reading `/metrics`, and JSON log lines.
//!
//! Each behaviour is a test of its own, with its own Redis and worker: starting them takes a
//! fraction of a second, a Celery command line or a short Python script about a second, and
//! Flower answers half a second after it starts and lists a worker online within its first
//! heartbeats (2 s). No setup is costly enough to be worth sharing between behaviours.

use serde_json::{Value, json};
use std::process::Command;
use taskhost_tests::{
    Client, Process, RedisServer, TestDir, free_port, http_get, python, wait_for,
};

/// Runs the venv's `python ARGS` to completion, with `BROKER`/`BACKEND` set; its stdout.
fn run_python(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> String {
    let out = Process::run_command(dir, taskhost_tests::python_in(dir, redis, args));
    assert!(
        out.status.success(),
        "python {args:?} failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Writes the Python script `name` and runs it; its stdout.
fn python_script(dir: &TestDir, redis: &RedisServer, name: &str, code: &str) -> String {
    dir.write(name, code);
    run_python(dir, redis, &[name])
}

// ---- celery inspect and celery control ----

/// A worker `w1@mon` on a fresh Redis, driven with `celery inspect` and `celery control`.
struct Controlled {
    worker: Process,
    client: Client,
    redis: RedisServer,
    dir: TestDir,
}

impl Controlled {
    /// Starts `w1@mon` with `-c concurrency` and `extra`.
    fn start(name: &str, concurrency: &str, extra: &[&str]) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let plugins = dir.plugins(&["demo"]);
        let mut args = vec!["-n", "w1@mon", "-c", concurrency];
        args.extend_from_slice(extra);
        let worker = Process::worker(&dir, &redis, &plugins, &args);
        let client = Client::new(&redis);
        Self {
            worker,
            client,
            redis,
            dir,
        }
    }

    /// `w1@mon` with `-c 2`.
    fn w1(name: &str) -> Self {
        Self::start(name, "2", &[])
    }

    /// Runs `celery -b BROKER --result-backend BACKEND ARGS`; its stdout.
    fn celery(&self, args: &[&str]) -> String {
        let (broker, backend) = (self.redis.url(0), self.redis.url(1));
        let mut all = vec!["-m", "celery", "-b", &broker, "--result-backend", &backend];
        all.extend_from_slice(args);
        run_python(&self.dir, &self.redis, &all)
    }

    /// Runs `code` after [`APP`] with the Python API, and checks it got to its end.
    fn script(&self, code: &str) {
        let out = python_script(
            &self.dir,
            &self.redis,
            "control.py",
            &format!("{APP}\n{code}\nprint(\"script OK\")\n"),
        );
        assert!(out.contains("script OK"), "{out}\n{}", self.worker.log());
    }
}

/// What every control script starts with: the app, and `inspect` addressed to `w1@mon`.
const APP: &str = r#"
import os, time
from celery import Celery

app = Celery("mon", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
node = "w1@mon"
i = app.control.inspect(destination=[node], timeout=2)

def only(reply):
    assert reply and node in reply, reply
    return reply[node]

def scheduled_entry(task_id):
    """Waits (10 s at most) for the task to show in `inspect scheduled`; its entry."""
    deadline = time.time() + 10
    while True:
        scheduled = only(i.scheduled())
        found = [s for s in scheduled if s["request"]["id"] == task_id]
        if found:
            return found[0]
        assert time.time() < deadline, scheduled
"#;

#[test]
fn inspect_ping_answers_pong() {
    let w = Controlled::w1("mon-ping");
    let out = w.celery(&["inspect", "ping"]);
    assert!(out.contains("w1@mon: OK") && out.contains("pong"), "{out}");
}

#[test]
fn inspect_registered_lists_the_tasks_the_plugins_serve() {
    let w = Controlled::w1("mon-registered");
    let out = w.celery(&["inspect", "registered"]);
    assert!(
        out.contains("demo.add") && out.contains("demo.sleep"),
        "{out}"
    );
}

#[test]
fn inspect_stats_reports_the_pool_size_and_implementation() {
    let w = Controlled::w1("mon-stats");
    let out = w.celery(&["inspect", "stats"]);
    assert!(
        out.contains("\"max-concurrency\": 2") && out.contains("taskhost:wasm"),
        "{out}"
    );
    assert!(
        out.contains("\"ssl\": false"),
        "a plain redis:// broker: {out}"
    );
}

/// Sends a 20 s `demo.sleep` and waits until `inspect active` lists it; its id, and what
/// `inspect active` printed.
fn running_task(w: &mut Controlled) -> (String, String) {
    let id = w.client.send("demo.sleep", json!([20_000]));
    let active = wait_for("demo.sleep in inspect active", || {
        Some(w.celery(&["inspect", "active"])).filter(|out| out.contains(&id))
    });
    (id, active)
}

#[test]
fn inspect_active_lists_a_running_task() {
    let mut w = Controlled::w1("mon-active");
    let (id, active) = running_task(&mut w);
    assert!(
        active.contains(&id) && active.contains("demo.sleep"),
        "{active}"
    );
}

#[test]
fn inspect_scheduled_lists_a_countdown_task_and_inspect_reserved_does_not() {
    let w = Controlled::w1("mon-scheduled");
    w.script(
        r#"
later = app.send_task("demo.add", (1, 2), countdown=600)
entry = scheduled_entry(later.id)
assert entry["request"]["name"] == "demo.add" and entry["request"]["args"] == [1, 2], entry
assert entry["eta"], entry
assert only(i.reserved()) == [], "nothing is waiting for a slot"
"#,
    );
}

#[test]
fn inspect_conf_reports_the_concurrency_and_broker() {
    let w = Controlled::w1("mon-conf");
    w.script(
        r#"
conf = only(i.conf())
assert conf["worker_concurrency"] == 2 and conf["broker_url"] == os.environ["BROKER"], conf
"#,
    );
}

#[test]
fn inspect_active_queues_lists_the_queues_consumed() {
    let w = Controlled::w1("mon-queues");
    w.script(
        r#"
queues = [q["name"] for q in only(i.active_queues())]
assert queues == ["celery"], queues
"#,
    );
}

#[test]
fn control_revoke_lists_a_scheduled_task_as_revoked_and_stores_revoked() {
    let w = Controlled::w1("mon-revoke");
    w.script(
        r#"
later = app.send_task("demo.add", (1, 2), countdown=600)
scheduled_entry(later.id)
reply = app.control.revoke(later.id, destination=[node], reply=True)
assert "flagged as revoked" in reply[0][node]["ok"], reply
assert later.id in only(i.revoked())
assert later.state == "REVOKED", later.state
"#,
    );
}

#[test]
fn control_revoke_takes_an_id_the_worker_never_saw() {
    let w = Controlled::w1("mon-revoke-unknown");
    let out = w.celery(&["control", "revoke", "no-such-task"]);
    assert!(out.contains("flagged as revoked"), "{out}");
}

#[test]
fn control_terminate_stops_a_running_task_as_revoked() {
    let mut w = Controlled::w1("mon-terminate");
    let (id, _) = running_task(&mut w);
    let out = w.celery(&["control", "terminate", "SIGTERM", &id]);
    assert!(
        out.contains("flagged as revoked") && out.contains("1 terminated"),
        "{out}"
    );
    assert_eq!(w.client.result(&id)["status"], "REVOKED");
}

#[test]
fn control_add_consumer_starts_consuming_a_queue() {
    let mut w = Controlled::w1("mon-add-consumer");
    let out = w.celery(&["control", "add_consumer", "extra"]);
    assert!(out.contains("add consumer extra"), "{out}");
    let id = w
        .client
        .send_to("extra", "demo.add", json!([2, 3]), json!({}));
    assert_eq!(w.client.result(&id)["result"], 5);
}

#[test]
fn control_add_consumer_for_a_queue_consumed_says_so() {
    let w = Controlled::w1("mon-add-consumer-again");
    w.celery(&["control", "add_consumer", "extra"]);
    let out = w.celery(&["control", "add_consumer", "extra"]);
    assert!(out.contains("already consuming from 'extra'"), "{out}");
}

#[test]
fn control_cancel_consumer_stops_consuming_a_queue() {
    let mut w = Controlled::w1("mon-cancel-consumer");
    // A queue added at run time, and consumed: a task sent to it runs.
    w.celery(&["control", "add_consumer", "extra"]);
    let id = w
        .client
        .send_to("extra", "demo.add", json!([2, 3]), json!({}));
    assert_eq!(w.client.result(&id)["result"], 5, "extra is consumed");
    let out = w.celery(&["control", "cancel_consumer", "extra"]);
    assert!(out.contains("no longer consuming from extra"), "{out}");
    // A task parked on `extra`, then one on `celery`: once the second has run, the first
    // would have been fetched too had `extra` still been consumed.
    let parked = w
        .client
        .send_to("extra", "demo.add", json!([1, 1]), json!({}));
    let after = w.client.send("demo.add", json!([1, 2]));
    assert_eq!(w.client.result(&after)["result"], 3);
    assert_eq!(
        w.client.llen("extra"),
        1,
        "a cancelled queue is not consumed"
    );
    assert!(w.client.state(&parked).is_none());
}

#[test]
fn control_time_limit_applies_to_the_next_task() {
    let w = Controlled::w1("mon-time-limit");
    w.script(
        r#"
reply = app.control.time_limit("demo.sleep", soft=0.2, hard=0.5, destination=[node], reply=True)
assert reply == [{node: {"ok": "time limits set successfully"}}], reply
r = app.send_task("demo.sleep", (5000,))
try:
    r.get(timeout=10)
    raise SystemExit("demo.sleep outlived the time limit set by control")
except Exception as e:
    assert "TimeLimitExceeded" in type(e).__name__ or "time limit" in str(e), repr(e)
"#,
    );
}

#[test]
fn control_time_limit_for_a_task_not_served_is_refused() {
    let w = Controlled::w1("mon-time-limit-unknown");
    w.script(
        r#"
reply = app.control.time_limit("nobody.task", soft=1, hard=2, destination=[node], reply=True)
assert reply == [{node: {"error": "unknown task"}}], reply
"#,
    );
}

#[test]
fn control_rate_limit_spaces_the_starts_of_a_task() {
    let w = Controlled::w1("mon-rate-limit");
    w.script(
        r#"
# 3 tasks at 120/m start at least 0.5 s apart.
reply = app.control.rate_limit("demo.add", "120/m", destination=[node], reply=True)
assert reply == [{node: {"ok": "new rate limit set successfully"}}], reply
rs = [app.send_task("demo.add", (n, n)) for n in range(3)]
assert [r.get(timeout=20) for r in rs] == [0, 2, 4]
times = sorted(r.date_done.timestamp() for r in rs)
assert times[2] - times[0] >= 0.9, times
"#,
    );
}

#[test]
fn control_rate_limit_zero_disables_the_limit() {
    let w = Controlled::w1("mon-rate-limit-off");
    w.script(
        r#"
app.control.rate_limit("demo.add", "120/m", destination=[node], reply=True)
reply = app.control.rate_limit("demo.add", "0", destination=[node], reply=True)
assert reply == [{node: {"ok": "rate limit disabled successfully"}}], reply
"#,
    );
}

#[test]
fn control_pool_grow_adds_slots_up_to_what_the_pool_was_sized_for() {
    let w = Controlled::start("mon-pool-grow", "5", &[]);
    w.script(
        r#"
app.control.pool_shrink(3, destination=[node], reply=True)
assert only(i.stats())["pool"]["max-concurrency"] == 2
assert app.control.pool_grow(3, destination=[node], reply=True) == [{node: {"ok": "pool will grow"}}]
assert only(i.stats())["pool"]["max-concurrency"] == 5
app.control.pool_grow(1000, destination=[node], reply=True)
assert only(i.stats())["pool"]["max-concurrency"] == 5, "never past the -c it started with"
"#,
    );
}

#[test]
fn control_pool_shrink_removes_slots() {
    let w = Controlled::start("mon-pool-shrink", "5", &[]);
    w.script(
        r#"
assert app.control.pool_shrink(4, destination=[node], reply=True) == [{node: {"ok": "pool will shrink"}}]
assert only(i.stats())["pool"]["max-concurrency"] == 1
"#,
    );
}

#[test]
fn a_command_for_another_node_is_not_answered() {
    let w = Controlled::w1("mon-addressing");
    w.script(
        r#"
assert app.control.ping(destination=[node], timeout=2), "the worker answers its own name"
assert app.control.ping(destination=["nobody@nowhere"], timeout=0.5) == []
"#,
    );
}

#[test]
fn control_shutdown_stops_the_worker_and_it_exits_zero() {
    let mut w = Controlled::w1("mon-shutdown");
    let out = w.celery(&["control", "shutdown"]);
    assert!(out.contains("shutting down"), "{out}");
    let status = w.worker.wait_exit();
    assert!(status.success(), "{status}\n{}", w.worker.log());
}

// ---- Celery's worker command line ----

#[test]
fn worker_time_limit_flag_stops_a_task_over_it() {
    let w = Controlled::start("mon-flag-time-limit", "2", &["--time-limit", "0.5"]);
    w.script(
        r#"
from celery.exceptions import TimeLimitExceeded
r = app.send_task("demo.sleep", (5000,))
try:
    r.get(timeout=10)
    raise SystemExit("demo.sleep outlived --time-limit")
except TimeLimitExceeded:
    pass
"#,
    );
}

#[test]
fn worker_time_limit_flags_show_in_stats_as_celerys_timeouts() {
    let w = Controlled::start(
        "mon-flag-timeouts",
        "2",
        &["--time-limit", "7", "--soft-time-limit", "5"],
    );
    w.script(
        r#"
assert only(i.stats())["pool"]["timeouts"] == [5.0, 7.0], only(i.stats())["pool"]
"#,
    );
}

#[test]
fn a_celery_worker_command_line_starts_as_it_is() {
    let w = Controlled::start(
        "mon-celery-flags",
        "2",
        &[
            "-O",
            "fair",
            "--without-gossip",
            "--without-mingle",
            "-P",
            "prefork",
        ],
    );
    w.script(
        r#"
assert app.send_task("demo.add", (2, 3)).get(timeout=10) == 5
"#,
    );
}

#[test]
fn autoscale_grows_with_waiting_tasks_and_shrinks_back_when_idle() {
    let w = Controlled::start(
        "mon-autoscale",
        "2",
        &["--autoscale", "3,1", "--test-autoscale-keepalive-ms", "500"],
    );
    w.script(
        r#"
def wait_until(what, check, within=15):
    deadline = time.time() + within
    while not check():
        assert time.time() < deadline, what
        time.sleep(0.05)

assert only(i.stats())["pool"]["max-concurrency"] == 1, "starts at MIN"
sleeping = [app.send_task("demo.sleep", (4000,)) for _ in range(3)]
wait_until("three tasks running at once", lambda: len(only(i.active())) == 3)
assert only(i.stats())["pool"]["max-concurrency"] == 3
for r in sleeping:
    r.get(timeout=20)
wait_until("back to one slot", lambda: only(i.stats())["pool"]["max-concurrency"] == 1)
"#,
    );
}

// ---- Flower ----

/// Flower on `redis`, with basic auth, once it answers; and its address.
fn start_flower(dir: &TestDir, redis: &RedisServer) -> (Process, String) {
    let port = free_port();
    let mut command = Command::new(python());
    command
        .current_dir(dir.path())
        .args(["-m", "celery", "--broker", &redis.url(0), "flower"])
        .arg(format!("--port={port}"))
        .args(["--address=127.0.0.1", "--basic-auth=admin:crucible"])
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let flower = Process::spawn(dir, "flower.log", command);
    let addr = format!("127.0.0.1:{port}");
    wait_for("Flower to answer", || {
        http_get(&addr, "/healthcheck", None).filter(|(status, _)| *status == 200)
    });
    (flower, addr)
}

const AUTH: Option<(&str, &str)> = Some(("admin", "crucible"));

fn flower_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path, AUTH).expect("Flower answers");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Flower, and a worker `w1@flower` with events on that Flower lists online: `-c 1`
/// `--prefetch-multiplier 1`, consuming `celery` and `parked`.
struct Watched {
    worker: Process,
    flower: Process,
    addr: String,
    redis: RedisServer,
    dir: TestDir,
}

impl Watched {
    fn start(name: &str) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let plugins = dir.plugins(&["demo"]);
        let (flower, addr) = start_flower(&dir, &redis);
        // -c 1: one long task holds the only slot, so later messages wait in the queue.
        let worker = Process::worker(
            &dir,
            &redis,
            &plugins,
            &[
                "-n",
                "w1@flower",
                "-E",
                "-c",
                "1",
                "--prefetch-multiplier",
                "1",
                "-Q",
                "celery,parked",
            ],
        );
        wait_for("Flower to list the worker online", || {
            let online = flower_json(&addr, "/api/workers?status=1");
            (online["w1@flower"] == true).then_some(())
        });
        Self {
            worker,
            flower,
            addr,
            redis,
            dir,
        }
    }

    /// Runs `code` (a Python producer that prints a task id) and returns the id.
    fn produce(&self, code: &str) -> String {
        let out = python_script(&self.dir, &self.redis, "produce.py", code);
        let id = out.trim().to_owned();
        assert!(!id.is_empty(), "produce.py printed {out:?}");
        id
    }

    /// Flower's `/api/workers`, once it holds the worker's inspect replies: Flower stores
    /// them after it answers a refresh, so this asks until they are in.
    fn inspected(&self) -> Value {
        wait_for("Flower to hold the worker's inspect replies", || {
            let workers = flower_json(&self.addr, "/api/workers?refresh=1");
            workers["w1@flower"]["stats"].is_object().then_some(workers)
        })
    }

    /// Flower's record of task `id`, once it is in `state`.
    fn task_in(&self, id: &str, state: &str) -> Value {
        wait_for(&format!("Flower to show task {id} {state}"), || {
            let tasks = flower_json(&self.addr, "/api/tasks");
            (tasks[id]["state"] == state).then(|| tasks[id].clone())
        })
    }
}

#[test]
fn flower_api_requires_basic_auth() {
    let dir = TestDir::new("mon-flower-auth");
    let redis = RedisServer::start(&dir);
    let (_flower, addr) = start_flower(&dir, &redis);
    let (status, _) = http_get(&addr, "/api/workers", None).expect("Flower answers");
    assert_eq!(status, 401, "the API is behind basic auth");
    // With the credentials, it answers.
    flower_json(&addr, "/api/workers");
}

#[test]
fn flower_lists_a_taskhost_worker_online() {
    // The wait for the worker to show online is in the setup, and is the check.
    let w = Watched::start("mon-flower-online");
    let online = flower_json(&w.addr, "/api/workers?status=1");
    assert_eq!(online["w1@flower"], true, "{online}");
}

#[test]
fn flower_shows_the_workers_registered_tasks_pool_and_queues() {
    let w = Watched::start("mon-flower-worker");
    let workers = w.inspected();
    let w1 = &workers["w1@flower"];
    assert!(
        w1["registered"]
            .as_array()
            .is_some_and(|r| r.contains(&json!("demo.add"))),
        "{w1}"
    );
    assert_eq!(w1["stats"]["pool"]["max-concurrency"], 1, "{w1}");
    let queues: Vec<&str> = w1["active_queues"]
        .as_array()
        .map(|q| q.iter().filter_map(|q| q["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(queues, ["celery", "parked"], "{w1}");
}

#[test]
fn flower_shows_a_succeeded_task_with_its_args_result_worker_and_runtime() {
    let w = Watched::start("mon-flower-success");
    // Sent from Python, as the seed service's producers send it.
    let ok = w.produce(
        r#"
import os
from celery import Celery
app = Celery("mon", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
ok = app.send_task("demo.add", (2, 3))
assert ok.get(timeout=10) == 5
print(ok.id)
"#,
    );
    let success = w.task_in(&ok, "SUCCESS");
    assert_eq!(success["name"], "demo.add", "{success}");
    assert_eq!(success["args"], "(2, 3)", "{success}");
    assert_eq!(success["result"], "5", "{success}");
    assert_eq!(success["worker"], "w1@flower", "{success}");
    assert!(
        success["runtime"]
            .as_f64()
            .is_some_and(|r| r > 0.0 && r < 5.0),
        "{success}"
    );
}

#[test]
fn flower_shows_a_failed_task_with_its_exception() {
    let w = Watched::start("mon-flower-failure");
    let failed = w.produce(
        r#"
import os
from celery import Celery
app = Celery("mon", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
failed = app.send_task("demo.fail", ("boom from flower",))
assert failed.get(propagate=False, timeout=10) is not None and failed.state == "FAILURE"
print(failed.id)
"#,
    );
    let failure = w.task_in(&failed, "FAILURE");
    assert!(
        failure["exception"]
            .as_str()
            .is_some_and(|e| e.contains("boom from flower")),
        "{failure}"
    );
}

#[test]
fn flower_counts_the_messages_waiting_in_a_queue() {
    let w = Watched::start("mon-flower-queues");
    // Flower learns which queues to count from the worker's `active_queues` reply.
    w.inspected();
    let mut client = Client::new(&w.redis);
    // The slot is taken by a long task; of three more, at most one is fetched ahead (the
    // prefetch allowance of -c 1), the others wait in `parked`.
    let long = client.send_to("parked", "demo.sleep", json!([30_000]), json!({}));
    w.task_in(&long, "STARTED");
    for n in 0..3 {
        client.send_to("parked", "demo.add", json!([n, n]), json!({}));
    }
    let waiting = wait_for("Flower to show the parked queue's length", || {
        let lengths = flower_json(&w.addr, "/api/queues/length");
        let shown = lengths["active_queues"]
            .as_array()
            .and_then(|q| q.iter().find(|q| q["name"] == "parked"))
            .and_then(|q| q["messages"].as_u64())
            .unwrap_or_else(|| panic!("no parked queue in {lengths}"));
        let actual = client.llen("parked") as u64;
        (shown == actual).then_some(actual)
    });
    assert!(
        (2..=3).contains(&waiting),
        "{waiting} waiting\n{}\n{}",
        w.worker.log(),
        w.flower.log()
    );
}

// ---- /metrics, /healthz and JSON logs ----

/// Reads Prometheus text from stdin with prometheus_client's own parser; prints every sample
/// as JSON.
const PARSE_METRICS: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name,
                        "labels": s.labels, "value": s.value})
print(json.dumps(samples))
"#;

fn parse_metrics(dir: &TestDir, text: &str) -> Vec<Value> {
    dir.write("parse_metrics.py", PARSE_METRICS);
    let input = dir.write("metrics.txt", text);
    let mut command = Command::new(python());
    command
        .current_dir(dir.path())
        .arg("parse_metrics.py")
        .stdin(std::fs::File::open(input).expect("open metrics.txt"));
    let out = Process::run_command(dir, command);
    assert!(
        out.status.success(),
        "the Prometheus parser refused:\n{}\n{text}",
        out.stderr
    );
    serde_json::from_str(&out.stdout).expect("parser output is JSON")
}

/// The value of the sample `name` with exactly these labels (among others it may have).
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

/// A worker `w1@metrics` serving `/metrics` and `/healthz` on a port it picks, logging JSON.
struct Measured {
    worker: Process,
    addr: String,
    client: Client,
    redis: RedisServer,
    dir: TestDir,
}

impl Measured {
    fn start(name: &str) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let plugins = dir.plugins(&["demo"]);
        let worker = Process::worker(
            &dir,
            &redis,
            &plugins,
            &[
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "-n",
                "w1@metrics",
            ],
        );
        // The log says which port was picked: the only place it shows.
        let addr = json_lines(&worker)
            .into_iter()
            .find(|l| l["message"] == "serving /metrics and /healthz")
            .and_then(|l| l["addr"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", worker.log()));
        let client = Client::new(&redis);
        Self {
            worker,
            addr,
            client,
            redis,
            dir,
        }
    }

    /// Sends each task and waits for every result; the ids.
    fn run(&mut self, tasks: &[(&str, Value)]) -> Vec<String> {
        let ids: Vec<String> = tasks
            .iter()
            .map(|(task, args)| self.client.send(task, args.clone()))
            .collect();
        for id in &ids {
            self.client.result(id);
        }
        ids
    }

    /// `/metrics` once the worker has finished every task it took, as Prometheus' parser reads
    /// it, and the text. A task's result is stored a moment before the rest of its bookkeeping
    /// (a dead-letter entry, the counters) is done: a scrape right after the result can miss it.
    fn scrape(&self) -> (Vec<Value>, String) {
        let text = wait_for("the worker to finish every task it took", || {
            let (status, text) = http_get(&self.addr, "/metrics", None).expect("/metrics answers");
            assert_eq!(status, 200, "{text}");
            let idle = ["taskhost_tasks_running 0", "taskhost_tasks_reserved 0"]
                .iter()
                .all(|gauge| text.lines().any(|line| line == *gauge));
            idle.then_some(text)
        });
        (parse_metrics(&self.dir, &text), text)
    }

    fn healthz(&self) -> (u16, String) {
        http_get(&self.addr, "/healthz", None).expect("/healthz answers")
    }
}

/// The worker's log lines that are JSON objects.
fn json_lines(worker: &Process) -> Vec<Value> {
    worker
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Five `demo.add`.
fn adds() -> Vec<(&'static str, Value)> {
    (0..5).map(|n| ("demo.add", json!([n, 1]))).collect()
}

/// The family names and types Prometheus' parser found.
fn types(samples: &[Value]) -> Vec<(&str, &str)> {
    samples
        .iter()
        .filter_map(|s| Some((s["family"].as_str()?, s["type"].as_str()?)))
        .collect()
}

#[test]
fn metrics_count_every_task_by_outcome_retries_limit_hits_and_dead_letters() {
    let mut m = Measured::start("mon-metrics-counters");
    let mut mix = adds();
    mix.extend([
        ("demo.fail", json!(["counted"])),
        ("demo.fail", json!(["counted"])),
        ("demo.nobody", json!([])),
        ("demo.retry", json!([2])),
    ]);
    m.run(&mix);
    let id = m
        .client
        .send_with_time_limit("demo.sleep", json!([10_000]), (None, Some(0.2)));
    m.client.result(&id);

    let (samples, text) = m.scrape();
    let tasks = |task: &str, outcome: &str| {
        sample(
            &samples,
            "taskhost_tasks_total",
            &[("task", task), ("outcome", outcome)],
        )
    };
    assert_eq!(tasks("demo.add", "succeeded"), Some(5.0), "{text}");
    assert_eq!(tasks("demo.fail", "failed"), Some(2.0), "{text}");
    assert_eq!(tasks("(unregistered)", "rejected"), Some(1.0), "{text}");
    assert_eq!(tasks("demo.retry", "retried"), Some(2.0), "{text}");
    assert_eq!(tasks("demo.retry", "succeeded"), Some(1.0), "{text}");
    assert_eq!(tasks("demo.sleep", "failed"), Some(1.0), "{text}");
    let retries = sample(
        &samples,
        "taskhost_task_retries_total",
        &[("task", "demo.retry")],
    );
    assert_eq!(retries, Some(2.0), "{text}");
    let time_hits = sample(
        &samples,
        "taskhost_sandbox_limit_hits_total",
        &[("plugin", "demo"), ("limit", "time")],
    );
    assert_eq!(time_hits, Some(1.0), "{text}");
    assert_eq!(
        sample(&samples, "taskhost_dead_lettered_total", &[]),
        Some(1.0)
    );
    let types = types(&samples);
    assert!(types.contains(&("taskhost_tasks", "counter")), "{types:?}");
}

#[test]
fn metrics_runtime_histogram_counts_every_run() {
    let mut m = Measured::start("mon-metrics-histogram");
    m.run(&adds());
    let (samples, text) = m.scrape();
    let runtimes = sample(
        &samples,
        "taskhost_task_runtime_seconds_count",
        &[("task", "demo.add")],
    );
    assert_eq!(runtimes, Some(5.0), "{text}");
    let all_in_inf = sample(
        &samples,
        "taskhost_task_runtime_seconds_bucket",
        &[("task", "demo.add"), ("le", "+Inf")],
    );
    assert_eq!(all_in_inf, Some(5.0), "{text}");
    let types = types(&samples);
    assert!(
        types.contains(&("taskhost_task_runtime_seconds", "histogram")),
        "{types:?}"
    );
}

#[test]
fn metrics_count_instances_made_and_recycled() {
    let mut m = Measured::start("mon-metrics-instances");
    m.run(&adds());
    let (samples, text) = m.scrape();
    let instances = |how| sample(&samples, "taskhost_instances_total", &[("how", how)]);
    let concurrency = sample(&samples, "taskhost_concurrency", &[]).expect("concurrency");
    // Every task that returned left its instance recycled for the next one: the worker made
    // one for the plugin's load and at most one per slot, not one per task.
    assert_eq!(instances("recycled"), Some(5.0), "{text}");
    let made = instances("instantiated").expect("instances made");
    assert!(made >= 2.0 && made <= 1.0 + concurrency, "{text}");
}

#[test]
fn metrics_gauges_report_queues_dead_letters_plugins_and_health() {
    let mut m = Measured::start("mon-metrics-gauges");
    // One task no plugin serves: dead-lettered.
    m.run(&[("demo.nobody", json!([]))]);
    let (samples, text) = m.scrape();
    assert_eq!(
        sample(&samples, "taskhost_dead_letter_length", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&samples, "taskhost_queue_length", &[("queue", "celery")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&samples, "taskhost_plugin_info", &[("plugin", "demo")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &samples,
            "taskhost_plugin_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&samples, "taskhost_healthy", &[]),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn healthz_is_503_while_redis_is_down_and_200_once_it_is_back() {
    let mut m = Measured::start("mon-healthz");
    let (status, body) = m.healthz();
    assert_eq!(status, 200, "{body}");
    m.redis.kill();
    let (_, body) = wait_for("/healthz to report Redis down", || {
        Some(m.healthz()).filter(|(status, _)| *status == 503)
    });
    assert!(body.contains("\"connected\":false"), "{body}");
    m.redis.restart();
    wait_for("/healthz to recover", || {
        Some(m.healthz()).filter(|(status, _)| *status == 200)
    });
}

#[test]
fn livez_stays_alive_through_a_redis_outage_while_taskhost_health_follows_healthz() {
    let mut m = Measured::start("mon-livez");
    let health = |m: &Measured, extra: &[&str]| {
        let mut args = vec!["health", "--addr", m.addr.as_str()];
        args.extend(extra);
        Process::run(&m.dir, &args)
    };
    assert!(health(&m, &[]).status.success(), "healthy at start");
    m.redis.kill();
    wait_for("/healthz to report Redis down", || {
        Some(m.healthz()).filter(|(status, _)| *status == 503)
    });
    let (status, body) = http_get(&m.addr, "/livez", None).expect("/livez answers");
    assert_eq!(
        status, 200,
        "a Redis outage is not a restart's to mend: {body}"
    );
    assert!(health(&m, &["--live"]).status.success());
    let unhealthy = health(&m, &[]);
    assert_eq!(unhealthy.status.code(), Some(1), "{unhealthy:?}");
    assert!(
        unhealthy.stdout.contains("\"connected\":false"),
        "{unhealthy:?}"
    );
    m.redis.restart();
    wait_for("taskhost health to pass again", || {
        health(&m, &[]).status.success().then_some(())
    });
}

#[test]
fn taskhost_health_fails_when_nothing_listens() {
    let dir = TestDir::new("mon-health-nothing");
    let addr = format!("127.0.0.1:{}", free_port());
    let out = Process::run(&dir, &["health", "--addr", &addr]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains(&addr), "{out:?}");
}

#[test]
fn the_metrics_endpoint_answers_404_elsewhere() {
    let m = Measured::start("mon-404");
    let (status, _) = http_get(&m.addr, "/nothing", None).expect("answers");
    assert_eq!(status, 404);
}

#[test]
fn json_logs_give_one_object_per_line_with_the_tasks_fields() {
    let mut m = Measured::start("mon-json-log");
    let ids = m.run(&adds());
    // The log format is the behaviour under test here, so the log line is what is checked.
    let succeeded = wait_for("a JSON line for a demo.add that succeeded", || {
        json_lines(&m.worker)
            .into_iter()
            .find(|l| l["message"] == "task succeeded" && l["task"] == "demo.add")
    });
    assert_eq!(succeeded["level"], "INFO", "{succeeded}");
    assert!(
        ids.iter().any(|id| succeeded["task_id"] == id.as_str()),
        "{succeeded}"
    );
    assert!(
        succeeded["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("0.1.0")),
        "{succeeded}"
    );
    assert!(succeeded["runtime_s"].as_f64().is_some(), "{succeeded}");
}
