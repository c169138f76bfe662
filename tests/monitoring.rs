//! Monitoring with the operators' real tools from PyPI: `celery inspect`/`celery control`
//! against a taskhost worker, Flower 2.2 (with basic auth) watching it, Prometheus' own parser
//! reading `/metrics`, and JSON log lines.

use serde_json::{Value, json};
use std::process::Command;
use taskhost_tests::{
    Client, Process, RedisServer, TestDir, free_port, http_get, python, wait_for,
};

/// Runs the venv's `python ARGS` to completion, with `BROKER`/`BACKEND` set; its stdout.
fn run_python(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> String {
    let mut command = Command::new(python());
    command
        .current_dir(dir.path())
        .args(args)
        .env("BROKER", redis.url(0))
        .env("BACKEND", redis.url(1))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = Process::run_command(dir, command);
    assert!(
        out.status.success(),
        "python {args:?} failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Runs `celery -b BROKER --result-backend BACKEND ARGS`; its stdout.
fn celery(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> String {
    let (broker, backend) = (redis.url(0), redis.url(1));
    let mut all = vec!["-m", "celery", "-b", &broker, "--result-backend", &backend];
    all.extend_from_slice(args);
    run_python(dir, redis, &all)
}

/// Writes the Python script `name` and runs it; its stdout.
fn python_script(dir: &TestDir, redis: &RedisServer, name: &str, code: &str) -> String {
    dir.write(name, code);
    run_python(dir, redis, &[name])
}

/// What `app.control` sees, and changes, with the Python API (replies checked field by field).
const CONTROL: &str = r#"
import os, sys, time
from celery import Celery

app = Celery("mon", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
node = sys.argv[1] if len(sys.argv) > 1 else "w1@mon"
i = app.control.inspect(destination=[node], timeout=2)

def only(reply):
    assert reply and node in reply, reply
    return reply[node]

# A task far in the future shows as scheduled, with its request.
later = app.send_task("demo.add", (1, 2), countdown=600)
deadline = time.time() + 10
while True:
    scheduled = only(i.scheduled())
    if any(s["request"]["id"] == later.id for s in scheduled):
        break
    assert time.time() < deadline, scheduled
entry = [s for s in scheduled if s["request"]["id"] == later.id][0]
assert entry["request"]["name"] == "demo.add" and entry["request"]["args"] == [1, 2], entry
assert entry["eta"], entry

assert only(i.reserved()) == [], "nothing is waiting for a slot"
conf = only(i.conf())
assert conf["worker_concurrency"] == 2 and conf["broker_url"] == os.environ["BROKER"], conf
queues = [q["name"] for q in only(i.active_queues())]
assert queues == ["celery"], queues

# Revoked ids are listed.
reply = app.control.revoke(later.id, destination=[node], reply=True)
assert "flagged as revoked" in reply[0][node]["ok"], reply
assert later.id in only(i.revoked())
assert later.state == "REVOKED", later.state

# Time limits changed at run time apply to the next task.
reply = app.control.time_limit("demo.sleep", soft=0.2, hard=0.5, destination=[node], reply=True)
assert reply == [{node: {"ok": "time limits set successfully"}}], reply
r = app.send_task("demo.sleep", (5000,))
try:
    r.get(timeout=10)
    raise SystemExit("demo.sleep outlived the time limit set by control")
except Exception as e:
    assert "TimeLimitExceeded" in type(e).__name__ or "time limit" in str(e), repr(e)
reply = app.control.time_limit("nobody.task", soft=1, hard=2, destination=[node], reply=True)
assert reply == [{node: {"error": "unknown task"}}], reply

# Rate limits space the starts: 3 tasks at 120/m start at least 0.5 s apart.
reply = app.control.rate_limit("demo.add", "120/m", destination=[node], reply=True)
assert reply == [{node: {"ok": "new rate limit set successfully"}}], reply
rs = [app.send_task("demo.add", (n, n)) for n in range(3)]
assert [r.get(timeout=20) for r in rs] == [0, 2, 4]
times = sorted(r.date_done.timestamp() for r in rs)
assert times[2] - times[0] >= 0.9, times
reply = app.control.rate_limit("demo.add", "0", destination=[node], reply=True)
assert reply == [{node: {"ok": "rate limit disabled successfully"}}], reply

# The pool grows and shrinks.
assert app.control.pool_grow(3, destination=[node], reply=True) == [{node: {"ok": "pool will grow"}}]
assert only(i.stats())["pool"]["max-concurrency"] == 5
assert app.control.pool_shrink(4, destination=[node], reply=True) == [{node: {"ok": "pool will shrink"}}]
assert only(i.stats())["pool"]["max-concurrency"] == 1

# Addressing: a command for another node is not answered.
assert app.control.ping(destination=["nobody@nowhere"], timeout=0.5) == []
print("control OK")
"#;

#[test]
fn celery_inspect_and_control_drive_a_taskhost_worker() {
    let dir = TestDir::new("mon-control");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let mut worker = Process::worker(&dir, &redis, &plugins, &["-n", "w1@mon", "-c", "2"]);
    let mut client = Client::new(&redis);

    let out = celery(&dir, &redis, &["inspect", "ping"]);
    assert!(out.contains("w1@mon: OK") && out.contains("pong"), "{out}");
    let out = celery(&dir, &redis, &["inspect", "registered"]);
    assert!(
        out.contains("demo.add") && out.contains("demo.sleep"),
        "{out}"
    );
    let out = celery(&dir, &redis, &["inspect", "stats"]);
    assert!(
        out.contains("\"max-concurrency\": 2") && out.contains("taskhost:wasm"),
        "{out}"
    );

    // A running task shows in `inspect active`, and `control revoke --terminate` stops it.
    let id = client.send("demo.sleep", json!([20_000]));
    wait_for("demo.sleep in inspect active", || {
        celery(&dir, &redis, &["inspect", "active"])
            .contains(&id)
            .then_some(())
    });
    let out = celery(&dir, &redis, &["control", "terminate", "SIGTERM", &id]);
    assert!(
        out.contains("flagged as revoked") && out.contains("1 terminated"),
        "{out}"
    );
    assert_eq!(client.result(&id)["status"], "REVOKED");
    let out = celery(&dir, &redis, &["control", "revoke", "no-such-task"]);
    assert!(out.contains("flagged as revoked"), "{out}");

    // Queues added and cancelled at run time.
    let out = celery(&dir, &redis, &["control", "add_consumer", "extra"]);
    assert!(out.contains("add consumer extra"), "{out}");
    let out = celery(&dir, &redis, &["control", "add_consumer", "extra"]);
    assert!(out.contains("already consuming from 'extra'"), "{out}");
    let id = client.send_to("extra", "demo.add", json!([2, 3]), json!({}));
    assert_eq!(client.result(&id)["result"], 5);
    let out = celery(&dir, &redis, &["control", "cancel_consumer", "extra"]);
    assert!(out.contains("no longer consuming from extra"), "{out}");
    let parked = client.send_to("extra", "demo.add", json!([1, 1]), json!({}));
    let after = client.send("demo.add", json!([1, 2]));
    assert_eq!(client.result(&after)["result"], 3);
    assert_eq!(client.llen("extra"), 1, "a cancelled queue is not consumed");
    assert!(client.state(&parked).is_none());

    let out = python_script(&dir, &redis, "control.py", CONTROL);
    assert!(out.contains("control OK"), "{out}\n{}", worker.log());

    let out = celery(&dir, &redis, &["control", "shutdown"]);
    assert!(out.contains("shutting down"), "{out}");
    let status = worker.wait_exit();
    assert!(status.success(), "{status}\n{}", worker.log());
}

/// The port Flower serves on, once it answers.
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

/// Two tasks from a Python producer, waited for; prints their ids.
const PRODUCE: &str = r#"
import os
from celery import Celery
app = Celery("mon", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
ok = app.send_task("demo.add", (2, 3))
failed = app.send_task("demo.fail", ("boom from flower",))
assert ok.get(timeout=10) == 5
assert failed.get(propagate=False, timeout=10) is not None and failed.state == "FAILURE"
print(ok.id, failed.id)
"#;

fn flower_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path, AUTH).expect("Flower answers");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

#[test]
fn flower_shows_taskhost_workers_tasks_and_queue_lengths() {
    let dir = TestDir::new("mon-flower");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let (_flower, addr) = start_flower(&dir, &redis);
    let (status, _) = http_get(&addr, "/api/workers", None).expect("Flower answers");
    assert_eq!(status, 401, "the API is behind basic auth");

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
    // Flower stores inspect replies after it answers a refresh: ask until they are in.
    let workers = wait_for("Flower to hold the worker's inspect replies", || {
        let workers = flower_json(&addr, "/api/workers?refresh=1");
        workers["w1@flower"]["stats"].is_object().then_some(workers)
    });
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

    // Sent from Python, as the seed service's producers send them.
    let sent = python_script(&dir, &redis, "produce.py", PRODUCE);
    let (ok, failed) = sent
        .trim()
        .split_once(' ')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap_or_else(|| panic!("produce.py printed {sent:?}"));
    let mut client = Client::new(&redis);
    let tasks = wait_for("Flower to show both tasks finished", || {
        let tasks = flower_json(&addr, "/api/tasks");
        (tasks[&ok]["state"] == "SUCCESS" && tasks[&failed]["state"] == "FAILURE").then_some(tasks)
    });
    let success = &tasks[&ok];
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
    let failure = &tasks[&failed];
    assert!(
        failure["exception"]
            .as_str()
            .is_some_and(|e| e.contains("boom from flower")),
        "{failure}"
    );

    // The slot is taken by a long task; of three more, at most one is fetched ahead (the
    // prefetch allowance of -c 1), the others wait in `parked`.
    let long = client.send_to("parked", "demo.sleep", json!([30_000]), json!({}));
    wait_for("the long task to show as started", || {
        let tasks = flower_json(&addr, "/api/tasks");
        (tasks[&long]["state"] == "STARTED").then_some(())
    });
    for n in 0..3 {
        client.send_to("parked", "demo.add", json!([n, n]), json!({}));
    }
    let waiting = wait_for("Flower to show the parked queue's length", || {
        let lengths = flower_json(&addr, "/api/queues/length");
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
        "{waiting} waiting\n{}",
        worker.log()
    );
}

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

#[test]
fn metrics_count_what_ran_and_healthz_follows_redis() {
    let dir = TestDir::new("mon-metrics");
    let mut redis = RedisServer::start(&dir);
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
    // The log says which port was picked.
    let addr = worker
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "serving /metrics and /healthz")
        .and_then(|l| l["addr"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{}", worker.log()));

    let mut client = Client::new(&redis);
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(client.send("demo.add", json!([n, 1])));
    }
    for _ in 0..2 {
        ids.push(client.send("demo.fail", json!(["counted"])));
    }
    ids.push(client.send("demo.nobody", json!([])));
    ids.push(client.send("demo.retry", json!([2])));
    ids.push(client.send_with_time_limit("demo.sleep", json!([10_000]), (None, Some(0.2))));
    for id in &ids {
        client.result(id);
    }

    let (status, text) = http_get(&addr, "/metrics", None).expect("/metrics answers");
    assert_eq!(status, 200, "{text}");
    let samples = parse_metrics(&dir, &text);
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
    assert_eq!(
        sample(&samples, "taskhost_dead_letter_length", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&samples, "taskhost_queue_length", &[("queue", "celery")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&samples, "taskhost_plugin_info", &[("plugin", "demo")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &samples,
            "taskhost_plugin_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(sample(&samples, "taskhost_healthy", &[]), Some(1.0));
    let types: Vec<(&str, &str)> = samples
        .iter()
        .filter_map(|s| Some((s["family"].as_str()?, s["type"].as_str()?)))
        .collect();
    assert!(types.contains(&("taskhost_tasks", "counter")), "{types:?}");
    assert!(
        types.contains(&("taskhost_task_runtime_seconds", "histogram")),
        "{types:?}"
    );

    // One JSON object per log line, with the task's fields.
    let succeeded = worker
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "task succeeded" && l["task"] == "demo.add")
        .unwrap_or_else(|| panic!("no JSON task line:\n{}", worker.log()));
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

    // Healthy only while consuming: not while Redis is down, again once it is back.
    let health = || http_get(&addr, "/healthz", None).expect("/healthz answers");
    assert_eq!(health().0, 200, "{}", health().1);
    redis.kill();
    let (_, body) = wait_for("/healthz to report Redis down", || {
        Some(health()).filter(|(status, _)| *status == 503)
    });
    assert!(body.contains("\"connected\":false"), "{body}");
    redis.restart();
    wait_for("/healthz to recover", || {
        Some(health()).filter(|(status, _)| *status == 200)
    });
    let (status, _) = http_get(&addr, "/nothing", None).expect("answers");
    assert_eq!(status, 404);
}
