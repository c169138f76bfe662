//! Round trips through a real Redis and a real `taskhost worker` running the demo plugin.
//! Every outcome is read from Redis: the stored result, the published states, the lists.

use serde_json::{Value, json};
use taskhost_tests::{
    Client, Process, READY_STATES, RedisServer, ResultFeed, TestDir, celery_message, wait_for,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

struct Setup {
    _dir: TestDir,
    redis: RedisServer,
    worker: Process,
    client: Client,
}

/// A private Redis and a worker serving the demo plugin, started with `extra` flags.
fn setup(name: &str, extra: &[&str]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    start(dir, redis, extra)
}

/// A worker serving the demo plugin on `redis`, started with `extra` flags.
fn start(dir: TestDir, redis: RedisServer, extra: &[&str]) -> Setup {
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, extra);
    let client = Client::new(&redis);
    Setup {
        _dir: dir,
        redis,
        worker,
        client,
    }
}

/// The worker's node name: Celery's default, `celery@<hostname>`.
fn node() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("celery@{hostname}")
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

fn date_done(doc: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(doc["date_done"].as_str().expect("date_done"), &Rfc3339)
        .expect("date_done parses")
}

// --- results --------------------------------------------------------------------------------

#[test]
fn add_returns_the_sum_in_celerys_result_format() {
    let mut s = setup("add", &[]);
    let id = s.client.send("demo.add", json!([2, 3]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "SUCCESS");
    assert_eq!(doc["result"], 5);
    assert_eq!(doc["task_id"], id.as_str());
    assert_eq!(doc["traceback"], Value::Null);
    assert_eq!(doc["children"], json!([]));
    let done = doc["date_done"].as_str().expect("date_done");
    assert!(
        done.ends_with("+00:00") && OffsetDateTime::parse(done, &Rfc3339).is_ok(),
        "{done}"
    );
}

#[test]
fn a_result_is_kept_for_one_day() {
    let mut s = setup("result-ttl", &[]);
    let id = s.client.send("demo.add", json!([2, 3]));
    s.client.result(&id);
    // As long as Celery keeps results (result_expires: one day).
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut s.redis.conn(1))
        .expect("TTL");
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
}

#[test]
fn a_settled_task_leaves_nothing_in_flight() {
    let mut s = setup("settled", &[]);
    let id = s.client.send("demo.add", json!([2, 3]));
    s.client.result(&id);
    wait_for("the in-flight list to empty", || {
        (s.client.in_flight(&node()) == 0).then_some(())
    });
}

#[test]
fn echo_returns_any_json_unchanged() {
    let mut s = setup("echo", &[]);
    let values = [
        json!({"nested": {"list": [1, [2, [3, {"deep": null}]]], "empty": {}, "no": []}}),
        json!("unicode: ü ñ 漢字 🦀 \u{0} \"quoted\" \\ \n"),
        json!([i64::MIN, i64::MAX, u64::MAX, 0, -1]),
        json!([1.5, -0.25, 1e300, 2.2250738585072014e-308, 0.1]),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
    ];
    let ids: Vec<String> = values
        .iter()
        .map(|v| s.client.send("demo.echo", json!([v])))
        .collect();
    for (id, value) in ids.iter().zip(&values) {
        let doc = s.client.result(id);
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        assert_eq!(&doc["result"], value);
    }
}

#[test]
fn keyword_arguments_bind_by_name() {
    let mut s = setup("kwargs", &[]);
    // As in Python: `add(1, y=41)`.
    let id = s
        .client
        .send_to("celery", "demo.add", json!([1]), json!({"y": 41}));
    assert_eq!(s.client.result(&id)["result"], 42);
}

// --- failures -------------------------------------------------------------------------------

#[test]
fn a_failing_task_stores_its_error_text() {
    let mut s = setup("fail", &[]);
    let id = s
        .client
        .send("demo.fail", json!(["boom: the executor is on fire"]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(
        doc["result"],
        json!({"exc_type": "RuntimeError", "exc_message": ["boom: the executor is on fire"], "exc_module": "builtins"})
    );
}

#[test]
fn a_bad_argument_fails_with_a_type_error_naming_the_parameter() {
    let mut s = setup("bad-argument", &[]);
    // A TypeError, as in Python, not a trap.
    let id = s.client.send("demo.add", json!(["two", 3]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "TypeError");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert!(message.contains("argument 'x'"), "{message}");
}

#[test]
fn the_worker_keeps_serving_after_failed_tasks() {
    let mut s = setup("after-failures", &[]);
    let failed = [
        s.client.send("demo.fail", json!(["boom"])),
        s.client.send("demo.add", json!(["two", 3])),
    ];
    let id = s.client.send("demo.add", json!([1, 2]));
    for failed in &failed {
        assert_eq!(s.client.result(failed)["status"], "FAILURE");
    }
    assert_eq!(s.client.result(&id)["result"], 3);
}

// --- retries --------------------------------------------------------------------------------

#[test]
fn retry_runs_again_until_the_count_is_reached() {
    let mut s = setup("retry", &[]);
    let feed = ResultFeed::start(&s.redis);
    let id = s.client.send("demo.retry", json!([2]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(doc["result"], 2);
    // Each try that asked for a retry published RETRY; the third try succeeded.
    assert_eq!(published_states(&feed, &id), ["RETRY", "RETRY", "SUCCESS"]);
}

#[test]
fn autoretry_for_retries_a_failing_task_then_fails_it() {
    let dir = TestDir::new("autoretry");
    let config = dir.write(
        "taskhost.toml",
        "[tasks.\"demo.fail\"]\nautoretry_for = [\"RuntimeError\"]\nmax_retries = 2\nretry_backoff = 0.05\nretry_jitter = false\n",
    );
    let config = config.to_string_lossy().into_owned();
    let redis = RedisServer::start(&dir);
    let mut s = start(dir, redis, &["--config", &config]);
    let feed = ResultFeed::start(&s.redis);
    let id = s.client.send("demo.fail", json!(["flaky"]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "RuntimeError");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert_eq!(message, "flaky (gave up after 2 retries)");
    assert_eq!(published_states(&feed, &id), ["RETRY", "RETRY", "FAILURE"]);
}

// --- what cannot run ------------------------------------------------------------------------

#[test]
fn an_unknown_task_fails_not_registered() {
    let mut s = setup("unknown", &[]);
    let id = s.client.send("tasks.nobody_serves_this", json!([1]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "NotRegistered");
    assert_eq!(doc["result"]["exc_module"], "celery.exceptions");
    assert_eq!(
        doc["result"]["exc_message"],
        json!(["tasks.nobody_serves_this"])
    );
}

#[test]
fn an_unknown_task_is_dead_lettered_with_its_raw_message() {
    let mut s = setup("unknown-dead", &[]);
    let id = s.client.send("tasks.nobody_serves_this", json!([1]));
    let dead = wait_for("a dead-letter entry", || {
        s.client
            .dead_letters()
            .into_iter()
            .find(|d| d["task_id"] == id.as_str())
    });
    assert!(
        dead["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not served"),
        "{dead}"
    );
    assert_eq!(dead["task"], "tasks.nobody_serves_this");
    assert_eq!(dead["queue"], "celery");
    let raw: Value = serde_json::from_str(dead["message"].as_str().expect("raw message kept"))
        .expect("the raw message is kept as sent");
    assert_eq!(raw["headers"]["id"], id.as_str());
}

/// Pushes six undecodable messages onto `celery`; returns how many.
fn push_garbage(client: &mut Client) -> usize {
    // A real message cut in half, as a producer dying mid-write could leave it.
    let whole = celery_message("cut-1", "demo.add", json!([1, 2]), json!({}), "celery");
    let truncated = &whole.as_bytes()[..whole.len() / 2];
    let garbage: [&[u8]; 6] = [
        b"not json at all",
        b"\xff\xfe\x00binary",
        b"{\"headers\": {}}",
        b"{\"headers\": {\"task\": \"demo.add\", \"id\": \"bad-body-1\"}, \"body\": \"%%%\", \"properties\": {\"body_encoding\": \"base64\"}}",
        b"[]",
        truncated,
    ];
    for g in garbage {
        client.push_raw("celery", g);
    }
    garbage.len()
}

/// Waits until `count` dead-letter entries are in Redis and returns them.
fn dead_letters(client: &mut Client, count: usize) -> Vec<Value> {
    wait_for(&format!("{count} dead-letter entries"), || {
        let d = client.dead_letters();
        (d.len() == count).then_some(d)
    })
}

#[test]
fn undecodable_messages_are_dead_lettered_with_the_reason() {
    let mut s = setup("garbage", &[]);
    let count = push_garbage(&mut s.client);
    for entry in dead_letters(&mut s.client, count) {
        assert!(
            entry["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("undecodable message"),
            "{entry}"
        );
    }
}

#[test]
fn an_undecodable_binary_message_is_kept_as_base64() {
    let mut s = setup("garbage-binary", &[]);
    let count = push_garbage(&mut s.client);
    let dead = dead_letters(&mut s.client, count);
    assert!(
        dead.iter().any(|d| d.get("message_base64").is_some()),
        "binary kept as base64: {dead:?}"
    );
}

#[test]
fn an_undecodable_message_with_a_task_id_fails_with_decode_error() {
    let mut s = setup("garbage-id", &[]);
    push_garbage(&mut s.client);
    // Its waiter gets a failure rather than hanging.
    let doc = s.client.result("bad-body-1");
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "DecodeError");
}

#[test]
fn the_worker_keeps_serving_after_undecodable_messages() {
    let mut s = setup("garbage-serving", &[]);
    push_garbage(&mut s.client);
    let id = s.client.send("demo.add", json!([20, 22]));
    assert_eq!(s.client.result(&id)["result"], 42);
}

// --- throughput and concurrency -------------------------------------------------------------

#[test]
fn a_burst_of_1000_tasks_all_complete_correctly() {
    let mut s = setup("burst", &["-c", "4"]);
    let ids: Vec<(String, i64)> = (0..1000i64)
        .map(|i| (s.client.send("demo.add", json!([i, i * 1000])), i * 1001))
        .collect();
    for (id, expected) in &ids {
        let doc = s.client.result(id);
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        assert_eq!(doc["result"], *expected);
    }
    assert_eq!(s.client.llen("celery"), 0);
    assert!(s.client.dead_letters().is_empty());
}

#[test]
fn concurrency_4_runs_four_sleeps_at_once() {
    let mut s = setup("overlap", &["-c", "4"]);
    let ids: Vec<String> = (0..4)
        .map(|_| s.client.send("demo.sleep", json!([500])))
        .collect();
    let ends: Vec<f64> = ids
        .iter()
        .map(|id| {
            let doc = s.client.result(id);
            assert_eq!(doc["status"], "SUCCESS", "{doc}");
            (date_done(&doc).unix_timestamp_nanos() as f64) / 1e9
        })
        .collect();
    // Each run lasts at least 0.5 s, so it started no later than its end minus 0.5 s. If the
    // ends are less than 0.5 s apart, every run started before the first one ended: all four
    // were running at that instant. (Run one after another, the ends would be 0.5 s apart.)
    let first_end = ends.iter().copied().fold(f64::INFINITY, f64::min);
    let last_end = ends.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let latest_start = last_end - 0.5;
    assert!(
        latest_start < first_end,
        "the four sleeps did not overlap: ends {ends:?}"
    );
}

#[test]
fn a_worker_holds_no_more_unstarted_messages_than_its_prefetch_allows() {
    // -c 1 with a prefetch multiplier of 2: a batch of two is fetched when a slot is free, one
    // starts and one waits, so the worker never holds more than two of the six. Redis tells
    // the test of every write to the in-flight lists (keyspace notifications), and the count
    // is read after each one: a third message taken, even briefly, is seen.
    let mut s = setup("prefetch", &["-c", "1", "--prefetch-multiplier", "2"]);
    let mut config = s.redis.conn(0);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kl")
        .query(&mut config)
        .expect("keyspace notifications on");
    let mut listener = s.redis.conn(0);
    let mut pubsub = listener.as_pubsub();
    pubsub
        .psubscribe("__keyspace@*__:taskhost:inflight:*")
        .expect("psubscribe");
    pubsub
        .set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .expect("read timeout");
    let ids: Vec<String> = (0..6)
        .map(|_| s.client.send("demo.sleep", json!([100])))
        .collect();
    let (mut most_held, mut writes) = (0, 0);
    wait_for("all six results", || {
        // Every write since the last look, each followed by a count.
        while let Ok(message) = pubsub.get_message() {
            let event: String = message.get_payload().expect("event name");
            if event.ends_with("push") {
                writes += 1;
                most_held = most_held.max(s.client.in_flight(&node()));
            }
        }
        ids.iter()
            .all(|id| s.client.state(id).is_some_and(|d| d["status"] == "SUCCESS"))
            .then_some(())
    });
    assert!(
        writes >= 3,
        "only {writes} writes to the in-flight lists seen"
    );
    assert!(
        (1..=2).contains(&most_held),
        "{most_held} messages held at once"
    );
}

#[test]
fn progress_through_the_host_interface_is_published_before_the_result() {
    let mut s = setup("progress", &[]);
    let mut listener = s.redis.conn(1);
    let mut pubsub = listener.as_pubsub();
    let id = uuid::Uuid::new_v4().to_string();
    pubsub
        .subscribe(format!("celery-task-meta-{id}"))
        .expect("subscribe");
    pubsub
        .set_read_timeout(Some(taskhost_tests::WAIT))
        .expect("read timeout");
    s.client.send_as(&id, "demo.progress", json!([3]));
    // Every document published for the task, up to its SUCCESS.
    let mut published: Vec<Value> = Vec::new();
    while published.last().is_none_or(|d| d["status"] != "SUCCESS") {
        let message = pubsub
            .get_message()
            .expect("a published state within the wait");
        let payload: String = message.get_payload().expect("payload");
        published.push(serde_json::from_str(&payload).expect("state is JSON"));
    }
    let progress: Vec<&Value> = published
        .iter()
        .filter(|d| d["status"] == "PROGRESS")
        .collect();
    assert_eq!(progress.len(), 3, "{published:?}");
    for (n, doc) in progress.iter().enumerate() {
        assert_eq!(doc["result"], json!({"current": n + 1, "total": 3}));
        assert_eq!(doc["date_done"], Value::Null, "progress is not final");
    }
    assert_eq!(s.client.result(&id)["result"], 3);
}

// --- queues ---------------------------------------------------------------------------------

#[test]
fn every_queue_named_with_dash_q_is_consumed() {
    let mut s = setup("queues", &["-Q", "high_priority,celery"]);
    let a = s
        .client
        .send_to("high_priority", "demo.add", json!([1, 1]), json!({}));
    let b = s.client.send("demo.add", json!([4, 4]));
    assert_eq!(s.client.result(&a)["result"], 2);
    assert_eq!(s.client.result(&b)["result"], 8);
}

#[test]
fn a_queues_priority_buckets_are_consumed() {
    let mut s = setup("buckets", &["-Q", "high_priority,celery"]);
    let id = s
        .client
        .send_to("celery\x06\x169", "demo.add", json!([2, 2]), json!({}));
    assert_eq!(s.client.result(&id)["result"], 4);
}

#[test]
fn a_queue_not_consumed_is_left_alone() {
    let mut s = setup("other-queue", &["-Q", "high_priority,celery"]);
    s.client
        .send_to("batch", "demo.add", json!([3, 3]), json!({}));
    // Sent after it and run: the worker has fetched past the moment `batch` was filled.
    let id = s.client.send("demo.add", json!([4, 4]));
    assert_eq!(s.client.result(&id)["result"], 8);
    assert_eq!(s.client.llen("batch"), 1);
}

// --- eta and expires ------------------------------------------------------------------------

/// A Celery message for `demo.add(1, 2)` with one header set.
fn add_with_header(id: &str, header: &str, value: Value) -> String {
    let message = celery_message(id, "demo.add", json!([1, 2]), json!({}), "celery");
    let mut message: Value = serde_json::from_str(&message).expect("json");
    message["headers"][header] = value;
    message.to_string()
}

fn rfc3339(t: OffsetDateTime) -> Value {
    json!(t.format(&Rfc3339).expect("format"))
}

#[test]
fn a_task_with_a_far_eta_waits_in_the_delayed_set() {
    let mut s = setup("eta-far", &[]);
    let id = uuid::Uuid::new_v4().to_string();
    let eta = OffsetDateTime::now_utc() + time::Duration::hours(1);
    s.client.push_raw(
        "celery",
        add_with_header(&id, "eta", rfc3339(eta)).as_bytes(),
    );
    wait_for("the task to wait in the delayed set", || {
        (s.client.zcard("taskhost:delayed") == 1).then_some(())
    });
    // In Redis's delayed set only: not in the queue, not held by the worker, not run.
    assert_eq!(s.client.llen("celery"), 0);
    assert_eq!(s.client.in_flight(&node()), 0);
    assert_eq!(s.client.state(&id), None);
}

#[test]
fn a_task_with_a_near_eta_runs_no_earlier_than_its_eta() {
    let mut s = setup("eta-near", &[]);
    let id = uuid::Uuid::new_v4().to_string();
    let eta = OffsetDateTime::now_utc() + time::Duration::seconds(1);
    s.client.push_raw(
        "celery",
        add_with_header(&id, "eta", rfc3339(eta)).as_bytes(),
    );
    let doc = s.client.result(&id);
    assert_eq!(doc["result"], 3);
    let done = date_done(&doc);
    assert!(done >= eta, "ran at {done}, before its eta {eta}");
    assert_eq!(s.client.zcard("taskhost:delayed"), 0);
}

#[test]
fn an_expired_task_is_revoked_as_expired() {
    let mut s = setup("expired", &[]);
    let id = uuid::Uuid::new_v4().to_string();
    let message = add_with_header(&id, "expires", json!("2001-01-01T00:00:00+00:00"));
    s.client.push_raw("celery", message.as_bytes());
    // REVOKED, as Celery marks a task that expired before it could run.
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "REVOKED");
    assert_eq!(doc["result"]["exc_type"], "TaskRevokedError");
    assert_eq!(doc["result"]["exc_message"], json!(["expired"]));
}

// --- stopping -------------------------------------------------------------------------------

#[test]
fn a_stopped_worker_exits_cleanly_and_leaves_nothing_in_flight() {
    let mut s = setup("stop", &[]);
    let id = s.client.send("demo.add", json!([1, 1]));
    assert_eq!(s.client.result(&id)["result"], 2);
    assert!(
        s.client.registry_entry(&node()).is_some(),
        "a running worker is in the registry"
    );
    let status = s.worker.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    assert_eq!(s.client.in_flight(&node()), 0);
    assert!(
        s.client.registry_entry(&node()).is_none(),
        "a cleanly stopped worker leaves the registry"
    );
}

#[test]
fn a_task_sent_after_the_worker_stopped_waits_in_the_queue() {
    let mut s = setup("stop-queue", &[]);
    assert!(s.worker.stop_with(libc::SIGTERM).success());
    let id = s.client.send("demo.add", json!([1, 1]));
    // Left for the next worker.
    assert_eq!(s.client.llen("celery"), 1);
    assert_eq!(s.client.state(&id), None);
}

#[test]
fn as_pid_1_the_worker_reaps_the_orphans_handed_to_it() {
    // A PID namespace of its own makes the worker its PID 1, as in a container; a process
    // entered into that namespace leaves an orphan that exits: the worker must collect it.
    let dir = TestDir::new("pid1");
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let plugins = plugins.to_string_lossy().into_owned();
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--pid", "--fork", "--kill-child"])
        .arg(taskhost_tests::taskhost_bin())
        .args(["worker", "--plugins", &plugins, "-n", "pid1@test"])
        .env("CELERY_BROKER_URL", redis.url(0))
        .env("CELERY_RESULT_BACKEND", redis.url(1))
        .current_dir(dir.path());
    let unshare = Process::spawn(&dir, "worker.log", command);
    unshare.wait_log("worker ready");
    let worker = children_of(unshare.pid())
        .into_iter()
        .next()
        .expect("the worker, unshare's child");
    let out = std::process::Command::new("nsenter")
        .args(["--target", &worker.to_string(), "--pid", "--"])
        .args(["sh", "-c", "sleep 1 &"])
        .output()
        .expect("run nsenter");
    assert!(out.status.success(), "{out:?}");
    // sh exited at once: its `sleep` is the worker's child now, for the second it lives.
    let orphan = wait_for("the orphan to be handed to the worker", || {
        children_of(worker).into_iter().next()
    });
    wait_for("the orphan to be reaped, not left a zombie", || {
        (!std::path::Path::new(&format!("/proc/{orphan}")).exists()).then_some(())
    });
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`: the fields after the last `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            children.push(child);
        }
    }
    children
}
