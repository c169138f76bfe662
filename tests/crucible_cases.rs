// The crucible tests, included once per implementation of the plugin (`PLUGIN`) by
// crucible.rs: the Python crucible passes the same tests as the Rust one.

use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use taskhost_tests::{
    Client, HttpStub, Process, RedisServer, Reply, Request, ResultFeed, TestDir, WAIT, free_port,
    wait_for,
};

/// Dropped in field order: the worker first, its directory last.
struct Setup {
    worker: Process,
    client: Client,
    redis: RedisServer,
    _dir: TestDir,
}

/// A worker serving the crucible plugin under test with the given service URLs; `allow` are the granted origins,
/// `extra_config` more of `taskhost.toml`.
fn setup(name: &str, executor: &str, storage: &str, allow: &[&str], extra_config: &str) -> Setup {
    let dir = TestDir::new(&format!("{name}-{PLUGIN}"));
    let redis = RedisServer::start(&dir);
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    let config = dir.write(
        "taskhost.toml",
        &format!(
            "[plugins.{PLUGIN}]\ntasks = [\"tasks.*\"]\nallow_http = [{}]\n\
             config = {{ executor_service_url = {executor:?}, storage_service_url = {storage:?} }}\n\
             {extra_config}",
            allow.join(", ")
        ),
    );
    let plugins = dir.plugins(&[PLUGIN]);
    let config = config.to_string_lossy().into_owned();
    let cache = shared_precompile_cache();
    Process::precompile(&dir, &plugins, &config, &cache);
    let worker = Process::worker(
        &dir,
        &redis,
        &plugins,
        &["--config", &config, "--cache-dir", &cache],
    );
    let client = Client::new(&redis);
    Setup {
        worker,
        client,
        redis,
        _dir: dir,
    }
}

/// A precompile cache every worker of this file shares (across runs too: entries are keyed by
/// the plugin's digest and the engine), so each test's worker loads crucible without compiling
/// it again. What the cache does is tested in `reload.rs`.
fn shared_precompile_cache() -> String {
    taskhost_tests::target_dir()
        .join("test-runs")
        .join("crucible-precompiled")
        .to_string_lossy()
        .into_owned()
}

/// A worker whose executor and storage both answer and are both granted.
fn with_services(name: &str, executor: HttpStub, storage: HttpStub) -> (Setup, HttpStub, HttpStub) {
    let (e, s) = (executor.url(), storage.url());
    (setup(name, &e, &s, &[&e, &s], ""), executor, storage)
}

fn executor_ok() -> HttpStub {
    HttpStub::start(|req| {
        let body: Value = serde_json::from_str(&req.body).unwrap_or(Value::Null);
        Reply::json(
            200,
            json!({"status": "completed", "output": format!("ran {}", body["language"].as_str().unwrap_or("?")), "exit_code": 0}),
        )
    })
}

fn storage_ok() -> HttpStub {
    HttpStub::start(|req| match req.method.as_str() {
        "DELETE" => Reply::json(200, json!({"deleted": 7})),
        _ => Reply::json(200, json!({"ok": true})),
    })
}

/// (method, path) of each request.
fn calls(requests: &[Request]) -> Vec<(&str, &str)> {
    requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect()
}

/// The first line of an exception document's message.
fn message(doc: &Value) -> &str {
    doc["result"]["exc_message"][0]
        .as_str()
        .expect("the exception has a message")
}

// The seed service's tasks, with both services answering.

/// Sends `evaluate_code(42, "print(1)", "python")` and waits for its result.
fn evaluate_42(name: &str) -> (Value, HttpStub, HttpStub) {
    let (mut s, executor, storage) = with_services(name, executor_ok(), storage_ok());
    let id = s
        .client
        .send("tasks.evaluate_code", json!([42, "print(1)", "python"]));
    (s.client.result(&id), executor, storage)
}

#[test]
fn evaluate_code_returns_the_executors_outcome() {
    let (doc, _, _) = evaluate_42("crucible-outcome");
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(
        doc["result"],
        json!({"eval_id": "42", "status": "completed", "output": "ran python", "exit_code": 0})
    );
}

#[test]
fn evaluate_code_posts_the_code_to_the_executor() {
    let (_, executor, _) = evaluate_42("crucible-executor-call");
    let requests = executor.requests();
    assert_eq!(calls(&requests), [("POST", "/execute")]);
    let sent: Value = serde_json::from_str(&requests[0].body).expect("executor got JSON");
    assert_eq!(
        sent,
        json!({"eval_id": "42", "code": "print(1)", "language": "python"})
    );
}

#[test]
fn evaluate_code_sends_its_json_with_a_content_length_not_chunked() {
    let (_, executor, storage) = evaluate_42("crucible-content-length");
    for request in executor.requests().iter().chain(&storage.requests()) {
        assert!(!request.chunked, "{} {} came chunked", request.method, request.path);
    }
}

#[test]
fn evaluate_code_stores_the_executors_answer() {
    let (_, _, storage) = evaluate_42("crucible-storage-call");
    let requests = storage.requests();
    assert_eq!(calls(&requests), [("PUT", "/evaluations/42")]);
    let body: Value = serde_json::from_str(&requests[0].body).expect("storage got JSON");
    assert_eq!(
        body,
        json!({"status": "completed", "output": "ran python", "exit_code": 0})
    );
}

#[test]
fn cleanup_old_evaluations_deletes_those_older_than_the_given_age() {
    let (mut s, _, storage) = with_services("crucible-cleanup", executor_ok(), storage_ok());
    let id = s.client.send_to(
        "celery",
        "tasks.cleanup_old_evaluations",
        json!([]),
        json!({"max_age_hours": 48}),
    );
    assert_eq!(s.client.result(&id)["result"], 7, "storage's deleted count");
    assert_eq!(
        calls(&storage.requests()),
        [("DELETE", "/evaluations?older_than_hours=48")]
    );
}

#[test]
fn cleanup_old_evaluations_defaults_to_24_hours() {
    let (mut s, _, storage) =
        with_services("crucible-cleanup-default", executor_ok(), storage_ok());
    let id = s.client.send("tasks.cleanup_old_evaluations", json!([]));
    assert_eq!(s.client.result(&id)["result"], 7, "storage's deleted count");
    assert_eq!(
        calls(&storage.requests()),
        [("DELETE", "/evaluations?older_than_hours=24")]
    );
}

#[test]
fn health_check_reports_healthy_with_the_node_name_and_a_utc_timestamp() {
    let (mut s, _, _) = with_services("crucible-health", executor_ok(), storage_ok());
    let id = s.client.send("tasks.health_check", json!([]));
    let health = s.client.result(&id)["result"].clone();
    assert_eq!(health["status"], "healthy");
    assert!(
        health["hostname"].as_str().is_some_and(|h| h.contains('@')),
        "{health}"
    );
    assert!(
        health["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with("+00:00")),
        "{health}"
    );
}

// An executor that is down at first, then answers 503 once, then 200.

/// What Redis and the services saw of one evaluation while its executor came up.
struct ComingUp {
    /// The result stored after the first try, while nothing listened on the executor's port.
    first_retry: Value,
    /// The result stored after the try the executor answered 503, read while the next try
    /// waits for the executor's answer.
    retry_after_503: Value,
    /// The final result.
    outcome: Value,
    /// How many requests reached the executor.
    executor_calls: usize,
    /// The requests that reached storage.
    stored: Vec<Request>,
}

/// Sends `evaluate_code("e-1", "1/0", "python")` with nothing listening on the executor's
/// port; once the first RETRY is stored, the executor comes up, answering 503 once, then 200.
fn executor_coming_up(name: &str) -> ComingUp {
    // Nothing listens on this port yet: connection refused.
    let port = free_port();
    let executor_url = format!("http://127.0.0.1:{port}");
    let storage = storage_ok();
    // Headroom: how many tries are refused before the executor comes up depends on the
    // retry jitter, and must not use the task's retries up.
    let mut s = setup(
        name,
        &executor_url,
        &storage.url(),
        &[&executor_url, &storage.url()],
        "[tasks.\"tasks.evaluate_code\"]\nmax_retries = 10\n",
    );
    let id = s
        .client
        .send("tasks.evaluate_code", json!(["e-1", "1/0", "python"]));
    let first_retry = wait_for("a RETRY state after the connection error", || {
        s.client.state(&id).filter(|d| d["status"] == "RETRY")
    });
    // The executor comes up, answering 503 once, then 200; it holds its second answer until
    // the test has read the result the 503 left (dropping `release` lets it go).
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, held) = mpsc::channel::<()>();
    let held = Mutex::new(held);
    let seen = calls.clone();
    let executor = HttpStub::start_on(port, move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::json(503, json!({"detail": "warming up"}));
        }
        let _ = held.lock().expect("held").recv_timeout(WAIT);
        Reply::json(
            200,
            json!({"status": "completed", "output": "ZeroDivisionError"}),
        )
    });
    wait_for("the executor's second call", || {
        (calls.load(Ordering::SeqCst) >= 2).then_some(())
    });
    let retry_after_503 = s.client.state(&id).expect("a result stored after the 503");
    drop(release);
    let outcome = s.client.result(&id);
    drop(executor);
    ComingUp {
        first_retry,
        retry_after_503,
        outcome,
        executor_calls: calls.load(Ordering::SeqCst),
        stored: storage.requests(),
    }
}

#[test]
fn an_unreachable_executor_is_retried_as_a_connection_error() {
    let run = executor_coming_up("crucible-unreachable");
    let retry = &run.first_retry;
    assert_eq!(retry["status"], "RETRY", "{retry}");
    assert_eq!(retry["result"]["exc_type"], "ConnectionError", "{retry}");
}

#[test]
fn an_executor_answering_503_is_retried_with_the_services_message() {
    let run = executor_coming_up("crucible-503");
    let retry = &run.retry_after_503;
    assert_eq!(retry["status"], "RETRY", "{retry}");
    let text = message(retry);
    assert!(
        text.contains("answered 503") && text.contains("warming up"),
        "{text}"
    );
}

#[test]
fn an_evaluation_retried_until_the_executor_answers_succeeds_with_its_answer() {
    let run = executor_coming_up("crucible-comes-up");
    let doc = &run.outcome;
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(doc["result"]["output"], "ZeroDivisionError");
}

#[test]
fn each_try_that_reaches_the_executor_calls_it_once() {
    let run = executor_coming_up("crucible-calls");
    assert_eq!(run.executor_calls, 2, "the 503, then the answer");
}

#[test]
fn a_retried_evaluation_is_stored_once() {
    let run = executor_coming_up("crucible-stored-once");
    assert_eq!(calls(&run.stored), [("PUT", "/evaluations/e-1")]);
}

// An executor refusing with a 4xx.

/// Sends `evaluate_code(7, ...)` in COBOL to an executor answering 400.
fn evaluate_cobol(name: &str) -> (Value, Vec<String>, HttpStub, HttpStub) {
    let executor =
        HttpStub::start(|_| Reply::json(400, json!({"detail": "unsupported language: cobol"})));
    let (mut s, executor, storage) = with_services(name, executor, storage_ok());
    let feed = ResultFeed::start(&s.redis);
    let id = s
        .client
        .send("tasks.evaluate_code", json!([7, "DISPLAY 'HI'", "cobol"]));
    let doc = s.client.result(&id);
    wait_for("the feed to see the ending", || {
        (feed.endings(&id) == 1).then_some(())
    });
    (doc, feed.states(&id), executor, storage)
}

#[test]
fn an_executor_4xx_fails_with_the_services_message() {
    let (doc, _, _, _) = evaluate_cobol("crucible-400");
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "HTTPError");
    let text = message(&doc);
    assert!(
        text.contains("unsupported language: cobol") && text.contains("400"),
        "{text}"
    );
}

#[test]
fn an_executor_4xx_is_not_retried() {
    let (_, states, executor, _) = evaluate_cobol("crucible-400-once");
    assert_eq!(executor.requests().len(), 1, "a 4xx is not retried");
    assert_eq!(states, ["FAILURE"], "no RETRY was published");
}

#[test]
fn a_failed_evaluation_stores_nothing() {
    let (_, _, _, storage) = evaluate_cobol("crucible-400-unstored");
    assert!(storage.requests().is_empty());
}

// An origin the operator did not grant.

/// Sends an evaluation with only storage granted; the executor URL is configured but not
/// allowed.
fn evaluate_ungranted(name: &str) -> (Setup, String, Value, HttpStub) {
    let (executor, storage) = (executor_ok(), storage_ok());
    let mut s = setup(name, &executor.url(), &storage.url(), &[&storage.url()], "");
    let id = s
        .client
        .send("tasks.evaluate_code", json!([1, "x", "python"]));
    let doc = s.client.result(&id);
    (s, id, doc, executor)
}

#[test]
fn a_host_the_operator_did_not_grant_is_denied() {
    let (_, _, doc, _) = evaluate_ungranted("crucible-denied");
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "CapabilityDenied", "{doc}");
}

#[test]
fn a_denied_request_never_leaves_the_host() {
    let (_, _, _, executor) = evaluate_ungranted("crucible-denied-unsent");
    assert!(
        executor.requests().is_empty(),
        "the denied request never left the host"
    );
}

#[test]
fn a_denied_request_is_reported_to_the_operator() {
    let (s, id, _, _) = evaluate_ungranted("crucible-denied-logged");
    // The operator's warning is the behaviour under test; it is logged before the task ends.
    let log = s.worker.log();
    assert!(
        log.lines()
            .any(|l| l.contains("denied HTTP request") && l.contains(&id)),
        "{log}"
    );
}

// An executor failing twice, under a backoff the operator set.

/// What one evaluation went through while its executor answered 503 twice, then 200.
struct Backoff {
    /// When each executor request arrived.
    calls: Vec<Instant>,
    /// Every state Redis published for the task.
    states: Vec<String>,
    outcome: Value,
}

fn executor_failing_twice(name: &str) -> Backoff {
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = calls.clone();
    let executor = HttpStub::start(move |_| {
        let mut calls = seen.lock().expect("calls");
        calls.push(Instant::now());
        if calls.len() <= 2 {
            Reply::json(503, json!({"detail": "overloaded"}))
        } else {
            Reply::json(200, json!({"status": "completed"}))
        }
    });
    let storage = storage_ok();
    // The operator turns the task's jitter off and sets its backoff base, so the waits are
    // exactly 0.3 s, then 0.6 s.
    let (e, st) = (executor.url(), storage.url());
    let mut s = setup(
        name,
        &e,
        &st,
        &[&e, &st],
        "[tasks.\"tasks.evaluate_code\"]\nretry_backoff = 0.3\nretry_jitter = false\n",
    );
    let feed = ResultFeed::start(&s.redis);
    let id = s
        .client
        .send("tasks.evaluate_code", json!([3, "x", "python"]));
    let outcome = s.client.result(&id);
    wait_for("the feed to see the ending", || {
        (feed.endings(&id) == 1).then_some(())
    });
    let calls = calls.lock().expect("calls").clone();
    Backoff {
        calls,
        states: feed.states(&id),
        outcome,
    }
}

/// The one run the backoff tests read, each its own behaviour (made once per plugin).
fn backoff_run() -> &'static Backoff {
    static RUN: std::sync::OnceLock<Backoff> = std::sync::OnceLock::new();
    RUN.get_or_init(|| executor_failing_twice("crucible-backoff"))
}

#[test]
fn an_executor_failing_twice_is_retried_until_it_answers() {
    let run = backoff_run();
    assert_eq!(run.outcome["status"], "SUCCESS", "{}", run.outcome);
    assert_eq!(run.calls.len(), 3);
}

#[test]
fn each_failed_try_is_published_as_a_retry() {
    let run = backoff_run();
    let retries = run.states.iter().filter(|s| *s == "RETRY").count();
    assert_eq!(retries, 2, "{:?}", run.states);
}

#[test]
fn retries_wait_an_exponential_backoff() {
    let run = backoff_run();
    let calls = &run.calls;
    assert_eq!(calls.len(), 3);
    let (first, second) = (calls[1] - calls[0], calls[2] - calls[1]);
    eprintln!("executor attempts {first:?} and {second:?} apart (backoff 0.3 s, then 0.6 s)");
    assert!(first >= Duration::from_millis(300), "{first:?}");
    assert!(second >= Duration::from_millis(600), "{second:?}");
    assert!(second > first, "the backoff grows");
}
