//! Round trips through a real Redis and a real `taskhost worker` running the demo plugin.

use serde_json::{Value, json};
use taskhost_tests::{Client, Process, RedisServer, TestDir, celery_message, wait_for};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

struct Setup {
    _dir: TestDir,
    _redis: RedisServer,
    worker: Process,
    client: Client,
}

fn setup(name: &str, extra: &[&str]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, extra);
    let client = Client::new(&redis);
    Setup {
        _dir: dir,
        _redis: redis,
        worker,
        client,
    }
}

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
    // Kept as long as Celery keeps results (result_expires: one day).
    let mut backend = s._redis.conn(1);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("celery-task-meta-{id}"))
        .query(&mut backend)
        .expect("TTL");
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
    // Settled: nothing left in flight.
    wait_for("the in-flight list to empty", || {
        (s.client
            .llen(&format!("taskhost:inflight:celery@{}:celery", hostname()))
            == 0)
            .then_some(())
    });
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
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
    // Keyword arguments bind by name, as in Python.
    let id = s
        .client
        .send_to("celery", "demo.add", json!([1]), json!({"y": 41}));
    assert_eq!(s.client.result(&id)["result"], 42);
}

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
    // A bad argument is a TypeError naming the parameter, not a trap.
    let id = s.client.send("demo.add", json!(["two", 3]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "TypeError");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert!(message.contains("argument 'x'"), "{message}");
    // The worker keeps serving.
    let id = s.client.send("demo.add", json!([1, 2]));
    assert_eq!(s.client.result(&id)["result"], 3);
}

#[test]
fn retry_runs_again_until_the_count_is_reached() {
    let mut s = setup("retry", &[]);
    let id = s.client.send("demo.retry", json!([2]));
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(doc["result"], 2);
    let log = s.worker.log();
    assert_eq!(log.matches("task retrying").count(), 2, "{log}");
}

#[test]
fn an_unknown_task_fails_not_registered_and_is_dead_lettered() {
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
    let log = s.worker.log();
    assert!(
        log.contains("dead-lettered") && log.contains("tasks.nobody_serves_this"),
        "{log}"
    );
}

#[test]
fn garbage_on_the_queue_is_dead_lettered_and_the_worker_keeps_serving() {
    let mut s = setup("garbage", &[]);
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
        s.client.push_raw("celery", g);
    }
    let id = s.client.send("demo.add", json!([20, 22]));
    assert_eq!(s.client.result(&id)["result"], 42);
    let dead = wait_for("six dead-letter entries", || {
        let d = s.client.dead_letters();
        (d.len() == garbage.len()).then_some(d)
    });
    for entry in &dead {
        assert!(
            entry["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("undecodable message")
        );
    }
    assert!(
        dead.iter().any(|d| d.get("message_base64").is_some()),
        "binary kept as base64"
    );
    // Where the message had a task id, that task fails rather than hanging its waiter.
    let doc = s.client.result("bad-body-1");
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "DecodeError");
}

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
            let done =
                OffsetDateTime::parse(doc["date_done"].as_str().expect("date_done"), &Rfc3339)
                    .expect("date_done parses");
            (done.unix_timestamp_nanos() as f64) / 1e9
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

/// A Celery message for `demo.add(1, 2)` with one header set.
fn add_with_header(id: &str, header: &str, value: Value) -> String {
    let message = celery_message(id, "demo.add", json!([1, 2]), json!({}), "celery");
    let mut message: Value = serde_json::from_str(&message).expect("json");
    message["headers"][header] = value;
    message.to_string()
}

#[test]
fn eta_and_expires_are_honoured() {
    let mut s = setup("eta", &[]);
    let id = uuid::Uuid::new_v4().to_string();
    let eta = OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let message = add_with_header(&id, "eta", json!(eta.format(&Rfc3339).expect("format")));
    s.client.push_raw("celery", message.as_bytes());
    // Not yet due: it waits in Redis's delayed set, not in a queue or in the worker.
    wait_for("the task to wait in the delayed set", || {
        (s.client.zcard("taskhost:delayed") == 1).then_some(())
    });
    let doc = s.client.result(&id);
    assert_eq!(doc["result"], 3);
    let done = OffsetDateTime::parse(doc["date_done"].as_str().expect("date_done"), &Rfc3339)
        .expect("parses");
    assert!(done >= eta, "ran at {done}, before its eta {eta}");
    assert_eq!(s.client.zcard("taskhost:delayed"), 0);
    // Expired before it could run: REVOKED, as Celery marks it.
    let id = uuid::Uuid::new_v4().to_string();
    let message = add_with_header(&id, "expires", json!("2001-01-01T00:00:00+00:00"));
    s.client.push_raw("celery", message.as_bytes());
    let doc = s.client.result(&id);
    assert_eq!(doc["status"], "REVOKED");
    assert_eq!(doc["result"]["exc_type"], "TaskRevokedError");
    assert_eq!(doc["result"]["exc_message"], json!(["expired"]));
}

#[test]
fn priority_buckets_and_several_queues_are_consumed() {
    let mut s = setup("queues", &["-Q", "high_priority,celery"]);
    let a = s
        .client
        .send_to("high_priority", "demo.add", json!([1, 1]), json!({}));
    let b = s
        .client
        .send_to("celery\x06\x169", "demo.add", json!([2, 2]), json!({}));
    assert_eq!(s.client.result(&a)["result"], 2);
    assert_eq!(s.client.result(&b)["result"], 4);
    // A queue it does not consume is left alone.
    s.client
        .send_to("batch", "demo.add", json!([3, 3]), json!({}));
    let c = s.client.send("demo.add", json!([4, 4]));
    assert_eq!(s.client.result(&c)["result"], 8);
    assert_eq!(s.client.llen("batch"), 1);
}

#[test]
fn a_stopped_worker_exits_cleanly_and_leaves_nothing_in_flight() {
    let mut s = setup("stop", &[]);
    let id = s.client.send("demo.add", json!([1, 1]));
    assert_eq!(s.client.result(&id)["result"], 2);
    let status = s.worker.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    assert!(s.worker.log().contains("worker stopped"));
    // Sent after the stop: it waits in the queue for the next worker.
    s.client.send("demo.add", json!([1, 1]));
    assert_eq!(s.client.llen("celery"), 1);
}

#[test]
fn autoretry_for_retries_a_failing_task_then_fails_it() {
    let dir = TestDir::new("autoretry");
    let redis = RedisServer::start_with(&dir, &["--maxmemory-policy", "allkeys-lru"]);
    let plugins = dir.plugins(&["demo"]);
    let config = dir.write(
        "taskhost.toml",
        "[tasks.\"demo.fail\"]\nautoretry_for = [\"RuntimeError\"]\nmax_retries = 2\nretry_backoff = 0.05\nretry_jitter = false\n",
    );
    let config = config.to_string_lossy().into_owned();
    let worker = Process::worker(&dir, &redis, &plugins, &["--config", &config]);
    // The operator was warned that this Redis may evict queued tasks.
    assert!(
        worker.log().contains("maxmemory-policy is allkeys-lru"),
        "{}",
        worker.log()
    );
    let mut client = Client::new(&redis);
    let id = client.send("demo.fail", json!(["flaky"]));
    let doc = client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "RuntimeError");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert_eq!(message, "flaky (gave up after 2 retries)");
    assert_eq!(worker.log().matches("task retrying").count(), 2);
}

#[test]
fn progress_through_the_host_interface_is_published_before_the_result() {
    let mut s = setup("progress", &[]);
    let mut listener = s._redis.conn(1);
    let mut pubsub = listener.as_pubsub();
    let id = uuid::Uuid::new_v4().to_string();
    let channel = format!("celery-task-meta-{id}");
    pubsub.subscribe(&channel).expect("subscribe");
    pubsub
        .set_read_timeout(Some(taskhost_tests::WAIT))
        .expect("read timeout");
    s.client.send_as(&id, "demo.progress", json!([3]));
    let mut states = Vec::new();
    while states
        .last()
        .map(|d: &Value| d["status"] != "SUCCESS")
        .unwrap_or(true)
    {
        let message = pubsub
            .get_message()
            .expect("a published state within the wait");
        let payload: String = message.get_payload().expect("payload");
        states.push(serde_json::from_str(&payload).expect("state is JSON"));
    }
    let progress: Vec<&Value> = states
        .iter()
        .filter(|d| d["status"] == "PROGRESS")
        .collect();
    assert_eq!(progress.len(), 3, "{states:?}");
    for (n, doc) in progress.iter().enumerate() {
        assert_eq!(doc["result"], json!({"current": n + 1, "total": 3}));
        assert_eq!(doc["date_done"], Value::Null, "progress is not final");
    }
    assert_eq!(s.client.result(&id)["result"], 3);
}

#[test]
fn a_worker_holds_no_more_unstarted_messages_than_its_prefetch_allows() {
    // -c 1 with a prefetch multiplier of 2: a batch of two is fetched when a slot is free, one
    // starts and one waits, so the worker never holds more than two of the six.
    let mut s = setup("prefetch", &["-c", "1", "--prefetch-multiplier", "2"]);
    let ids: Vec<String> = (0..6)
        .map(|_| s.client.send("demo.sleep", json!([100])))
        .collect();
    let inflight = format!("taskhost:inflight:celery@{}:celery", hostname());
    let mut most_held = 0;
    wait_for("all six results", || {
        most_held = most_held.max(s.client.llen(&inflight));
        ids.iter()
            .all(|id| s.client.state(id).is_some_and(|d| d["status"] == "SUCCESS"))
            .then_some(())
    });
    assert!(
        (1..=2).contains(&most_held),
        "{most_held} messages held at once"
    );
}
