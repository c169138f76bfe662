//! Interoperability with real Python Celery 5.7 from PyPI, both ways: Python producers and
//! `AsyncResult.get()` against a taskhost worker, and `taskhost call` against a Celery worker.

use std::process::Command;
use taskhost_tests::{Process, RedisServer, TestDir, python};

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

/// A producer as the seed service's API writes it: `.delay()`, `send_task()`, `.get()`.
const PRODUCER: &str = r#"
import celery.exceptions
from celery_app import app, add

assert add.delay(2, 3).get(timeout=10) == 5
assert app.send_task("demo.add", (2, 3)).get(timeout=10) == 5
assert app.send_task("demo.add", kwargs={"x": 40, "y": 2}).get(timeout=10) == 42
value = {"nested": [1, None, "ü", {"big": 2**62}], "f": 1.5}
assert app.send_task("demo.echo", (value,)).get(timeout=10) == value

try:
    app.send_task("demo.fail", ("boom from python",)).get(timeout=10)
    raise SystemExit("demo.fail did not raise")
except RuntimeError as e:
    assert str(e) == "boom from python", repr(e)

try:
    app.send_task("demo.nobody").get(timeout=10)
    raise SystemExit("an unknown task did not raise")
except celery.exceptions.NotRegistered as e:
    assert "demo.nobody" in str(e), repr(e)

r = app.send_task("demo.retry", (2,))
assert r.get(timeout=10) == 2 and r.status == "SUCCESS"
print("producer OK")
"#;

fn python_command(dir: &TestDir, redis: &RedisServer, args: &[&str]) -> Command {
    dir.write("celery_app.py", CELERY_APP);
    let mut command = Command::new(python());
    command
        .current_dir(dir.path())
        .args(args)
        .env("BROKER", redis.url(0))
        .env("BACKEND", redis.url(1))
        .env("PYTHONPATH", dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

#[test]
fn python_producers_get_results_from_a_taskhost_worker() {
    let dir = TestDir::new("py-producer");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, &[]);
    dir.write("producer.py", PRODUCER);
    let out = Process::run_command(&dir, python_command(&dir, &redis, &["producer.py"]));
    assert!(
        out.status.success() && out.stdout.contains("producer OK"),
        "python producer failed ({}):\n{}\n{}\nworker log:\n{}",
        out.status,
        out.stdout,
        out.stderr,
        worker.log()
    );
}

#[test]
fn a_celery_worker_runs_what_taskhost_call_sends() {
    let dir = TestDir::new("py-worker");
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
    celery.wait_log("ready.");
    let (broker, backend) = (redis.url(0), redis.url(1));
    let call = |args: &[&str]| {
        let mut all = vec![
            "call",
            "--broker",
            &broker,
            "--result-backend",
            &backend,
            "--wait",
        ];
        all.extend_from_slice(args);
        Process::run(&dir, &all)
    };
    let out = call(&["demo.add", "--args", "[2, 3]"]);
    assert!(
        out.status.success(),
        "{out:?}\ncelery log:\n{}",
        celery.log()
    );
    assert_eq!(out.stdout.trim(), "5");
    let out = call(&["demo.add", "--kwargs", r#"{"x": 1, "y": 2}"#]);
    assert_eq!(out.stdout.trim(), "3", "{out:?}");
    let out = call(&["demo.fail", "--args", r#"["from rust"]"#]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("ValueError: from rust"), "{out:?}");
}

/// Countdown, eta, expires and revoke as a Python producer uses them.
const SCHEDULING: &str = r#"
import time
from datetime import datetime, timedelta, timezone
import redis
import celery.exceptions
from celery_app import app

broker = redis.Redis.from_url(app.conf.broker_url)

def raises(result, kind):
    try:
        result.get(timeout=10)
    except kind as e:
        return e
    raise SystemExit(f"{result.id} did not raise {kind.__name__}")

def until(what, check, within=20):
    deadline = time.time() + within
    while not check():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)

sent = datetime.now(timezone.utc)
r = app.send_task("demo.add", (1, 2), countdown=1)
assert r.get(timeout=10) == 3
assert r.date_done >= sent + timedelta(seconds=1), (r.date_done, sent)

eta = datetime.now(timezone.utc) + timedelta(seconds=1)
r = app.send_task("demo.add", (2, 2), eta=eta)
assert r.get(timeout=10) == 4
assert r.date_done >= eta, (r.date_done, eta)

r = app.send_task("demo.add", (1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=1))
e = raises(r, celery.exceptions.TaskRevokedError)
assert "expired" in str(e), repr(e)

# Revoked while it waits for its countdown: it never runs.
r = app.send_task("demo.add", (5, 5), countdown=2)
app.control.revoke(r.id)
raises(r, celery.exceptions.TaskRevokedError)
until("the revoked task to leave the delayed set and the queue",
      lambda: broker.zcard("taskhost:delayed") == 0 and broker.llen("celery") == 0)
until("the revoked task to be settled",
      lambda: not any(broker.llen(k) for k in broker.keys("taskhost:inflight:*")))
assert app.AsyncResult(r.id).state == "REVOKED"

# Revoked with terminate while it runs: the one slot (-c 1) is free again at once.
r = app.send_task("demo.sleep", (60000,))
until("the long task to start", lambda: any(broker.llen(k) for k in broker.keys("taskhost:inflight:*")))
app.control.revoke(r.id, terminate=True)
assert app.send_task("demo.add", (1, 1)).get(timeout=10) == 2
assert app.AsyncResult(r.id).state == "REVOKED"
print("scheduling OK")
"#;

#[test]
fn celery_countdown_eta_expires_and_revoke_are_honoured() {
    let dir = TestDir::new("py-scheduling");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, &["-c", "1"]);
    dir.write("scheduling.py", SCHEDULING);
    let out = Process::run_command(&dir, python_command(&dir, &redis, &["scheduling.py"]));
    assert!(
        out.status.success() && out.stdout.contains("scheduling OK"),
        "{}\n{}\nworker log:\n{}",
        out.stdout,
        out.stderr,
        worker.log()
    );
    let log = worker.log();
    assert!(log.contains("task revoked before it ran"), "{log}");
    assert!(log.contains("task terminated by a revoke"), "{log}");
}

#[test]
fn a_revoke_reaches_workers_started_after_it() {
    let dir = TestDir::new("py-revoke-later");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let mut first =
        Process::worker_logged(&dir, "first.log", &redis, &plugins, &["-n", "first@test"]);
    let id = "revoked-before-it-was-sent";
    dir.write(
        "revoke.py",
        &format!("from celery_app import app\napp.control.revoke({id:?})\nprint('revoked')\n"),
    );
    let out = Process::run_command(&dir, python_command(&dir, &redis, &["revoke.py"]));
    assert!(out.status.success(), "{out:?}");
    first.wait_log("tasks revoked");
    assert!(first.stop_with(libc::SIGTERM).success());
    let second =
        Process::worker_logged(&dir, "second.log", &redis, &plugins, &["-n", "second@test"]);
    let mut client = taskhost_tests::Client::new(&redis);
    client.send_as(id, "demo.add", serde_json::json!([1, 2]));
    let doc = client.result(id);
    assert_eq!(doc["status"], "REVOKED", "{doc}");
    second.wait_log("task revoked before it ran");
    assert!(!second.log().contains("task succeeded"), "{}", second.log());
}
