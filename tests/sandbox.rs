//! The sandbox against a hostile plugin: every misbehaviour fails its own task with a precise
//! error, the worker's memory returns to its baseline, and the normal tasks flowing beside it
//! all come back correct.

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use taskhost_tests::{
    Client, HttpStub, Process, RedisServer, Reply, TestDir, python, rss_kib, test_plugin_wasm,
};

/// Memory the worker may keep above its baseline after a hostile task, KiB. The hostile tasks
/// reach for 128 MiB of guest memory and 20 MiB results; what stays must be far less.
const RSS_TOLERANCE_KIB: u64 = 12 * 1024;

struct Setup {
    dir: TestDir,
    redis: RedisServer,
    worker: Process,
    granted: HttpStub,
    forbidden: HttpStub,
}

fn setup(name: &str, extra_config: &str, worker_args: &[&str]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let forbidden = HttpStub::start(|_| Reply::json(200, json!({"leaked": true})));
    let target = format!("{}/stolen", forbidden.url());
    let granted = HttpStub::start(move |req| match req.path.as_str() {
        "/redirect" => Reply {
            status: 302,
            body: String::new(),
            location: Some(target.clone()),
        },
        // Over the 16 MiB response cap.
        "/huge" => Reply {
            status: 200,
            body: "x".repeat(17 << 20),
            location: None,
        },
        _ => Reply::json(200, json!({"ok": true})),
    });
    let plugins = dir.plugins(&["demo", "crucible"]);
    std::fs::copy(test_plugin_wasm("hostile"), plugins.join("hostile.wasm")).expect("hostile");
    let config = dir.write(
        "taskhost.toml",
        &format!(
            "[plugins.hostile]\nallow_http = [{:?}]\nconfig = {{ own = \"mine\" }}\n{extra_config}\n\
             [plugins.crucible]\nconfig = {{ executor_service_url = \"crucible's secret\" }}\n",
            granted.url()
        ),
    );
    let config = config.to_string_lossy().into_owned();
    let mut args = vec!["--config", config.as_str()];
    args.extend_from_slice(worker_args);
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    Setup {
        dir,
        redis,
        worker,
        granted,
        forbidden,
    }
}

/// Sends demo.add tasks until stopped; returns (id, expected sum) of each.
fn background_traffic(
    redis: &RedisServer,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, i64)>> {
    let mut client = Client::new(redis);
    std::thread::spawn(move || {
        let mut sent = Vec::new();
        let mut i = 0i64;
        while !stop.load(Ordering::SeqCst) {
            sent.push((client.send("demo.add", json!([i, 7])), i + 7));
            i += 1;
            // A steady trickle beside the hostile tasks (traffic, not a wait).
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sent
    })
}

#[test]
fn hostile_tasks_fail_alone_and_the_worker_keeps_serving() {
    let s = setup("sandbox-hostile", "", &["-c", "2"]);
    let mut client = Client::new(&s.redis);
    // Baseline: the worker after it has run tasks, before anything hostile.
    for i in 0..20 {
        let id = client.send("demo.add", json!([i, 1]));
        assert_eq!(client.result(&id)["result"], i + 1);
    }
    let baseline = rss_kib(s.worker.pid());
    let mut highest = baseline;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = background_traffic(&s.redis, stop.clone());

    let redis_addr = format!("127.0.0.1:{}", s.redis.port());
    // (task, args, time limits (soft, hard), expected exception type, expected message part)
    type Case<'a> = (&'a str, Value, (Option<f64>, Option<f64>), &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "hostile.spin",
            json!([]),
            (None, Some(1.0)),
            "TimeLimitExceeded",
            "hard time limit (1.0 s)",
        ),
        (
            "hostile.memory_bomb",
            json!([512]),
            (None, None),
            "MemoryLimitExceeded",
            "128 MiB",
        ),
        (
            "hostile.recurse",
            json!([100_000_000u64]),
            (None, None),
            "StackOverflow",
            "stack",
        ),
        (
            "hostile.big_result",
            json!([20]),
            (None, None),
            "ResultTooLarge",
            "over this plugin's limit",
        ),
        (
            "hostile.big_result",
            json!([200]),
            (None, None),
            "MemoryLimitExceeded",
            "128 MiB",
        ),
        (
            "hostile.panic",
            json!(["boom from a plugin"]),
            (None, None),
            "PluginTrap",
            "boom from a plugin",
        ),
        (
            "hostile.read_file",
            json!(["/etc/passwd"]),
            (None, None),
            "CapabilityDenied",
            "open /etc/passwd",
        ),
        (
            "hostile.read_env",
            json!([]),
            (None, None),
            "CapabilityDenied",
            "no variables are visible",
        ),
        (
            "hostile.connect",
            json!([redis_addr]),
            (None, None),
            "CapabilityDenied",
            "connect 127.0.0.1",
        ),
        (
            "hostile.http_get",
            json!([s.forbidden.url(), false]),
            (None, None),
            "CapabilityDenied",
            "HTTP request denied",
        ),
        (
            "hostile.http_get",
            json!([format!("{}/redirect", s.granted.url()), true]),
            (None, None),
            "CapabilityDenied",
            "/stolen: HTTP request denied",
        ),
        (
            "hostile.http_get",
            json!([format!("{}/huge", s.granted.url()), false]),
            (None, None),
            // The guest sees its body stream fail (how it words that varies).
            "ConnectionError",
            "/huge",
        ),
    ];
    for (task, args, time_limit, exc_type, message) in &cases {
        let id = client.send_with_time_limit(task, args.clone(), *time_limit);
        let doc = client.result(&id);
        assert_eq!(doc["status"], "FAILURE", "{task}{args}: {doc}");
        assert_eq!(doc["result"]["exc_type"], *exc_type, "{task}{args}: {doc}");
        let text = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
        assert!(text.contains(message), "{task}{args}: {text}");
        let rss = rss_kib(s.worker.pid());
        highest = highest.max(rss);
        assert!(
            rss <= baseline + RSS_TOLERANCE_KIB,
            "{task}{args}: worker RSS {rss} KiB, baseline {baseline} KiB"
        );
    }
    assert!(
        s.forbidden.requests().is_empty(),
        "nothing reached the forbidden host"
    );
    assert_eq!(
        s.granted.requests().len(),
        2,
        "the redirect and the huge answer were allowed"
    );
    assert!(s.worker.log().contains("denied HTTP request"));
    assert!(
        s.worker
            .log()
            .contains("HTTP response body over the 16777216 byte limit cut off")
    );

    // What a well-behaved plugin under the same limits gets.
    let succeeds = |client: &mut Client, task: &str, args: Value, limit| {
        let id = client.send_with_time_limit(task, args, limit);
        let doc = client.result(&id);
        assert_eq!(doc["status"], "SUCCESS", "{task}: {doc}");
        doc["result"].clone()
    };
    let soft = succeeds(
        &mut client,
        "hostile.until_soft_limit",
        json!([]),
        (Some(0.3), Some(10.0)),
    );
    assert_eq!(soft["stopped"], "soft time limit");
    let fetched = succeeds(
        &mut client,
        "hostile.http_get",
        json!([format!("{}/ok", s.granted.url()), false]),
        (None, None),
    );
    assert_eq!(fetched["status"], 200);
    assert_eq!(
        succeeds(
            &mut client,
            "hostile.read_config",
            json!(["own"]),
            (None, None)
        ),
        "mine"
    );
    assert_eq!(
        succeeds(
            &mut client,
            "hostile.read_config",
            json!(["executor_service_url"]),
            (None, None)
        ),
        Value::Null,
        "a plugin cannot read another plugin's config"
    );
    assert_eq!(
        succeeds(&mut client, "hostile.flood", json!([20_000]), (None, None)),
        20_000
    );
    let log = s.worker.log();
    assert!(
        log.contains("plugin output over its budget was dropped"),
        "flood summary logged"
    );
    assert!(
        log.matches("flood line").count() <= 200,
        "at most the budget of lines is logged"
    );

    stop.store(true, Ordering::SeqCst);
    let sent = traffic.join().expect("traffic thread");
    assert!(
        sent.len() > 50,
        "traffic flowed during the hostile tasks: {}",
        sent.len()
    );
    for (id, expected) in &sent {
        let doc = client.result(id);
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        assert_eq!(doc["result"], *expected);
    }
    let rss = rss_kib(s.worker.pid());
    assert!(
        rss <= baseline + RSS_TOLERANCE_KIB,
        "final RSS {rss} KiB, baseline {baseline} KiB"
    );
    eprintln!(
        "worker RSS: baseline {baseline} KiB, highest after a hostile task {highest} KiB, final {rss} KiB"
    );
    let _ = &s.dir;
}

#[test]
fn a_spinning_plugin_does_not_stall_the_other_slot() {
    let s = setup("sandbox-fairness", "", &["-c", "2"]);
    let mut client = Client::new(&s.redis);
    let spinner = client.send_with_time_limit("hostile.spin", json!([]), (None, Some(5.0)));
    let mut latencies = Vec::new();
    for i in 0..100 {
        let sent = std::time::Instant::now();
        let id = client.send("demo.add", json!([i, 1]));
        assert_eq!(client.result(&id)["result"], i + 1);
        latencies.push(sent.elapsed());
    }
    // All of them ran while the spinner held the other slot: it has not finished yet.
    assert!(
        client.state(&spinner).is_none(),
        "the spinner was still running"
    );
    latencies.sort();
    eprintln!(
        "demo.add beside a spinning slot (-c 2), 100 tasks: p50 {:?}, max {:?}",
        latencies[50], latencies[99]
    );
    let doc = client.result(&spinner);
    assert_eq!(doc["result"]["exc_type"], "TimeLimitExceeded");
}

#[test]
fn a_plugin_runs_no_more_instances_than_granted() {
    let s = setup("sandbox-instances", "max_instances = 1\n", &["-c", "4"]);
    let mut client = Client::new(&s.redis);
    let holds: Vec<String> = (0..3)
        .map(|_| client.send("hostile.hold", json!([300])))
        .collect();
    let add = client.send("demo.add", json!([1, 1]));
    assert_eq!(
        client.result(&add)["result"],
        2,
        "other plugins are not held up"
    );
    let mut spans: Vec<(u64, u64)> = holds
        .iter()
        .map(|id| {
            let r = client.result(id)["result"].clone();
            (
                r["start"].as_u64().unwrap_or(0),
                r["end"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "instances overlapped: {spans:?}");
    }
}

#[test]
fn python_sees_the_precise_error_types() {
    let s = setup("sandbox-python", "", &["-c", "2"]);
    let script = s.dir.write(
        "errors.py",
        r#"
import sys
from celery import Celery
import celery.exceptions

app = Celery(broker=sys.argv[1], backend=sys.argv[2])

def raised(name, args=(), **options):
    try:
        app.send_task(name, args, **options).get(timeout=20)
    except Exception as e:
        return e
    raise SystemExit(f"{name} did not fail")

e = raised("hostile.spin", time_limit=1)
assert isinstance(e, celery.exceptions.TimeLimitExceeded), repr(e)
e = raised("hostile.memory_bomb", (512,))
assert type(e).__name__ == "MemoryLimitExceeded" and "128 MiB" in str(e), repr(e)
e = raised("hostile.panic", ("seen from python",))
assert type(e).__name__ == "PluginTrap" and "seen from python" in str(e), repr(e)
e = raised("hostile.read_file", ("/etc/passwd",))
assert type(e).__name__ == "CapabilityDenied", repr(e)
print("python OK")
"#,
    );
    let mut command = std::process::Command::new(python());
    command
        .current_dir(s.dir.path())
        .arg(&script)
        .arg(s.redis.url(0))
        .arg(s.redis.url(1));
    let out = Process::run_command(&s.dir, command);
    assert!(
        out.status.success() && out.stdout.contains("python OK"),
        "{out:?}\n{}",
        s.worker.log()
    );
}
