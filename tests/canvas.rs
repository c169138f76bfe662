//! Celery's canvas, sent by real Python Celery 5.7 producers and carried out by taskhost
//! workers: chains, groups, chords, link and link_error. A Python snippet states what a Celery
//! user sees (its `assert`s); how often a body ran and what is left of a chord's keys are read
//! from Redis.

use std::process::Command;
use taskhost_tests::{Process, RedisServer, ResultFeed, TestDir, wait_for};

/// Python tasks of the demo plugin's names, for the producer side.
const CELERY_APP: &str = taskhost_tests::DEMO_CELERY_APP;

const PRELUDE: &str = r#"
import uuid
import celery.exceptions
from celery import chain, chord, group
from celery.result import AsyncResult, GroupResult
from celery_app import app, add, tsum, fail, echo

def raises(result, kind):
    try:
        result.get(timeout=30)
    except kind as e:
        return e
    raise SystemExit(f"{result.id} did not raise {kind.__name__}")
"#;

struct Setup {
    dir: TestDir,
    redis: RedisServer,
    workers: Vec<Process>,
}

/// A Redis and one taskhost worker serving the demo plugin.
fn setup(name: &str) -> Setup {
    let mut s = bare(name);
    let plugins = s.dir.plugins(&["demo"]);
    s.workers = vec![Process::worker(&s.dir, &s.redis, &plugins, &["-c", "4"])];
    s
}

/// A Redis and no worker yet.
fn bare(name: &str) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    Setup {
        dir,
        redis,
        workers: Vec::new(),
    }
}

impl Setup {
    /// `python SCRIPT` in the test directory, with the broker and backend under both the names
    /// the snippets read and Celery's own.
    fn python_command(&self, script: &str) -> Command {
        taskhost_tests::python_in(&self.dir, &self.redis, &[script])
    }

    /// Runs `code` (after [`PRELUDE`]) with Python Celery and returns what it printed; fails
    /// the test, with the workers' logs, unless it runs to its end.
    fn python(&self, code: &str) -> String {
        self.dir.write("celery_app.py", CELERY_APP);
        let logs = || {
            let logs: Vec<String> = self.workers.iter().map(Process::log).collect();
            logs.join("\n---\n")
        };
        taskhost_tests::run_snippet(&self.dir, &self.redis, PRELUDE, code, logs)
    }

    /// What the snippet printed after `label=`.
    fn printed(out: &str, label: &str) -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{label}=")))
            .unwrap_or_else(|| panic!("the snippet printed no {label}=: {out}"))
            .to_owned()
    }

    fn backend_keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.redis.conn(1);
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut conn)
            .expect("KEYS")
    }
}

#[test]
fn a_chain_passes_each_result_to_the_next_step() {
    let s = setup("canvas-chain");
    s.python(
        r#"
r = (add.s(2, 2) | add.s(4) | add.s(8)).delay()
assert r.get(timeout=30) == 16
assert r.parent.get(timeout=5) == 8 and r.parent.parent.get(timeout=5) == 4
assert r.parent.parent.children[0].id == r.parent.id
"#,
    );
}

#[test]
fn a_group_of_100_gives_the_sums_in_order_and_survives_save_and_restore() {
    let s = setup("canvas-group");
    s.python(
        r#"
g = group(add.s(i, i) for i in range(100)).delay()
assert g.get(timeout=60) == [2 * i for i in range(100)]
g.save()
assert GroupResult.restore(g.id).get(timeout=5) == [2 * i for i in range(100)]
assert all(AsyncResult(r.id)._get_task_meta()["group_id"] == g.id for r in g.results)
"#,
    );
}

#[test]
fn a_chord_calls_its_body_once_with_every_result_and_cleans_up_its_keys() {
    let s = setup("canvas-chord");
    let feed = ResultFeed::start(&s.redis);
    let out = s.python(
        r#"
r = chord(add.s(i, i) for i in range(50))(tsum.s())
assert r.get(timeout=60) == sum(2 * i for i in range(50))
print(f"body={r.id}")
print(f"group={r.parent.id}")
"#,
    );
    let body = Setup::printed(&out, "body");
    let group = Setup::printed(&out, "group");
    assert_eq!(feed.endings(&body), 1, "the body ran once");
    let left = s.backend_keys(&format!("celery-taskset-meta-{group}*"));
    assert_eq!(left, [format!("celery-taskset-meta-{group}.c")], "{left:?}");
    let mut conn = s.redis.conn(1);
    let marker: String = redis::cmd("GET")
        .arg(format!("celery-taskset-meta-{group}.c"))
        .query(&mut conn)
        .expect("GET");
    assert_eq!(marker, "done");
}

#[test]
fn a_chord_survives_a_worker_killed_during_its_header() {
    let mut s = bare("canvas-chord-kill");
    // Slow enough that the header is part done when the first worker dies.
    let config = s.dir.write(
        "taskhost.toml",
        "[tasks.\"demo.add\"]\nrate_limit = \"25/s\"\n",
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = s.dir.plugins(&["demo"]);
    let flags = |node: &'static str| {
        let mut flags = vec!["-c", "2", "--heartbeat-lapse", "2", "-n", node];
        flags.extend(["--config", config.as_str()]);
        flags
    };
    let mut first = Process::worker(&s.dir, &s.redis, &plugins, &flags("w1@test"));
    let feed = ResultFeed::start(&s.redis);
    s.dir.write("celery_app.py", CELERY_APP);
    s.dir.write(
        "producer.py",
        &format!(
            "{PRELUDE}\nr = chord(add.s(i, i) for i in range(50))(tsum.s())\n\
             print(f'body={{r.id}}', flush=True)\n\
             assert r.get(timeout=90) == sum(2 * i for i in range(50))\nprint('snippet OK')\n"
        ),
    );
    let mut python = Process::spawn(&s.dir, "producer", s.python_command("producer.py"));
    let body = wait_for("the producer to print the body id", || {
        python
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("body=").map(str::to_owned))
    });
    let mut conn = s.redis.conn(1);
    wait_for("ten header parts counted", || {
        let joins: Vec<String> = redis::cmd("KEYS")
            .arg("celery-taskset-meta-*.j")
            .query(&mut conn)
            .unwrap_or_default();
        let counted: usize = joins.first().map_or(0, |key| {
            redis::cmd("ZCARD").arg(key).query(&mut conn).unwrap_or(0)
        });
        (counted >= 10).then_some(())
    });
    first.stop_with(libc::SIGKILL);
    s.workers.push(Process::worker(
        &s.dir,
        &s.redis,
        &plugins,
        &flags("w2@test"),
    ));
    let status = python.wait_exit();
    assert!(
        status.success() && python.log().contains("snippet OK"),
        "producer: {}\nworkers:\n{}",
        python.log(),
        s.workers[0].log()
    );
    assert_eq!(feed.endings(&body), 1, "the body ran once");
}

#[test]
fn a_chord_with_a_failing_part_fails_its_body_with_chord_error_and_calls_its_link_error() {
    let s = setup("canvas-chord-fail");
    s.python(
        r#"
errback = str(uuid.uuid4())
body = tsum.s()
body.link_error(echo.s().set(task_id=errback))
r = chord([add.s(1, 1), fail.si("boom"), add.s(2, 2)])(body)
# r.get() raises the failed part's own error first, as Celery's does; the body's result,
# read by its id, is the ChordError.
raises(r, RuntimeError)
e = raises(AsyncResult(r.id), celery.exceptions.ChordError)
assert "RuntimeError('boom')" in str(e), repr(e)
assert AsyncResult(errback).get(timeout=30) == r.id
"#,
    );
}

#[test]
fn link_gets_the_result_and_link_error_gets_the_failed_task_id() {
    let s = setup("canvas-links");
    s.python(
        r#"
callback, errback = str(uuid.uuid4()), str(uuid.uuid4())
ok = add.apply_async((2, 2), link=add.s(10).set(task_id=callback))
assert ok.get(timeout=30) == 4
assert AsyncResult(callback).get(timeout=30) == 14
failed = fail.apply_async(("boom",), link_error=echo.s().set(task_id=errback))
raises(failed, RuntimeError)
assert AsyncResult(errback).get(timeout=30) == failed.id
"#,
    );
}

#[test]
fn a_chain_whose_second_step_is_a_chord_feeds_the_header_and_returns_the_body() {
    let s = setup("canvas-chain-chord");
    s.python(
        r#"
r = (add.s(1, 1) | chord([add.s(i) for i in range(3)], tsum.s())).delay()
assert r.get(timeout=30) == (2 + 0) + (2 + 1) + (2 + 2)
"#,
    );
}

#[test]
fn a_failed_chain_step_fails_every_later_step() {
    let s = setup("canvas-chain-fail");
    s.python(
        r#"
r = (add.s(1, 1) | fail.si("boom") | add.s(1) | add.s(2)).delay()
e = raises(r, RuntimeError)
assert str(e) == "boom", repr(e)
assert r.parent.state == "FAILURE"
"#,
    );
}

#[test]
fn a_plugin_fans_out_tasks_a_group_and_a_chord_from_inside_a_task() {
    let s = setup("canvas-fanout");
    s.python(
        r#"
r = app.send_task("demo.fanout", (100,))
out = r.get(timeout=30)
assert [AsyncResult(i).get(timeout=30) for i in out["tasks"]] == [2 * i for i in range(100)]
assert AsyncResult(out["chord"]).get(timeout=30) == sum(2 * i for i in range(100))
first = AsyncResult(out["tasks"][0])._get_task_meta()
assert first["parent_id"] == r.id, first
members = [c for c in r.children if c.id == out["group"]]
assert members and members[0].get(timeout=30) == [i + 1 for i in range(100)], r.children
"#,
    );
}

#[test]
fn a_nested_chord_failure_fails_the_enclosing_chord_and_fires_link_error_once() {
    let s = setup("canvas-nested-chord");
    let feed = ResultFeed::start(&s.redis);
    let out = s.python(
        r#"
errback = str(uuid.uuid4())
inner = chord([fail.si("boom"), add.si(1, 1)], tsum.s())
outer = chord([inner, add.si(2, 2)], tsum.s())
outer.link_error(echo.s().set(task_id=errback))
r = outer.delay()
# The enclosing chord's body fails (it does not wait forever) ...
e = raises(AsyncResult(r.id), celery.exceptions.ChordError)
# ... and the errback got the failed inner chord's body, once.
inner_body = r.parent.results[0].id
assert AsyncResult(errback).get(timeout=30) == inner_body
print(f"errback={errback}")
"#,
    );
    let errback = Setup::printed(&out, "errback");
    assert_eq!(feed.endings(&errback), 1, "the errback ran once");
}

#[test]
fn the_readme_canvas_example_runs() {
    let s = setup("canvas-readme");
    s.dir.write(
        "readme_example.py",
        &taskhost_tests::readme_block("canvas-example"),
    );
    let out = Process::run_command(&s.dir, s.python_command("readme_example.py"));
    assert!(
        out.status.success() && out.stdout.contains("canvas OK"),
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        s.workers[0].log()
    );
}

#[test]
fn a_plugin_sends_another_plugins_task_only_when_granted() {
    let mut s = bare("canvas-send-grant");
    let plugins = s.dir.plugins(&["demo"]);
    let config = s.dir.write(
        "taskhost.toml",
        "[plugins.demo]\nallow_send = [\"granted.*\"]\n",
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    s.workers.push(Process::worker(
        &s.dir,
        &s.redis,
        &plugins,
        &["--config", &config],
    ));
    s.python(
        r#"
e = raises(app.send_task("demo.send", ("other.task", [1])), PermissionError)
assert "not granted: other.task" in str(e), repr(e)
sent = app.send_task("demo.send", ("granted.task", [1])).get(timeout=30)
# Sent, and refused by the worker as no plugin serves it: proof it reached the queue.
raises(AsyncResult(sent), celery.exceptions.NotRegistered)
"#,
    );
}
