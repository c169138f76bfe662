//! Trust boundaries (SECURITY.md): what a plugin, a producer or a skewed clock cannot do to a
//! worker. Each test runs a real worker on a real Redis with a stream of `demo.add` beside the
//! attack, all of which must succeed; outcomes are read from Redis or from Python Celery.

use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use taskhost_tests::{
    Beside, Client, HttpStub, Process, RedisServer, Reply, ResultFeed, TestDir, test_plugin_wasm,
    wait_for,
};

const NODE: &str = "trust@test";

/// A worker (`-c 4`, task events on) serving demo and the hostile test plugin.
struct Setup {
    worker: Process,
    client: Client,
    redis: RedisServer,
    dir: TestDir,
}

fn setup(name: &str, config: &str) -> Setup {
    setup_with(name, config, &[("hostile", "hostile.wasm")])
}

/// [`setup`] with `extra` test plugins (built name, file name) beside demo.
fn setup_with(name: &str, config: &str, extra: &[(&str, &str)]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    for (built, file) in extra {
        std::fs::copy(test_plugin_wasm(built), plugins.join(file)).expect("a test plugin");
    }
    let config = dir.write("taskhost.toml", config);
    let config = config.to_string_lossy().into_owned();
    let args = ["-n", NODE, "-c", "4", "-E", "--config", config.as_str()];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    let client = Client::new(&redis);
    Setup {
        worker,
        client,
        redis,
        dir,
    }
}

impl Setup {
    /// Runs `code` with Python Celery (an `app` on the test's Redis is defined first); fails
    /// the test, with the worker's log, unless it runs to its end.
    fn python(&self, code: &str) {
        const PRELUDE: &str = "import os\nfrom celery import Celery\n\
            app = Celery('trust', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])";
        let logs = || self.worker.log();
        taskhost_tests::run_snippet(&self.dir, &self.redis, PRELUDE, code, logs);
    }
}

/// Task events as Flower receives them, recorded from before the test sends anything.
struct TaskEvents {
    seen: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TaskEvents {
    fn start(redis: &RedisServer) -> Self {
        let mut conn = redis.conn(0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, subscribed) = std::sync::mpsc::channel();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut pubsub = conn.as_pubsub();
                pubsub
                    .subscribe("/0.celeryev/task.multi")
                    .expect("subscribe to task events");
                pubsub
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                let _ = ready.send(());
                while !stop.load(Ordering::SeqCst) {
                    let Ok(message) = pubsub.get_message() else {
                        continue;
                    };
                    let payload: String = message.get_payload().expect("payload");
                    let envelope: Value = serde_json::from_str(&payload).expect("envelope");
                    let body = base64::engine::general_purpose::STANDARD
                        .decode(envelope["body"].as_str().unwrap_or_default())
                        .expect("body is base64");
                    let batch: Vec<Value> = serde_json::from_slice(&body).expect("events");
                    seen.lock().expect("events lock").extend(batch);
                }
            })
        };
        subscribed.recv().expect("subscribed to task events");
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// How many events of `kind` were seen for task `id`.
    fn count(&self, kind: &str, id: &str) -> usize {
        self.seen
            .lock()
            .expect("events lock")
            .iter()
            .filter(|e| e["type"] == kind && e["uuid"] == id)
            .count()
    }
}

impl Drop for TaskEvents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// --- task names ---------------------------------------------------------------------------

#[test]
fn a_plugin_claiming_another_plugins_task_is_refused_whatever_its_file_name() {
    // A build answering demo.add with {"sum": .., "version": "v2"}, named to load before
    // demo.wasm: were names first come, first served, it would take demo.add at start.
    let mut s = setup_with("trust-hijack", "", &[("versioned-v2", "aaa.wasm")]);
    let beside = Beside::start(&s.redis);
    let id = s.client.send("demo.add", json!([2, 3]));
    assert_eq!(s.client.result(&id)["result"], 5, "demo serves demo.add");
    beside.all_succeed(&mut s.client, 20);
    // The operator is told why.
    s.worker
        .wait_log("plugin \"aaa\" may not serve task \"demo.add\"");
}

// --- what a plugin writes as its progress ---------------------------------------------------

#[test]
fn a_forged_success_never_reaches_a_python_get() {
    let mut s = setup("trust-forge", "");
    let feed = ResultFeed::start(&s.redis);
    let beside = Beside::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    s.python(&format!(
        r#"
r = app.send_task("hostile.forge_state", ("SUCCESS",), task_id={id:?})
value = r.get(timeout=30)
assert value != "forged by the plugin", value
assert "worker's to store" in value["refused"], value
assert r.state == "SUCCESS"
"#
    ));
    assert_eq!(
        feed.states(&id),
        ["SUCCESS"],
        "only the worker's outcome was published"
    );
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn progress_in_a_tight_loop_is_stored_at_a_bounded_rate() {
    let mut s = setup("trust-progress-flood", "");
    let feed = ResultFeed::start(&s.redis);
    let beside = Beside::start(&s.redis);
    let start = Instant::now();
    let id = s.client.send("hostile.progress_flood", json!([200_000]));
    let doc = s.client.result(&id);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(
        doc["result"], 200_000,
        "every update accepted (coalesced, not refused)"
    );
    let writes = feed.states(&id).iter().filter(|s| *s == "PROGRESS").count();
    // A burst of 10, then 10 a second, over however long the task ran.
    let bound = 10.0 + 10.0 * elapsed + 1.0;
    assert!(
        (writes as f64) <= bound,
        "{writes} progress writes in {elapsed:.1} s (bound {bound:.0})"
    );
    eprintln!("200,000 update_state calls: {writes} progress writes in {elapsed:.2} s");
    beside.all_succeed(&mut s.client, 10);
}

// --- revokes --------------------------------------------------------------------------------

#[test]
fn a_running_task_revoked_without_terminate_ends_with_its_own_result() {
    let mut s = setup("trust-revoke-running", "");
    let feed = ResultFeed::start(&s.redis);
    let events = TaskEvents::start(&s.redis);
    let beside = Beside::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    s.client.send_as(&id, "hostile.hold", json!([1500]));
    wait_for("the held task to start", || {
        (events.count("task-started", &id) == 1).then_some(())
    });
    s.python(&format!(
        r#"
app.control.revoke({id:?})
r = app.AsyncResult({id:?})
value = r.get(timeout=30)
assert r.state == "SUCCESS", r.state
assert value["end"] >= value["start"] + 1500, value
"#
    ));
    assert_eq!(feed.states(&id), ["SUCCESS"], "REVOKED was never stored");
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_revoked_stored_while_the_task_was_on_its_way_stays_revoked() {
    let mut s = setup("trust-revoked-kept", "");
    let feed = ResultFeed::start(&s.redis);
    let events = TaskEvents::start(&s.redis);
    let beside = Beside::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    s.client.send_as(&id, "hostile.hold", json!([1500]));
    wait_for("the held task to start", || {
        (events.count("task-started", &id) == 1).then_some(())
    });
    // What another worker stores on hearing a revoke for a task it finds in nobody's
    // in-flight list: this worker had taken it from the queue and started it meanwhile.
    s.python(&format!(
        r#"
app.backend.mark_as_revoked({id:?}, reason="revoked")
assert app.AsyncResult({id:?}).state == "REVOKED"
"#
    ));
    wait_for("the held task to be acknowledged", || {
        (s.client.in_flight(NODE) == 0).then_some(())
    });
    let doc = s.client.state(&id).expect("a stored state");
    assert_eq!(doc["status"], "REVOKED", "{doc}");
    assert_eq!(
        feed.states(&id),
        ["REVOKED"],
        "no SUCCESS was published after it"
    );
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_revoke_never_replaces_a_stored_result() {
    let mut s = setup("trust-revoke-after", "");
    let id = uuid::Uuid::new_v4().to_string();
    s.client.send_as(&id, "demo.fail", json!(["it failed"]));
    assert_eq!(s.client.result(&id)["status"], "FAILURE");
    s.python(&format!(
        r#"
reply = app.control.revoke({id:?}, reply=True)
assert reply, "the worker answered the revoke"
"#
    ));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE", "{doc}");
    assert_eq!(doc["result"]["exc_message"], json!(["it failed"]));
}

// --- what a plugin sends ---------------------------------------------------------------------

/// Runs `hostile.send_raw(signature)`: the id of what was sent, or why it was refused.
fn send_raw(s: &mut Setup, signature: Value) -> Result<String, String> {
    let id = s.client.send("hostile.send_raw", json!([signature]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    match (
        doc["result"]["sent"].as_str(),
        doc["result"]["refused"].as_str(),
    ) {
        (Some(sent), _) => Ok(sent.to_owned()),
        (_, Some(refused)) => Err(refused.to_owned()),
        _ => panic!("neither sent nor refused: {doc}"),
    }
}

/// `demo.add(1, 1)` with `options`.
fn add_with(options: Value) -> Value {
    json!({"task": "demo.add", "args": [1, 1], "kwargs": {}, "options": options,
           "subtask_type": null, "immutable": false})
}

/// What a key holds, to compare before and after: its type and a dump of its value.
fn key_state(conn: &mut redis::Connection, key: &str) -> (String, Option<Vec<u8>>) {
    let kind: String = redis::cmd("TYPE").arg(key).query(conn).expect("TYPE");
    let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(key).query(conn).expect("DUMP");
    (kind, dump)
}

#[test]
fn a_plugin_cannot_send_into_a_key_that_is_not_a_queue_it_was_allowed() {
    let config = "[plugins.hostile]\nallow_send = [\"demo.*\"]\n";
    let mut s = setup("trust-send-keys", config);
    let beside = Beside::start(&s.redis);
    let victim = s.client.send("demo.add", json!([2, 2]));
    assert_eq!(s.client.result(&victim)["status"], "SUCCESS");
    // Another worker's in-flight list, holding one message (nothing else touches it).
    let inflight = "taskhost:inflight:victim@test:celery".to_owned();
    redis::cmd("LPUSH")
        .arg(&inflight)
        .arg("a message the victim holds")
        .query::<()>(&mut s.redis.conn(0))
        .expect("LPUSH");
    // A key of every kind the worker or its producers keep, and a queue nobody allowed.
    let victims = [
        (0, "_kombu.binding.celery".to_owned()),
        (0, "taskhost:workers".to_owned()),
        (0, "taskhost:delayed".to_owned()),
        (0, inflight),
        (1, format!("celery-task-meta-{victim}")),
        (0, "elsewhere".to_owned()),
    ];
    let before: Vec<_> = victims
        .iter()
        .map(|(db, key)| key_state(&mut s.redis.conn(*db), key))
        .collect();
    for (_, key) in &victims {
        let named = add_with(json!({"queue": key}));
        let refused = send_raw(&mut s, named).expect_err(key);
        assert!(refused.contains("send_queues"), "{key}: {refused}");
        // As a callback of an allowed send, too: it would go out when the first task ends.
        let callback = add_with(json!({"queue": key}));
        let linked = add_with(json!({"link": [callback]}));
        let refused = send_raw(&mut s, linked).expect_err(key);
        assert!(
            refused.contains("send_queues"),
            "{key} as a callback: {refused}"
        );
    }
    let after: Vec<_> = victims
        .iter()
        .map(|(db, key)| key_state(&mut s.redis.conn(*db), key))
        .collect();
    for ((_, key), (before, after)) in victims.iter().zip(before.iter().zip(&after)) {
        // The worker's own registry and delayed set change as it works: their type stays.
        if key == "taskhost:workers" || key == "taskhost:delayed" {
            assert_eq!(before.0, after.0, "{key}'s type");
        } else {
            assert_eq!(before, after, "{key}");
        }
    }
    let elsewhere: usize = redis::cmd("LLEN")
        .arg("elsewhere")
        .query(&mut s.redis.conn(0))
        .expect("LLEN");
    assert_eq!(elsewhere, 0);
    assert_eq!(s.client.result(&victim)["result"], 4);
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_plugin_sends_to_the_queues_its_send_queues_allow() {
    let config =
        "[plugins.hostile]\nallow_send = [\"demo.*\"]\nsend_queues = [\"celery\", \"batch\"]\n";
    let mut s = setup("trust-send-queues", config);
    send_raw(&mut s, add_with(json!({"queue": "batch"}))).expect("batch is allowed");
    let refused = send_raw(&mut s, add_with(json!({"queue": "elsewhere"}))).expect_err("elsewhere");
    assert!(refused.contains("\"elsewhere\""), "{refused}");
    let batch: usize = redis::cmd("LLEN")
        .arg("batch")
        .query(&mut s.redis.conn(0))
        .expect("LLEN");
    assert_eq!(batch, 1, "the allowed send, waiting in its queue");
}

#[test]
fn a_plugin_cannot_send_with_a_chain_option_or_under_another_groups_id() {
    let config = "[plugins.hostile]\nallow_send = [\"demo.*\"]\n";
    let mut s = setup("trust-send-ids", config);
    let beside = Beside::start(&s.redis);
    let victim = s.client.send("demo.add", json!([2, 2]));
    assert_eq!(s.client.result(&victim)["status"], "SUCCESS");
    // A chain option would store a state for the victim when the sent task fails.
    let chained = add_with(json!({"chain": [add_with(json!({"task_id": victim}))]}));
    let refused = send_raw(&mut s, chained).expect_err("a chain option");
    assert!(refused.contains("chain"), "{refused}");
    // A chord whose header names the victim's id as its group id: the host gives the group an
    // id of its own, so the chord counts its parts under that, never under the victim's.
    let header = json!({"task": "celery.group", "subtask_type": "group", "immutable": false,
        "args": [], "kwargs": {"tasks": [add_with(json!({})), add_with(json!({}))]},
        "options": {"group_id": victim, "task_id": victim}});
    let body = json!({"task": "demo.tsum", "args": [], "kwargs": {}, "options": {},
        "subtask_type": null, "immutable": false});
    let chord = json!({"task": "celery.chord", "subtask_type": "chord", "immutable": false,
        "args": [], "kwargs": {"header": header, "body": body}, "options": {}});
    let sent = send_raw(&mut s, chord).expect("the chord is sent");
    assert_ne!(sent, victim, "the chord took the victim's id");
    let body = s.client.result(&sent);
    assert_eq!(body["result"], 4, "{body}");
    let doc = s.client.result(&victim);
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(doc["result"], 4, "{doc}");
    let touched: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{victim}*"))
        .query(&mut s.redis.conn(1))
        .expect("KEYS");
    assert_eq!(
        touched,
        [format!("celery-task-meta-{victim}")],
        "only its own result"
    );
    beside.all_succeed(&mut s.client, 20);
}

// --- remote control at scale -----------------------------------------------------------------

#[test]
fn a_20000_id_revoke_keeps_ping_answered_and_the_revoked_set_bounded() {
    let s = setup("trust-revoke-many", "");
    let beside = Beside::start(&s.redis);
    s.python(
        r#"
import time, uuid
ids = [str(uuid.uuid4()) for _ in range(20000)]
app.control.revoke(ids)
for attempt in range(10):
    asked = time.monotonic()
    pong = app.control.ping(timeout=1.0, limit=1)
    took = time.monotonic() - asked
    assert pong and took < 1.0, f"ping {attempt} after the revoke: {pong!r} in {took:.2f} s"
# Every id not held by a worker ends REVOKED, as for one id.
from celery.result import AsyncResult
deadline = time.monotonic() + 60
while AsyncResult(ids[-1], app=app).state != "REVOKED":
    assert time.monotonic() < deadline, "the last id was never stored as REVOKED"
    time.sleep(0.05)
# Past 50,000 ids, the oldest are forgotten, as Celery's worker does.
app.control.revoke([str(uuid.uuid4()) for _ in range(40000)])
assert app.control.ping(timeout=1.0, limit=1)
"#,
    );
    let kept: usize = wait_for("the revoked set trimmed to 50,000", || {
        let n: usize = redis::cmd("ZCARD")
            .arg("taskhost:revoked")
            .query(&mut s.redis.conn(0))
            .expect("ZCARD");
        (n == 50_000).then_some(n)
    });
    assert_eq!(kept, 50_000);
    let mut client = Client::new(&s.redis);
    beside.all_succeed(&mut client, 20);
}

// --- a producer's message ---------------------------------------------------------------------

#[test]
fn a_task_whose_result_key_has_the_wrong_type_is_dead_lettered_alone() {
    let mut s = setup("trust-wrongtype", "");
    let beside = Beside::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    redis::cmd("LPUSH")
        .arg(format!("celery-task-meta-{id}"))
        .arg("not a result")
        .query::<()>(&mut s.redis.conn(1))
        .expect("a list where the result goes");
    s.client
        .send_as(&id, "demo.fail", json!(["cannot be stored"]));
    let entry = wait_for("the task dead-lettered", || {
        s.client
            .dead_letters()
            .into_iter()
            .find(|e| e["task_id"] == id.as_str())
    });
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("WRONGTYPE"), "{entry}");
    beside.all_succeed(&mut s.client, 20);
    assert_eq!(s.client.in_flight(NODE), 0, "nothing left in flight");
}

#[test]
fn a_task_whose_result_key_has_the_wrong_type_is_dead_lettered_alone_on_one_database() {
    let dir = TestDir::new("trust-wrongtype-one-db");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let url = redis.url(0);
    let args = ["-n", NODE, "-c", "4"];
    let command = Process::worker_command_on(
        &taskhost_tests::taskhost_bin(),
        &dir,
        &[url.clone(), url],
        &plugins,
        &args,
    );
    let worker = Process::spawn(&dir, "worker.log", command);
    worker.wait_log("worker ready");
    let mut client = Client::on_one_database(&redis);
    let beside = Beside::start(&redis);
    let id = uuid::Uuid::new_v4().to_string();
    redis::cmd("LPUSH")
        .arg(format!("celery-task-meta-{id}"))
        .arg("not a result")
        .query::<()>(&mut redis.conn(0))
        .expect("a list where the result goes");
    client.send_as(&id, "demo.add", json!([1, 2]));
    let entry = wait_for("the task dead-lettered", || {
        client
            .dead_letters()
            .into_iter()
            .find(|e| e["task_id"] == id.as_str())
    });
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("WRONGTYPE"), "{entry}");
    beside.all_succeed(&mut client, 20);
    assert_eq!(client.in_flight(NODE), 0, "nothing left in flight");
}

#[test]
fn a_chain_step_whose_result_key_has_the_wrong_type_holds_no_slot() {
    let mut s = setup("trust-wrongtype-chain", "");
    let beside = Beside::start(&s.redis);
    let doomed = uuid::Uuid::new_v4().to_string();
    redis::cmd("LPUSH")
        .arg(format!("celery-task-meta-{doomed}"))
        .arg("not a result")
        .query::<()>(&mut s.redis.conn(1))
        .expect("a list where the doomed step's result goes");
    // The first step fails, so the worker stores the failure of the step after it too (as
    // Celery's _fail_chain), which Redis refuses for good: the first step still settles.
    s.python(&format!(
        r#"
from celery import chain
first = app.signature("demo.fail", args=("the first step fails",))
after = app.signature("demo.add", args=(1,)).set(task_id={doomed:?})
r = chain(first, after).apply_async()
assert r.id == {doomed:?}, r.id
try:
    r.parent.get(timeout=30)
    raise SystemExit("the first step was to fail")
except Exception as e:
    assert "the first step fails" in str(e), repr(e)
"#
    ));
    wait_for("nothing left in flight", || {
        (s.client.in_flight(NODE) == 0).then_some(())
    });
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_follow_up_whose_queue_key_is_not_a_list_is_dead_lettered_and_its_batch_mates_go_out_once() {
    let mut s = setup("trust-wrongtype-follow-up", "");
    let events = TaskEvents::start(&s.redis);
    let beside = Beside::start(&s.redis);
    redis::cmd("SET")
        .arg("not-a-queue")
        .arg("a string")
        .query::<()>(&mut s.redis.conn(0))
        .expect("a string where a callback's queue goes");
    let (first, good) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    s.python(&format!(
        r#"
add = app.signature("demo.add")
echo = app.signature("demo.echo")
r = add.clone(args=(2, 2)).set(task_id="{first}").apply_async(link=[
    add.clone(args=(10,)).set(task_id="{good}"),
    echo.clone().set(queue="not-a-queue"),
])
assert r.get(timeout=30) == 4
assert app.AsyncResult("{good}").get(timeout=30) == 14
"#
    ));
    let entry = wait_for("the bad callback dead-lettered", || {
        s.client
            .dead_letters()
            .into_iter()
            .find(|e| e["queue"] == "not-a-queue")
    });
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("WRONGTYPE"), "{entry}");
    assert_eq!(s.client.dead_letters().len(), 1, "only the bad callback");
    wait_for("nothing left in flight", || {
        (s.client.in_flight(NODE) == 0).then_some(())
    });
    beside.all_succeed(&mut s.client, 20);
    // The good callback went out once, and the first task ran once.
    let good = good.to_string();
    wait_for("the good callback's task-succeeded event", || {
        (events.count("task-succeeded", &good) >= 1).then_some(())
    });
    assert_eq!(
        events.count("task-received", &good),
        1,
        "the good callback's deliveries"
    );
    assert_eq!(events.count("task-received", &first.to_string()), 1);
    let kept: String = redis::cmd("GET")
        .arg("not-a-queue")
        .query(&mut s.redis.conn(0))
        .expect("GET the string");
    assert_eq!(kept, "a string");
}

// --- events ---------------------------------------------------------------------------------

#[test]
fn task_received_is_sent_once_per_delivery_not_per_postponement() {
    let mut s = setup(
        "trust-received-once",
        "[tasks.\"demo.echo\"]\nrate_limit = \"4/s\"\n",
    );
    let events = TaskEvents::start(&s.redis);
    // Eight at once under 4/s: most wait out the rate limit in the delayed set, some twice.
    let ids: Vec<String> = (0..8)
        .map(|i| s.client.send("demo.echo", json!([i])))
        .collect();
    for id in &ids {
        assert_eq!(s.client.result(id)["status"], "SUCCESS");
    }
    wait_for("every task's task-succeeded event", || {
        ids.iter()
            .all(|id| events.count("task-succeeded", id) == 1)
            .then_some(())
    });
    for id in &ids {
        assert_eq!(
            events.count("task-received", id),
            1,
            "task-received of {id}"
        );
    }
}

// --- clocks -----------------------------------------------------------------------------------

#[test]
fn workers_with_skewed_clocks_never_take_each_other_for_dead() {
    let dir = TestDir::new("trust-skew");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    // Two minutes apart, with a 2 s lapse: were a worker's own clock compared with the other's
    // heartbeat, each would find the other long dead and return its running tasks.
    let start = |name: &str, skew_ms: i64| {
        let node = format!("{name}@test");
        let args = ["-n", node.as_str(), "-c", "2", "--heartbeat-lapse", "2"];
        let mut command = Process::worker_command(&dir, &redis, &plugins, &args);
        command.env("TASKHOST_TEST_CLOCK_SKEW_MS", skew_ms.to_string());
        let worker = Process::spawn(&dir, &format!("{name}.log"), command);
        worker.wait_log("worker ready");
        worker
    };
    let ahead = start("ahead", 120_000);
    let behind = start("behind", -120_000);
    let feed = ResultFeed::start(&redis);
    let mut client = Client::new(&redis);
    let beside = Beside::start(&redis);
    // Each sleeps past two lapses: the reapers look while they run.
    let ids: Vec<String> = (0..4)
        .map(|_| client.send("demo.sleep", json!([5000])))
        .collect();
    for id in &ids {
        assert_eq!(client.result(id)["status"], "SUCCESS");
    }
    beside.all_succeed(&mut client, 20);
    for id in &ids {
        assert_eq!(feed.endings(id), 1, "task {id} ran once");
    }
    for node in ["ahead@test", "behind@test"] {
        assert!(
            client.registry_entry(node).is_some(),
            "{node} still registered"
        );
    }
    let logs = format!("{}\n{}", ahead.log(), behind.log());
    assert!(client.dead_letters().is_empty(), "no dead letters:\n{logs}");
}

#[test]
fn arguments_nested_300_deep_are_inspected_and_the_worker_still_answers() {
    let mut s = setup("trust-deep-args", "");
    let beside = Beside::start(&s.redis);
    s.python(&format!(
        r#"
import time
deep = []
for _ in range(300):
    deep = [deep]
r = app.send_task("demo.echo", (deep,), countdown=3600)
i = app.control.inspect(destination=[{NODE:?}], timeout=5)
deadline = time.time() + 10
while True:
    scheduled = (i.scheduled() or {{}}).get({NODE:?}) or []
    found = [e for e in scheduled if e["request"]["id"] == r.id]
    if found:
        break
    assert time.time() < deadline, scheduled
args = found[0]["request"]["args"]
assert str(args).count("[") >= 300, args
assert app.control.ping(destination=[{NODE:?}], timeout=5), "ping answered"
# With a reply: the worker answers once it has stored the REVOKED.
assert app.control.revoke(r.id, destination=[{NODE:?}], reply=True, timeout=5), "revoke answered"
assert r.state == "REVOKED", r.state
"#
    ));
    beside.all_succeed(&mut s.client, 20);
}

// --- a property test: whatever comes in ------------------------------------------------------

/// 300 random control commands (known and unknown names, arguments of every type and extreme
/// numbers) and 300 task messages with random headers (time limits, etas, expiries, retries,
/// priorities of every type and size), from a seeded Python producer: the worker still
/// answers ping, settles every message it takes, never hits a bug's panic, and the demo.add
/// stream beside all succeed.
#[test]
fn random_control_commands_and_message_headers_never_take_the_worker_down() {
    let mut s = setup("trust-fuzz", "");
    let beside = Beside::start(&s.redis);
    s.python(&format!(
        r#"
import base64, json, random, uuid
import redis
random.seed(15)
node = {NODE:?}
nasty = [0, -1, 1, 1e308, -1e308, 2**63, 2**64 + 5, -2**70, 1e-300, 0.5, "1e-300/s",
         "99999999999/s", "1/h", "abc", "", None, [], {{}}, [1, [2, [3]]], "x" * 5000, True]
times = [None, "9999-12-31T23:59:59", "0001-01-01T00:00:00", "garbage", 5,
         "2026-12-02T00:00:00+99:00", "1970-01-01T00:00:00+00:00"]
methods = ["rate_limit", "time_limit", "pool_grow", "pool_shrink", "add_consumer", "revoke",
           "enable_events", "disable_events", "ping", "stats", "active", "reserved",
           "scheduled", "revoked", "registered", "conf", "active_queues", "query_task",
           "autoscale", "heartbeat", "memdump", "no_such_command", "election", "dump_tasks"]
argnames = ["task_name", "rate_limit", "soft", "hard", "n", "queue", "task_id", "terminate",
            "signal", "max", "min", "ids", "exchange", "routing_key"]
for _ in range(300):
    arguments = {{random.choice(argnames): random.choice(nasty)
                 for _ in range(random.randint(0, 3))}}
    app.control.broadcast(random.choice(methods), arguments=arguments,
                          destination=[node], reply=False)
broker = redis.Redis.from_url(os.environ["BROKER"])
for _ in range(300):
    tid = str(uuid.uuid4())
    headers = {{"lang": "py", "task": "demo.add", "id": tid, "root_id": tid,
               "retries": random.choice(nasty),
               "timelimit": [random.choice(nasty), random.choice(nasty)],
               "eta": random.choice(times), "expires": random.choice(times),
               "group_index": random.choice(nasty), "ignore_result": random.choice(nasty),
               "argsrepr": random.choice(nasty)}}
    body = json.dumps([[1, 2], {{}}, {{"callbacks": None, "errbacks": None, "chain": None,
                                     "chord": None}}])
    message = {{"body": base64.b64encode(body.encode()).decode(),
               "content-encoding": "utf-8", "content-type": "application/json",
               "headers": headers,
               "properties": {{"correlation_id": tid, "delivery_mode": 2,
                              "delivery_info": {{"exchange": "", "routing_key": "celery"}},
                              "priority": random.choice(nasty), "body_encoding": "base64",
                              "delivery_tag": str(uuid.uuid4())}}}}
    broker.lpush("celery", json.dumps(message))
assert app.control.ping(destination=[node], timeout=10), "the worker still answers ping"
"#
    ));
    beside.all_succeed(&mut s.client, 50);
    wait_for("every message taken settled", || {
        (s.client.in_flight(NODE) == 0 && s.client.llen("celery") == 0).then_some(())
    });
    let bugs: Vec<Value> = s
        .client
        .dead_letters()
        .into_iter()
        .filter(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("a bug in taskhost"))
        })
        .collect();
    assert!(bugs.is_empty(), "handling panicked: {bugs:#?}");
}

// --- the instance pool --------------------------------------------------------------------------

/// A component of `n` instances of an empty core module: nothing a plugin serves, only a
/// claim on the instance pool.
fn component_of_core_instances(n: u32) -> Vec<u8> {
    use wasm_encoder::{Component, InstanceSection, Module, ModuleArg, ModuleSection};
    let mut component = Component::new();
    component.section(&ModuleSection(&Module::new()));
    let mut instances = InstanceSection::new();
    for _ in 0..n {
        instances.instantiate(0, Vec::<(&str, ModuleArg)>::new());
    }
    component.section(&instances);
    component.finish()
}

#[test]
fn a_component_over_its_share_of_the_instance_pool_is_refused_at_load() {
    let mut s = setup("trust-pool-share", "");
    let beside = Beside::start(&s.redis);
    // Dropped in while the worker runs: the watcher loads it, and refuses it.
    let big = s.dir.path().join("plugins").join("big.wasm");
    std::fs::write(&big, component_of_core_instances(17)).expect("write big.wasm");
    s.worker.wait_log(
        "it needs more of the instance pool than one component may take ([limits] \
         component_core_instances, component_memories, component_tables): The component \
         transitively contains 17 core module instances, which exceeds the configured maximum of 16",
    );
    beside.all_succeed(&mut s.client, 20);
}

// --- outbound HTTP after DNS ------------------------------------------------------------------

/// hostile.http_get of `http://localhost:<stub>/ok`, granted by that name, with `extra` in
/// the plugin's section; the result document, and how many requests reached the stub.
fn get_by_a_name_resolving_to_loopback(name: &str, extra: &str) -> (Value, usize) {
    let stub = HttpStub::start(|_| Reply::json(200, json!({"ok": true})));
    let origin = format!("http://localhost:{}", stub.port());
    let mut s = setup(
        name,
        &format!("[plugins.hostile]\nallow_http = [{origin:?}]\n{extra}"),
    );
    let beside = Beside::start(&s.redis);
    let id = s
        .client
        .send("hostile.http_get", json!([format!("{origin}/ok"), false]));
    let doc = s.client.result(&id);
    beside.all_succeed(&mut s.client, 20);
    (doc, stub.requests().len())
}

#[test]
fn a_granted_name_resolving_to_a_private_address_is_refused() {
    let (doc, reached) = get_by_a_name_resolving_to_loopback("trust-dns-private", "");
    assert_eq!(doc["status"], "FAILURE", "{doc}");
    assert_eq!(doc["result"]["exc_type"], "CapabilityDenied", "{doc}");
    assert_eq!(reached, 0, "nothing reached the private address");
}

#[test]
fn allow_private_network_lets_a_granted_name_reach_a_private_address() {
    let (doc, reached) = get_by_a_name_resolving_to_loopback(
        "trust-dns-private-allowed",
        "allow_private_network = true\n",
    );
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(reached, 1);
}

// --- the metrics endpoint ---------------------------------------------------------------------

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[test]
fn idle_metrics_connections_cannot_run_the_worker_out_of_descriptors() {
    let dir = TestDir::new("trust-metrics-cap");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let args = ["-n", NODE, "--metrics-addr", "127.0.0.1:0"];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    let addr = worker.metrics_addr();
    let mut client = Client::new(&redis);
    let beside = Beside::start(&redis);
    let before = open_fds(worker.pid());
    // 200 clients that connect and never send a request head.
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // The worker takes up to its cap of them, and no more, however long they stay.
    let pid = worker.pid();
    wait_for("the worker to take its 32 connections", || {
        (open_fds(pid) >= before + 32).then_some(())
    });
    for _ in 0..20 {
        let held = open_fds(pid);
        assert!(
            held <= before + 32 + 4,
            "the worker holds {held} descriptors with 200 idle clients (before: {before})"
        );
        taskhost_tests::pace(std::time::Duration::from_millis(20));
    }
    drop(idle);
    beside.all_succeed(&mut client, 20);
}

#[test]
fn healthz_answers_within_a_second_behind_128_idle_connections() {
    let dir = TestDir::new("trust-metrics-idle-healthz");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let args = ["-n", NODE, "--metrics-addr", "127.0.0.1:0"];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    let addr = worker.metrics_addr();
    let before = open_fds(worker.pid());
    let idle: Vec<std::net::TcpStream> = (0..128)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    let pid = worker.pid();
    wait_for("the worker to hold a full set of idle connections", || {
        (open_fds(pid) >= before + 32).then_some(())
    });
    // A probe behind them, five times over, while every idle client stays connected.
    for probe in 0..5 {
        let asked = std::time::Instant::now();
        let answer = taskhost_tests::http_get(&addr, "/healthz", None);
        let took = asked.elapsed();
        assert_eq!(answer.map(|(code, _)| code), Some(200), "probe {probe}");
        assert!(
            took < std::time::Duration::from_secs(1),
            "probe {probe} behind 128 idle connections took {took:?}"
        );
    }
    drop(idle);
}

// --- dead letters -----------------------------------------------------------------------------

#[test]
fn dead_letters_past_dead_letter_max_drop_the_oldest_and_count_them() {
    let mut s = setup("trust-dead-max", "[worker]\ndead_letter_max = 3\n");
    let beside = Beside::start(&s.redis);
    for n in 0..5 {
        s.client
            .push_raw("celery", format!("garbage {n}").as_bytes());
    }
    wait_for("two entries dropped over the cap", || {
        let dropped: Option<u64> = redis::cmd("GET")
            .arg("taskhost:dead-dropped")
            .query(s.client.broker())
            .expect("GET the dropped count");
        (dropped == Some(2)).then_some(())
    });
    // Dead-lettered by four slots at once, so in no set order: three of the five are kept.
    let mut kept: Vec<String> = s
        .client
        .dead_letters()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect();
    kept.sort();
    kept.dedup();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(kept.iter().all(|m| m.starts_with("garbage ")), "{kept:?}");
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_plugin_without_an_http_grant_cannot_send_a_request() {
    let stub = HttpStub::start(|_| Reply::json(200, json!({"ok": true})));
    // hostile has no section here, so no HTTP grant: its outgoing handler traps.
    let mut s = setup("trust-no-http", "");
    let beside = Beside::start(&s.redis);
    let id = s.client.send(
        "hostile.http_get",
        json!([format!("{}/ok", stub.url()), false]),
    );
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE", "{doc}");
    assert_eq!(doc["result"]["exc_type"], "PluginTrap", "{doc}");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert!(message.contains("no HTTP grant"), "{message}");
    assert!(stub.requests().is_empty(), "nothing left the host");
    beside.all_succeed(&mut s.client, 20);
}

#[test]
fn a_plugin_without_an_http_grant_cannot_make_http_resources() {
    // hostile has no HTTP grant here: every wasi:http function it imports traps, header
    // fields' constructor among them, so it holds nothing of the host's HTTP machinery.
    let mut s = setup("trust-no-http-types", "");
    let beside = Beside::start(&s.redis);
    let id = s.client.send("hostile.resource_flood", json!([10]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE", "{doc}");
    assert_eq!(doc["result"]["exc_type"], "PluginTrap", "{doc}");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert!(message.contains("no HTTP grant"), "{message}");
    beside.all_succeed(&mut s.client, 20);
}

// --- the instance pool ---------------------------------------------------------------------------

#[test]
fn a_task_that_finds_the_instance_pool_full_waits_instead_of_failing() {
    let dir = TestDir::new("trust-pool-full");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    std::fs::copy(test_plugin_wasm("hostile"), plugins.join("hostile.wasm")).expect("hostile");
    // Two slots over a pool of one instance. The worker sizes its pool at -c + 2, which it
    // never fills; the test hook shrinks it so that a task finds it full.
    let args = ["-n", NODE, "-c", "2", "--metrics-addr", "127.0.0.1:0"];
    let mut command = Process::worker_command(&dir, &redis, &plugins, &args);
    command.env("TASKHOST_TEST_POOL_INSTANCES", "1");
    let worker = Process::spawn(&dir, "worker.log", command);
    worker.wait_log("worker ready");
    let addr = worker.metrics_addr();
    let mut client = Client::new(&redis);
    let beside = Beside::start(&redis);
    let holds: Vec<String> = (0..2)
        .map(|_| client.send("hostile.hold", json!([1000])))
        .collect();
    let spans: Vec<(i64, i64)> = holds
        .iter()
        .map(|id| {
            let doc = client.result(id);
            assert_eq!(doc["status"], "SUCCESS", "{doc}");
            let at = |key: &str| doc["result"][key].as_i64().unwrap_or_default();
            (at("start"), at("end"))
        })
        .collect();
    // Both ran, one after the other in the one instance: the second waited, it did not fail.
    let (first, second) = (spans[0].min(spans[1]), spans[0].max(spans[1]));
    assert!(first.1 <= second.0, "one instance at a time: {spans:?}");
    let (_, metrics) = taskhost_tests::http_get(&addr, "/metrics", None).expect("/metrics");
    let postponed: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("taskhost_sandbox_limit_hits_total{")
                && l.contains("plugin=\"hostile\"")
                && l.contains("limit=\"pool\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(postponed >= 1.0, "a hold found the pool full:\n{metrics}");
    beside.all_succeed(&mut client, 20);
}

/// A worker over a pool of one instance (the test hook) whose one slot hostile's kept instance
/// holds (`reuse_instances`), and a client; dropped in field order.
struct KeptSlot {
    _worker: Process,
    client: Client,
    plugins: std::path::PathBuf,
    _redis: RedisServer,
    _dir: TestDir,
}

impl KeptSlot {
    fn start(name: &str) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let plugins = dir.plugins(&["demo"]);
        std::fs::copy(test_plugin_wasm("hostile"), plugins.join("hostile.wasm")).expect("hostile");
        let config = dir.write(
            "taskhost.toml",
            "[plugins.hostile]\nreuse_instances = 100\n",
        );
        let config = config.to_string_lossy().into_owned();
        let args = ["-n", NODE, "-c", "1", "--config", config.as_str()];
        let mut command = Process::worker_command(&dir, &redis, &plugins, &args);
        command.env("TASKHOST_TEST_POOL_INSTANCES", "1");
        let worker = Process::spawn(&dir, "worker.log", command);
        worker.wait_log("worker ready");
        let mut kept = Self {
            client: Client::new(&redis),
            _worker: worker,
            plugins,
            _redis: redis,
            _dir: dir,
        };
        assert_eq!(kept.remember(1), Value::Null);
        assert_eq!(kept.remember(2), json!(1), "hostile's instance is kept");
        kept
    }

    /// `hostile.remember(value)`: what the instance it ran in kept before.
    fn remember(&mut self, value: i64) -> Value {
        self.client.success("hostile.remember", json!([value]))
    }
}

#[test]
fn kept_instances_give_their_pool_slots_to_another_plugins_task() {
    let mut s = KeptSlot::start("trust-pool-reuse");
    let add = s.client.send("demo.add", json!([2, 3]));
    assert_eq!(s.client.result(&add)["result"], 5, "demo.add found room");
    assert_eq!(
        s.remember(3),
        Value::Null,
        "the kept instance gave its slot to demo.add"
    );
}

#[test]
fn kept_instances_give_their_pool_slots_to_a_plugin_load() {
    let mut s = KeptSlot::start("trust-pool-reuse-load");
    // Loading a plugin instantiates it once (its version and tasks): in the slot the kept
    // instance holds.
    let staged = s.plugins.join("legacy.part");
    std::fs::copy(test_plugin_wasm("legacy"), &staged).expect("stage legacy");
    std::fs::rename(&staged, s.plugins.join("legacy.wasm")).expect("drop legacy in");
    let doc = wait_for("legacy.add to be served", || {
        let id = s.client.send("legacy.add", json!([2, 3]));
        let doc = s.client.result(&id);
        (doc["status"] == "SUCCESS").then_some(doc)
    });
    assert_eq!(doc["result"], 5, "{doc}");
}
