//! The Python and JavaScript SDKs behave as Celery does where an author relies on it, seen from
//! a Python Celery producer: `autoretry_for` matches subclasses, `self.retry()` waits
//! `default_retry_delay`, `retry(eta=)` is honoured, what a plugin cannot do is refused with a
//! clear error (never ignored), `current_task` is the task, and `signature`, `chain` and
//! `chord` send from inside a task; in JavaScript, parameters read from the function, async
//! tasks, the standard `fetch` with a denied origin as a typed error, and exported error
//! classes.
//!
//! The plugins are `tests/plugins/semantics-py` (served as `sem`) and `semantics-js` (`semjs`),
//! built with `taskhost build`.

use serde_json::json;
use taskhost_tests::{
    HttpStub, Process, RedisServer, Reply, TestDir, source_plugin_wasm, target_dir,
};

/// A worker serving both semantics plugins, `semjs` granted HTTP to a stub answering JSON.
struct Setup {
    worker: Process,
    redis: RedisServer,
    stub: HttpStub,
    dir: TestDir,
}

fn setup(test: &str) -> Setup {
    let dir = TestDir::new(test);
    let redis = RedisServer::start(&dir);
    let stub = HttpStub::start(|_| Reply::json(200, json!({"answer": 42})));
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    for (source, name) in [("semantics-py", "sem"), ("semantics-js", "semjs")] {
        let wasm = source_plugin_wasm(source);
        std::fs::copy(wasm, plugins.join(format!("{name}.wasm"))).expect("copy the plugin");
    }
    let config = dir.write(
        "taskhost.toml",
        &format!("[plugins.semjs]\nallow_http = [{:?}]\n", stub.url()),
    );
    let config = config.to_string_lossy().into_owned();
    let cache = target_dir().join("test-runs").join("semantics-precompiled");
    let cache = cache.to_string_lossy().into_owned();
    Process::precompile(&dir, &plugins, &config, &cache);
    let args = ["--config", config.as_str(), "--cache-dir", cache.as_str()];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    Setup {
        worker,
        redis,
        stub,
        dir,
    }
}

impl Setup {
    /// Runs `code` with Python Celery (`app` is the producer; `STUB` the granted origin).
    fn python(&self, code: &str) {
        const PRELUDE: &str = "import os, time\nfrom celery import Celery\n\
            app = Celery('semantics', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])\n\
            def fails(r, kind):\n    try:\n        r.get(timeout=30)\n    except Exception as e:\n        \
            assert type(e).__name__ == kind, repr(e)\n        return str(e)\n    \
            raise SystemExit(f'{r.id} succeeded')";
        let code = code.replace("STUB", &self.stub.url());
        let logs = || self.worker.log();
        taskhost_tests::run_snippet(&self.dir, &self.redis, PRELUDE, &code, logs);
    }
}

// --- Python: Celery's semantics --------------------------------------------------------------

#[test]
fn python_autoretry_for_retries_a_subclass_of_a_listed_exception() {
    setup("sem-py-autoretry").python(
        r#"
r = app.send_task("sem.autoretry_subclass")
message = fails(r, "ConnectionRefusedError")
assert "try 1" in message, message
"#,
    );
}

#[test]
fn python_dont_autoretry_for_fails_at_once() {
    setup("sem-py-dont-autoretry").python(
        r#"
r = app.send_task("sem.autoretry_not_excluded")
fails(r, "FileNotFoundError")
assert r.info is not None
"#,
    );
}

#[test]
fn python_retry_without_countdown_waits_the_default_retry_delay() {
    setup("sem-py-retry-delay").python(
        r#"
r = app.send_task("sem.retry_default_delay")
deadline = time.time() + 30
while r.state != "RETRY" and time.time() < deadline:
    time.sleep(0.05)
assert r.state == "RETRY", r.state
import redis
db = redis.Redis.from_url(os.environ["BROKER"])
due = [score for _, score in db.zrange("taskhost:delayed", 0, -1, withscores=True)]
assert len(due) == 1, due
wait = due[0] / 1000 - time.time()
assert 170 < wait <= 180, wait
"#,
    );
}

#[test]
fn python_retry_at_an_eta_runs_again_then() {
    setup("sem-py-retry-eta").python(
        r#"
assert app.send_task("sem.retry_eta").get(timeout=30) == 1
"#,
    );
}

#[test]
fn python_retry_with_new_arguments_is_refused_with_a_type_error() {
    setup("sem-py-retry-args").python(
        r#"
message = fails(app.send_task("sem.retry_with_args"), "TypeError")
assert "args and kwargs cannot be changed" in message, message
"#,
    );
}

#[test]
fn python_reject_with_requeue_is_refused_with_a_type_error() {
    setup("sem-py-reject-requeue").python(
        r#"
message = fails(app.send_task("sem.reject_requeue"), "TypeError")
assert "requeue" in message, message
"#,
    );
}

#[test]
fn python_update_state_of_another_task_is_refused() {
    setup("sem-py-update-other").python(
        r#"
victim = app.send_task("sem.add", (1, 2))
assert victim.get(timeout=30) == 3
message = fails(app.send_task("sem.update_other", (victim.id,)), "ValueError")
assert "not another task's" in message, message
assert app.AsyncResult(victim.id).state == "SUCCESS"
"#,
    );
}

#[test]
fn python_update_state_of_its_own_id_is_published() {
    setup("sem-py-update-own").python(
        r#"
assert app.send_task("sem.update_own").get(timeout=30) == "done"
"#,
    );
}

#[test]
fn python_current_task_is_the_running_task() {
    setup("sem-py-current").python(
        r#"
assert app.send_task("sem.current").get(timeout=30) == {"name": "sem.current", "same_id": True}
"#,
    );
}

#[test]
fn python_a_signature_sent_from_a_task_runs() {
    setup("sem-py-signature").python(
        r#"
sent = app.send_task("sem.send_signature").get(timeout=30)
assert app.AsyncResult(sent).get(timeout=30) == 3
"#,
    );
}

#[test]
fn python_a_task_a_plugin_sends_under_another_tasks_id_gets_an_id_of_its_own() {
    setup("sem-py-send-as").python(
        r#"
victim = app.send_task("sem.add", (1, 1))
assert victim.get(timeout=30) == 2
sent = app.send_task("sem.send_as", (victim.id,)).get(timeout=30)
assert sent != victim.id, "the plugin named the id of what it sent"
assert app.AsyncResult(sent).get(timeout=30) == 42
assert app.AsyncResult(victim.id).get(timeout=30) == 2, "the victim's result was overwritten"
"#,
    );
}

#[test]
fn python_a_chain_sent_from_a_task_passes_results_on() {
    setup("sem-py-chain").python(
        r#"
last = app.send_task("sem.send_chain").get(timeout=30)
assert app.AsyncResult(last).get(timeout=30) == 13
"#,
    );
}

#[test]
fn python_a_chord_sent_from_a_task_runs_its_body_on_the_header_results() {
    setup("sem-py-chord").python(
        r#"
body = app.send_task("sem.send_chord").get(timeout=30)
assert app.AsyncResult(body).get(timeout=30) == 6
"#,
    );
}

#[test]
fn python_waiting_for_a_result_inside_a_task_is_refused() {
    setup("sem-py-get-inside").python(
        r#"
message = fails(app.send_task("sem.get_inside"), "RuntimeError")
assert "Never call result.get() within a task" in message, message
"#,
    );
}

// --- JavaScript: as an author of today writes it ---------------------------------------------

#[test]
fn js_kwargs_bind_to_the_functions_own_parameter_names() {
    setup("sem-js-params").python(
        r#"
assert app.send_task("semjs.greet", kwargs={"name": "Ada"}).get(timeout=30) == "Hello, Ada!"
r = app.send_task("semjs.greet", kwargs={"name": "Ada", "greeting": "Hi"})
assert r.get(timeout=30) == "Hi, Ada!"
message = fails(app.send_task("semjs.greet", kwargs={"nom": "Ada"}), "TypeError")
assert "unexpected keyword argument 'nom'" in message, message
"#,
    );
}

#[test]
fn js_an_async_task_resolves_to_its_result() {
    setup("sem-js-async").python(
        r#"
assert app.send_task("semjs.later", (20,)).get(timeout=30) == 20
"#,
    );
}

#[test]
fn js_fetch_reaches_a_granted_origin() {
    setup("sem-js-fetch").python(
        r#"
r = app.send_task("semjs.fetch", ("STUB/answer",))
assert r.get(timeout=30) == {"status": 200, "body": {"answer": 42}}
"#,
    );
}

#[test]
fn js_fetch_to_an_origin_not_granted_rejects_with_capability_denied() {
    setup("sem-js-fetch-denied").python(
        r#"
r = app.send_task("semjs.fetch_denied", ("http://127.0.0.1:9/x",))
assert r.get(timeout=30) == {"name": "CapabilityDenied", "denied": True, "typeError": True}
"#,
    );
}

#[test]
fn js_an_exported_error_class_reaches_get_as_its_python_type() {
    setup("sem-js-errors").python(
        r#"
fails(app.send_task("semjs.key_error", ("k",)), "KeyError")
message = fails(app.send_task("semjs.custom_error"), "QuotaExceeded")
assert "over the quota" in message, message
"#,
    );
}

#[test]
fn js_autoretry_for_retries_a_subclass_of_a_listed_error() {
    setup("sem-js-autoretry").python(
        r#"
message = fails(app.send_task("semjs.autoretry_subclass"), "ConnectionError")
assert "try 1" in message, message
"#,
    );
}

#[test]
fn js_a_chain_sent_from_a_task_passes_results_on() {
    setup("sem-js-chain").python(
        r#"
last = app.send_task("semjs.send_chain").get(timeout=30)
assert app.AsyncResult(last).get(timeout=30) == 13
"#,
    );
}

#[test]
fn js_a_chord_sent_from_a_task_runs_its_body_on_the_header_results() {
    setup("sem-js-chord").python(
        r#"
body = app.send_task("semjs.send_chord").get(timeout=30)
assert app.AsyncResult(body).get(timeout=30) == 6
"#,
    );
}

#[test]
fn js_a_signature_sent_from_a_task_runs() {
    setup("sem-js-signature").python(
        r#"
sent = app.send_task("semjs.send_signature").get(timeout=30)
assert app.AsyncResult(sent).get(timeout=30) == 3
"#,
    );
}
