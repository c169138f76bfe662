//! The crucible plugin (the seed service's tasks) against stand-in executor and storage
//! services, through a real worker and Redis.

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use taskhost_tests::{Client, HttpStub, Process, RedisServer, Reply, TestDir, wait_for};

/// A worker serving crucible with the given service URLs; `allow` are the granted origins.
fn worker(
    dir: &TestDir,
    redis: &RedisServer,
    executor: &str,
    storage: &str,
    allow: &[&str],
) -> Process {
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    let config = dir.write(
        "taskhost.toml",
        &format!(
            "[plugins.crucible]\nallow_http = [{}]\n\
             config = {{ executor_service_url = {executor:?}, storage_service_url = {storage:?} }}\n",
            allow.join(", ")
        ),
    );
    let plugins = dir.plugins(&["crucible"]);
    let config = config.to_string_lossy().into_owned();
    Process::worker(dir, redis, &plugins, &["--config", &config])
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

#[test]
fn evaluate_code_runs_the_code_and_stores_the_outcome() {
    let dir = TestDir::new("crucible-happy");
    let redis = RedisServer::start(&dir);
    let (executor, storage) = (executor_ok(), storage_ok());
    let _worker = worker(
        &dir,
        &redis,
        &executor.url(),
        &storage.url(),
        &[&executor.url(), &storage.url()],
    );
    let mut client = Client::new(&redis);
    let id = client.send("tasks.evaluate_code", json!([42, "print(1)", "python"]));
    let doc = client.result(&id);
    assert_eq!(doc["status"], "SUCCESS", "{doc}");
    assert_eq!(
        doc["result"],
        json!({"eval_id": "42", "status": "completed", "output": "ran python", "exit_code": 0})
    );
    let calls = executor.requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        ("POST", "/execute")
    );
    let sent: Value = serde_json::from_str(&calls[0].body).expect("executor got JSON");
    assert_eq!(
        sent,
        json!({"eval_id": "42", "code": "print(1)", "language": "python"})
    );
    let stored = storage.requests();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].method.as_str(), stored[0].path.as_str()),
        ("PUT", "/evaluations/42")
    );
    let body: Value = serde_json::from_str(&stored[0].body).expect("storage got JSON");
    assert_eq!(
        body,
        json!({"status": "completed", "output": "ran python", "exit_code": 0})
    );

    // The other two tasks of the seed service.
    let id = client.send_to(
        "celery",
        "tasks.cleanup_old_evaluations",
        json!([]),
        json!({"max_age_hours": 48}),
    );
    assert_eq!(client.result(&id)["result"], 7);
    let last = storage.requests().pop().expect("cleanup request");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("DELETE", "/evaluations?older_than_hours=48")
    );
    let id = client.send("tasks.cleanup_old_evaluations", json!([]));
    assert_eq!(client.result(&id)["result"], 7);
    let last = storage.requests().pop().expect("cleanup request");
    assert_eq!(last.path, "/evaluations?older_than_hours=24");
    let id = client.send("tasks.health_check", json!([]));
    let health = client.result(&id)["result"].clone();
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

#[test]
fn an_unreachable_then_failing_executor_is_retried_until_it_answers() {
    let dir = TestDir::new("crucible-retry");
    let redis = RedisServer::start(&dir);
    // Nothing listens on this port yet: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let executor_url = format!("http://127.0.0.1:{port}");
    let storage = storage_ok();
    let worker = worker(
        &dir,
        &redis,
        &executor_url,
        &storage.url(),
        &[&executor_url, &storage.url()],
    );
    let mut client = Client::new(&redis);
    let id = client.send("tasks.evaluate_code", json!(["e-1", "1/0", "python"]));
    let retry = wait_for("a RETRY state after the connection error", || {
        client.state(&id).filter(|d| d["status"] == "RETRY")
    });
    assert_eq!(retry["result"]["exc_type"], "ConnectionError", "{retry}");
    // The executor comes up, answering 503 once, then 200.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let _executor = HttpStub::start_on(port, move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::json(503, json!({"detail": "warming up"}))
        } else {
            Reply::json(
                200,
                json!({"status": "completed", "output": "ZeroDivisionError"}),
            )
        }
    });
    let doc = client.result(&id);
    assert_eq!(doc["status"], "SUCCESS", "{doc}\n{}", worker.log());
    assert_eq!(doc["result"]["output"], "ZeroDivisionError");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let log = worker.log();
    assert!(
        log.contains("answered 503") && log.contains("warming up"),
        "{log}"
    );
    assert_eq!(storage.requests().len(), 1);
}

#[test]
fn an_executor_4xx_fails_with_the_services_message() {
    let dir = TestDir::new("crucible-400");
    let redis = RedisServer::start(&dir);
    let executor =
        HttpStub::start(|_| Reply::json(400, json!({"detail": "unsupported language: cobol"})));
    let storage = storage_ok();
    let _worker = worker(
        &dir,
        &redis,
        &executor.url(),
        &storage.url(),
        &[&executor.url(), &storage.url()],
    );
    let mut client = Client::new(&redis);
    let id = client.send("tasks.evaluate_code", json!([7, "DISPLAY 'HI'", "cobol"]));
    let doc = client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "HTTPError");
    let message = doc["result"]["exc_message"][0].as_str().unwrap_or_default();
    assert!(
        message.contains("unsupported language: cobol") && message.contains("400"),
        "{message}"
    );
    assert_eq!(executor.requests().len(), 1, "a 4xx is not retried");
    assert!(storage.requests().is_empty());
}

#[test]
fn a_host_the_operator_did_not_grant_is_denied() {
    let dir = TestDir::new("crucible-denied");
    let redis = RedisServer::start(&dir);
    let (executor, storage) = (executor_ok(), storage_ok());
    // Only storage is granted; the executor URL is configured but not allowed.
    let worker = worker(
        &dir,
        &redis,
        &executor.url(),
        &storage.url(),
        &[&storage.url()],
    );
    let mut client = Client::new(&redis);
    let id = client.send("tasks.evaluate_code", json!([1, "x", "python"]));
    let doc = client.result(&id);
    assert_eq!(doc["status"], "FAILURE");
    assert_eq!(doc["result"]["exc_type"], "CapabilityDenied", "{doc}");
    assert!(
        executor.requests().is_empty(),
        "the denied request never left the host"
    );
    assert!(worker.log().contains("denied HTTP request"));
}

#[test]
fn an_executor_failing_twice_is_retried_with_exponential_backoff() {
    let dir = TestDir::new("crucible-backoff");
    let redis = RedisServer::start(&dir);
    let calls = Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
    let seen = calls.clone();
    let executor = HttpStub::start(move |_| {
        let mut calls = seen.lock().expect("calls");
        calls.push(std::time::Instant::now());
        if calls.len() <= 2 {
            Reply::json(503, json!({"detail": "overloaded"}))
        } else {
            Reply::json(200, json!({"status": "completed"}))
        }
    });
    let storage = storage_ok();
    // The operator turns the task's jitter off and sets its backoff base, so the waits are
    // exactly 0.3 s, then 0.6 s.
    let config = dir.write(
        "taskhost.toml",
        &format!(
            "[plugins.crucible]\nallow_http = [{:?}, {:?}]\n\
             config = {{ executor_service_url = {:?}, storage_service_url = {:?} }}\n\
             [tasks.\"tasks.evaluate_code\"]\nretry_backoff = 0.3\nretry_jitter = false\n",
            executor.url(),
            storage.url(),
            executor.url(),
            storage.url()
        ),
    );
    let plugins = dir.plugins(&["crucible"]);
    let config = config.to_string_lossy().into_owned();
    let worker = Process::worker(&dir, &redis, &plugins, &["--config", &config]);
    let mut client = Client::new(&redis);
    let id = client.send("tasks.evaluate_code", json!([3, "x", "python"]));
    assert_eq!(client.result(&id)["status"], "SUCCESS", "{}", worker.log());
    let calls = calls.lock().expect("calls").clone();
    assert_eq!(calls.len(), 3);
    let (first, second) = (calls[1] - calls[0], calls[2] - calls[1]);
    eprintln!("executor attempts {first:?} and {second:?} apart (backoff 0.3 s, then 0.6 s)");
    assert!(first >= Duration::from_millis(300), "{first:?}");
    assert!(second >= Duration::from_millis(600), "{second:?}");
    assert!(second > first, "the backoff grows");
    assert_eq!(worker.log().matches("task retrying").count(), 2);
}
