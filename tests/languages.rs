//! Plugins as their authors start them, in each language: `taskhost new --lang L NAME`, then
//! `taskhost build`, then the template's tasks through a real worker on real Redis, sent and
//! read by Python Celery: a result, a failure with its kind and message, a retry, progress,
//! and HTTP granted and denied.

use serde_json::json;
use std::process::Command;
use taskhost_tests::{
    Client, HttpStub, Process, RedisServer, Reply, ResultFeed, TestDir, target_dir, taskhost_bin,
    template_wasm, wait_for_within,
};

/// A worker serving the template of `lang`, granted HTTP to `allow`.
struct Setup {
    worker: Process,
    redis: RedisServer,
    dir: TestDir,
    name: String,
}

fn setup(lang: &'static str, test: &str, allow: &[String]) -> Setup {
    let wasm = template_wasm(lang);
    let name = format!("{lang}hello");
    let dir = TestDir::new(&format!("languages-{test}"));
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::copy(&wasm, plugins.join(format!("{name}.wasm"))).expect("copy the plugin");
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    let config = dir.write(
        "taskhost.toml",
        &format!("[plugins.{name}]\nallow_http = [{}]\n", allow.join(", ")),
    );
    let config = config.to_string_lossy().into_owned();
    let cache = target_dir().join("test-runs").join("languages-precompiled");
    let cache = cache.to_string_lossy().into_owned();
    Process::precompile(&dir, &plugins, &config, &cache);
    let args = ["--config", config.as_str(), "--cache-dir", cache.as_str()];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    Setup {
        worker,
        redis,
        dir,
        name,
    }
}

impl Setup {
    /// Runs `code` with Python Celery, `NAME` standing for the plugin's name.
    fn python(&self, code: &str) {
        const PRELUDE: &str = "import os\nfrom celery import Celery\n\
            app = Celery('languages', broker=os.environ['BROKER'], backend=os.environ['BACKEND'])";
        let code = code.replace("NAME", &self.name);
        let logs = || self.worker.log();
        taskhost_tests::run_snippet(&self.dir, &self.redis, PRELUDE, &code, logs);
    }
}

fn a_result_reaches_get(lang: &'static str) {
    setup(lang, &format!("{lang}-result"), &[]).python(
        r#"
assert app.send_task("NAME.add", (2, 3)).get(timeout=30) == 5
"#,
    );
}

fn a_failure_reaches_get_with_its_kind_and_message(lang: &'static str) {
    setup(lang, &format!("{lang}-failure"), &[]).python(
        r#"
r = app.send_task("NAME.fail", ("the answer is not 42",))
try:
    r.get(timeout=30)
    raise SystemExit("no failure")
except ValueError as e:
    assert str(e) == "the answer is not 42", repr(e)
assert r.state == "FAILURE"
"#,
    );
}

fn a_retry_runs_again_until_it_succeeds(lang: &'static str) {
    let s = setup(lang, &format!("{lang}-retry"), &[]);
    let feed = ResultFeed::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    s.python(&format!(
        r#"
assert app.send_task("NAME.flaky", (3,), task_id={id:?}).get(timeout=30) == 2
"#
    ));
    assert_eq!(feed.states(&id), ["RETRY", "RETRY", "SUCCESS"]);
}

fn progress_is_published_before_the_result(lang: &'static str) {
    let s = setup(lang, &format!("{lang}-progress"), &[]);
    let feed = ResultFeed::start(&s.redis);
    let id = uuid::Uuid::new_v4().to_string();
    s.python(&format!(
        r#"
assert app.send_task("NAME.progress", (3,), task_id={id:?}).get(timeout=30) == 3
"#
    ));
    let states = feed.states(&id);
    assert!(
        states.first().is_some_and(|s| s == "PROGRESS"),
        "{states:?}"
    );
    assert_eq!(states.last().map(String::as_str), Some("SUCCESS"));
}

fn http_reaches_a_granted_origin(lang: &'static str) {
    let stub = HttpStub::start(|_| Reply::json(200, json!({"answer": 42})));
    let s = setup(lang, &format!("{lang}-http"), &[stub.url()]);
    s.python(&format!(
        r#"
assert app.send_task("NAME.fetch", ({:?},)).get(timeout=30) == {{"answer": 42}}
"#,
        format!("{}/answer", stub.url())
    ));
    let requests = stub.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/answer");
}

fn http_to_an_origin_not_granted_is_denied(lang: &'static str) {
    let stub = HttpStub::start(|_| Reply::json(200, json!({"answer": 42})));
    // HTTP granted, but to another origin. (A plugin granted none has no HTTP at all: its
    // calls trap, see trust.rs.)
    let s = setup(
        lang,
        &format!("{lang}-http-denied"),
        &["http://127.0.0.1:9".to_owned()],
    );
    s.python(&format!(
        r#"
r = app.send_task("NAME.fetch", ({:?},))
try:
    r.get(timeout=30)
    raise SystemExit("no failure")
except Exception as e:
    assert type(e).__name__ == "CapabilityDenied", repr(e)
    assert "not allowed" in str(e), repr(e)
"#,
        format!("{}/answer", stub.url())
    ));
    assert!(stub.requests().is_empty(), "nothing left the host");
}

/// Every template's plugin shows each behaviour above: a test per language and behaviour,
/// `<language>::<behaviour>`.
macro_rules! each_language {
    ($($language:ident),*; $behaviours:tt) => {
        $(each_language!(@one $language $behaviours);)*
    };
    (@one $language:ident [$($behaviour:ident),*]) => {
        mod $language {
            $(
                #[test]
                fn $behaviour() {
                    super::$behaviour(stringify!($language));
                }
            )*
        }
    };
}

each_language!(rust, python, js; [
    a_result_reaches_get,
    a_failure_reaches_get_with_its_kind_and_message,
    a_retry_runs_again_until_it_succeeds,
    progress_is_published_before_the_result,
    http_reaches_a_granted_origin,
    http_to_an_origin_not_granted_is_denied
]);

// Python.

#[test]
fn python_template_failure_carries_the_python_traceback() {
    setup("python", "python-traceback", &[]).python(
        r#"
r = app.send_task("NAME.fail", ("boom",))
r.get(timeout=30, propagate=False)
# A plugin carries bytecode, not source: each frame names its file, line and function.
assert r.traceback.startswith("Traceback (most recent call last)"), r.traceback
assert 'app.py", line' in r.traceback and "in fail" in r.traceback, r.traceback
assert r.traceback.rstrip().endswith("ValueError: boom"), r.traceback
assert "taskhost/__init__.py" not in r.traceback, r.traceback
"#,
    );
}

#[test]
fn python_template_bad_arguments_raise_pythons_own_type_error() {
    setup("python", "python-typeerror", &[]).python(
        r#"
try:
    app.send_task("NAME.add", (1,)).get(timeout=30)
    raise SystemExit("no failure")
except TypeError as e:
    assert "missing 1 required positional argument: 'y'" in str(e), repr(e)
"#,
    );
}

// JavaScript.

#[test]
fn js_template_bad_arguments_raise_a_type_error() {
    setup("js", "js-typeerror", &[]).python(
        r#"
try:
    app.send_task("NAME.add", (1, 2, 3)).get(timeout=30)
    raise SystemExit("no failure")
except TypeError as e:
    assert "takes 2 positional arguments but 3 were given" in str(e), repr(e)
"#,
    );
}

#[test]
fn js_template_kwargs_bind_by_parameter_name() {
    setup("js", "js-kwargs", &[]).python(
        r#"
assert app.send_task("NAME.add", (2,), {"y": 40}).get(timeout=30) == 42
"#,
    );
}

// The README's quick starts, run as a new user would.

fn readme_quickstart_runs_as_written(lang: &str) {
    let dir = TestDir::new(&format!("languages-readme-{lang}"));
    let out = readme_block_command(&format!("quickstart-{lang}"), &dir)
        .env("CARGO_TARGET_DIR", target_dir().join("template-builds"))
        .env("TASKHOST_CACHE_DIR", target_dir().join("build-cache"))
        .output()
        .expect("run the quick start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the {lang} quick start failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().last(), Some("5"), "{stdout}");
}

/// The README's block `<!-- NAME -->` as a bash command in `dir`, with this build's
/// `taskhost` first on the PATH, as a user who installed it runs the block.
fn readme_block_command(name: &str, dir: &TestDir) -> Command {
    let script = taskhost_tests::readme_block(name);
    let bin = taskhost_bin();
    let path = format!(
        "{}:{}",
        bin.parent().expect("the binary's directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("bash");
    command
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path);
    command
}

/// The README's block `<!-- testing-LANG -->` run as written, from a clone of this repository;
/// its output.
fn readme_testing_block_runs_as_written(lang: &str) -> String {
    let dir = TestDir::new(&format!("languages-readme-testing-{lang}"));
    let out = readme_block_command(&format!("testing-{lang}"), &dir)
        .env("TASKHOST_SRC", taskhost_tests::root())
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .output()
        .expect("run the README's testing block");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the {lang} testing block failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_python_templates_tests_pass_natively_under_pytest() {
    let out = readme_testing_block_runs_as_written("python");
    assert!(out.contains("6 passed"), "{out}");
}

#[test]
fn the_js_templates_tests_pass_natively_under_nodes_test_runner() {
    let out = readme_testing_block_runs_as_written("js");
    assert!(
        out.contains("# pass 5") && out.contains("# fail 0"),
        "{out}"
    );
}

#[test]
fn readme_quickstart_for_rust_runs_as_written() {
    readme_quickstart_runs_as_written("rust");
}

#[test]
fn readme_quickstart_for_python_runs_as_written() {
    readme_quickstart_runs_as_written("python");
}

#[test]
fn readme_quickstart_for_js_runs_as_written() {
    readme_quickstart_runs_as_written("js");
}

// The author's loop: `taskhost dev --watch`.

/// `taskhost dev` on `redis`, serving `plugins`, with `extra` arguments.
fn dev_command(redis: &RedisServer, plugins: &std::path::Path, extra: &[&str]) -> Command {
    let mut command = Command::new(taskhost_bin());
    command
        .args([
            "dev",
            "--broker",
            &redis.url(0),
            "--result-backend",
            &redis.url(1),
            "-p",
        ])
        .arg(plugins)
        .args(extra)
        // The Rust template's dependencies compiled once, so each build here is the plugin's own.
        .env("CARGO_TARGET_DIR", target_dir().join("template-builds"))
        .env("TASKHOST_CACHE_DIR", target_dir().join("build-cache"));
    command
}

/// `taskhost dev --watch` on a new project `name` in `lang`, its `add` served once built.
struct Dev {
    dir: TestDir,
    redis: RedisServer,
    name: String,
    project: std::path::PathBuf,
    /// The dev build in the worker's plugin directory.
    plugin: std::path::PathBuf,
    _dev: Process,
}

impl Dev {
    fn start(test: &str, name: &str, lang: &str) -> Self {
        let dir = TestDir::new(&format!("languages-{test}"));
        let redis = RedisServer::start(&dir);
        let project = dir.path().join(name);
        let made = Command::new(taskhost_bin())
            .args(["new", name, "--lang", lang, "--dir"])
            .arg(&project)
            .status()
            .expect("taskhost new");
        assert!(made.success());
        let plugins = dir.path().join("plugins");
        let watch = project.to_string_lossy().into_owned();
        let command = dev_command(&redis, &plugins, &["--watch", &watch]);
        let dev = Process::spawn(&dir, "dev.log", command);
        let session = Self {
            plugin: plugins.join(format!("{name}.wasm")),
            name: name.to_owned(),
            dir,
            redis,
            project,
            _dev: dev,
        };
        session.wait_for_result("add", json!([2, 3]), &json!(5));
        session
    }

    /// Waits (a build's time at most, on a loaded 2-core machine) until the plugin's `task`
    /// answers `want` for `args`.
    fn wait_for_result(&self, task: &str, args: serde_json::Value, want: &serde_json::Value) {
        let mut client = Client::new(&self.redis);
        let task = format!("{}.{task}", self.name);
        let within = std::time::Duration::from_secs(120);
        wait_for_within(&format!("{task} answering {want}"), within, || {
            let id = client.send(&task, args.clone());
            (client.result(&id)["result"] == *want).then_some(())
        });
    }

    /// `file` with each `from` replaced by its `to`, saved once, as an editor saves.
    fn edit(&self, file: &str, changes: &[(&str, &str)]) {
        let path = self.project.join(file);
        let mut code = std::fs::read_to_string(&path).expect("read the source");
        for (from, to) in changes {
            assert!(code.contains(from), "{file} has {from:?}");
            code = code.replace(from, to);
        }
        let saving = self.project.join(".saving");
        std::fs::write(&saving, code).expect("write the edit");
        std::fs::rename(&saving, &path).expect("save the edit");
    }

    fn plugin_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.plugin).expect("the dev build")
    }
}

#[test]
fn dev_watch_rebuilds_a_changed_plugin_and_the_worker_serves_the_new_code() {
    template_wasm("rust");
    let dev = Dev::start("dev-watch", "watched", "rust");
    dev.edit(
        "src/lib.rs",
        &[(
            "x.checked_add(y)",
            "x.checked_add(y).and_then(|s| s.checked_add(100))",
        )],
    );
    dev.wait_for_result("add", json!([2, 3]), &json!(105));
}

#[test]
fn dev_watch_serves_a_python_edit_from_its_sources_without_a_build() {
    let dev = Dev::start("dev-python-live", "live", "python");
    let built = dev.plugin_bytes();
    dev.edit(
        "app.py",
        &[(
            "    return x + y\n",
            "    return x + y + 100\n\n\n@task(name=\"live.mul\")\ndef mul(x, y):\n    return x * y\n",
        )],
    );
    dev.wait_for_result("add", json!([2, 3]), &json!(105));
    // A new task too: the worker loaded the same file again and asked it for its tasks.
    dev.wait_for_result("mul", json!([2, 3]), &json!(6));
    assert!(
        dev.plugin_bytes() == built,
        "the edit was served by a new build, not from the sources"
    );
}

#[test]
fn dev_watch_builds_a_python_edit_that_imports_what_its_build_did_not() {
    let dev = Dev::start("dev-python-import", "imports", "python");
    let built = dev.plugin_bytes();
    // `fractions` is in no snapshot of the template: the first build never imported it.
    dev.edit(
        "app.py",
        &[
            (
                "    return x + y\n",
                "    return str(fractions.Fraction(x, y))\n",
            ),
            (
                "from taskhost import",
                "import fractions\nfrom taskhost import",
            ),
        ],
    );
    dev.wait_for_result("add", json!([2, 4]), &json!("1/2"));
    assert!(
        dev.plugin_bytes() != built,
        "served without a new build, though the build never imported fractions"
    );
}

/// What the edited `add` of `a_python_dev_build_reads_its_project_and_nothing_else…` tries:
/// each outcome, or the name of the OSError it raised.
const TRIES_THE_SOURCES: &str = r#"    import os
    seen = []
    for try_it in (
        lambda: open("/taskhost-dev/sources/app.py").read(12),
        lambda: open("/taskhost-dev/sources/../outside.txt").read(),
        lambda: open("/taskhost-dev/sources/new.txt", "w").write("x"),
        lambda: open("/taskhost-dev/sources/app.py", "a").write("x"),
        lambda: os.remove("/taskhost-dev/sources/app.py"),
    ):
        try:
            seen.append(str(try_it()))
        except OSError as e:
            seen.append(type(e).__name__)
    return seen
"#;

#[test]
fn a_python_dev_build_reads_its_project_and_nothing_else_and_writes_nothing() {
    let dev = Dev::start("dev-python-confined", "confined", "python");
    std::fs::write(dev.dir.path().join("outside.txt"), "secret").expect("a file outside");
    dev.edit("app.py", &[("    return x + y\n", TRIES_THE_SOURCES)]);
    let app = || std::fs::read_to_string(dev.project.join("app.py")).expect("app.py");
    let written = app();
    let mut client = Client::new(&dev.redis);
    let seen = wait_for_within(
        "the edit served",
        std::time::Duration::from_secs(120),
        || {
            let id = client.send("confined.add", json!([2, 3]));
            Some(client.result(&id)["result"].clone()).filter(serde_json::Value::is_array)
        },
    );
    let seen: Vec<String> = serde_json::from_value(seen).expect("a list of strings");
    assert_eq!(seen[0], "\"\"\"confined:", "its own sources are readable");
    for (what, outcome) in ["read outside", "create", "append", "remove"]
        .iter()
        .zip(&seen[1..])
    {
        assert!(
            outcome.ends_with("Error"),
            "{what} in the sources was allowed: {seen:?}"
        );
    }
    assert!(!dev.project.join("new.txt").exists());
    assert_eq!(app(), written, "app.py was written to");
}

#[test]
fn dev_compiles_with_the_fast_compiler_and_still_stops_a_task_at_its_time_limit() {
    let dir = TestDir::new("languages-dev-time-limit");
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::copy(
        taskhost_tests::test_plugin_wasm("hostile"),
        plugins.join("hostile.wasm"),
    )
    .expect("copy the plugin");
    let command = dev_command(&redis, &plugins, &["--time-limit", "0.5"]);
    let _dev = Process::spawn(&dir, "dev.log", command);
    let mut client = Client::new(&redis);
    let id = client.send("hostile.spin", json!([]));
    let result = client.result(&id);
    assert_eq!(result["status"], "FAILURE", "{result}");
    assert_eq!(
        result["result"]["exc_type"], "TimeLimitExceeded",
        "{result}"
    );
}

// The Rust SDK's `tasks!` refusing a malformed function, as its author meets the error.

/// What `cargo check` says of the Rust template with its `add` task replaced by `item`: the
/// compiler's output, checked to be a failure.
fn compiler_says(test: &str, item: &str) -> String {
    let dir = TestDir::new(&format!("languages-macro-{test}"));
    let project = dir.path().join("malformed");
    let made = Command::new(taskhost_bin())
        .args(["new", "malformed", "--lang", "rust", "--dir"])
        .arg(&project)
        .status()
        .expect("taskhost new");
    assert!(made.success());
    let source = project.join("src").join("lib.rs");
    let code = std::fs::read_to_string(&source).expect("read the source");
    let add = "    #[task(name = \"malformed.add\")]\n    fn add(x: i64, y: i64) -> Result<i64> {";
    assert!(code.contains(add), "the template's add task");
    std::fs::write(&source, code.replace(add, item)).expect("write the malformed source");
    let out = Command::new("cargo")
        .args(["check", "--quiet", "--color", "never"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", target_dir().join("template-builds"))
        .output()
        .expect("run cargo check");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the malformed plugin compiled:\n{stderr}"
    );
    stderr
}

/// The line of the template's `lib.rs` the replaced `add` task starts on (its `#[task]`).
fn add_line() -> usize {
    let template = include_str!("../plugins/templates/rust/src/lib.rs");
    1 + template
        .lines()
        .position(|l| l.contains("#[task(name = \"{{name}}.add\")]"))
        .expect("the template's add task")
}

#[test]
fn tasks_macro_refuses_an_async_function_at_its_name() {
    let stderr = compiler_says(
        "async",
        "    #[task(name = \"malformed.add\")]\n    async fn add(x: i64, y: i64) -> Result<i64> {",
    );
    assert!(
        stderr.contains("a task function cannot be `async`"),
        "{stderr}"
    );
    let at = format!("src/lib.rs:{}:", add_line() + 1);
    assert!(stderr.contains(&at), "the error is at {at}:\n{stderr}");
}

#[test]
fn tasks_macro_refuses_a_pattern_parameter_at_the_functions_name() {
    let stderr = compiler_says(
        "pattern",
        "    #[task(name = \"malformed.add\")]\n    fn add((x, y): (i64, i64)) -> Result<i64> {",
    );
    assert!(
        stderr.contains("must be `name: Type` or `mut name: Type`"),
        "{stderr}"
    );
    let at = format!("src/lib.rs:{}:", add_line() + 1);
    assert!(stderr.contains(&at), "the error is at {at}:\n{stderr}");
}

#[test]
fn tasks_macro_refuses_a_function_without_a_task_name_at_its_name() {
    let stderr = compiler_says(
        "unnamed",
        "    #[task(max_retries = 3)]\n    fn add(x: i64, y: i64) -> Result<i64> {",
    );
    assert!(
        stderr.contains("write `#[task(name = \"plugin.task\""),
        "{stderr}"
    );
    let at = format!("src/lib.rs:{}:", add_line());
    assert!(stderr.contains(&at), "the error is at {at}:\n{stderr}");
}
