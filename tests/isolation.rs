//! No state crosses tasks under the default isolation (a fresh instance per task), in each
//! language: a probe plugin looks for what the task before it left (module globals, objects
//! and attributes on built-ins, files, freed heap memory, the random generator's state), then
//! leaves its own secret in every one of those places. Under the default the next task finds
//! nothing; with `reuse_instances` it finds the secret, which shows each probe would see a
//! leak if there were one.
//!
//! The probes: `hostile.find_and_leave` (Rust, scans all of linear memory), and the source
//! plugins `tests/plugins/probe-py` and `probe-js`, built with `taskhost build` as an author
//! builds them (pre-warmed, as every Python and JavaScript plugin is).

use serde_json::{Value, json};
use std::path::PathBuf;
use taskhost_tests::{
    Client, Process, RedisServer, TestDir, source_plugin_wasm, target_dir, test_plugin_wasm,
};

/// A worker (`-c 1`, one task at a time) serving one probe plugin.
struct Setup {
    _worker: Process,
    client: Client,
    _redis: RedisServer,
    task: &'static str,
    _dir: TestDir,
}

/// A worker serving `wasm` as the plugin `name`, whose probe task is `task`, with `reuse` in
/// its section of `taskhost.toml`.
fn setup(test: &str, wasm: PathBuf, name: &str, task: &'static str, reuse: u32) -> Setup {
    let dir = TestDir::new(test);
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::copy(&wasm, plugins.join(format!("{name}.wasm"))).expect("copy the probe");
    let config = dir.write(
        "taskhost.toml",
        &format!("[plugins.{name}]\nreuse_instances = {reuse}\n"),
    );
    let config = config.to_string_lossy().into_owned();
    let cache = target_dir().join("test-runs").join("isolation-precompiled");
    let cache = cache.to_string_lossy().into_owned();
    Process::precompile(&dir, &plugins, &config, &cache);
    let args = [
        "--config",
        config.as_str(),
        "--cache-dir",
        cache.as_str(),
        "-c",
        "1",
    ];
    let worker = Process::worker(&dir, &redis, &plugins, &args);
    worker.wait_log("worker ready");
    Setup {
        client: Client::new(&redis),
        _worker: worker,
        _redis: redis,
        task,
        _dir: dir,
    }
}

fn rust(test: &str, reuse: u32) -> Setup {
    let wasm = test_plugin_wasm("hostile");
    setup(test, wasm, "hostile", "hostile.find_and_leave", reuse)
}

fn python(test: &str, reuse: u32) -> Setup {
    let wasm = source_plugin_wasm("probe-py");
    setup(test, wasm, "probe", "probe.find_and_leave", reuse)
}

fn js(test: &str, reuse: u32) -> Setup {
    let wasm = source_plugin_wasm("probe-js");
    setup(test, wasm, "probe", "probe.find_and_leave", reuse)
}

impl Setup {
    /// Runs the probe with `secret`, one task after another; returns what it reported.
    fn probe(&mut self, secret: &str) -> Value {
        self.client.success(self.task, json!([secret]))
    }

    /// The reports of three probes in a row, with the secrets `secret-1` .. `secret-3`.
    fn three_probes(&mut self) -> Vec<Value> {
        (1..=3)
            .map(|n| self.probe(&format!("secret-{n}")))
            .collect()
    }
}

/// Every place the reports say they looked, with what was found there.
fn found(reports: &[Value]) -> Vec<Value> {
    reports.iter().map(|r| r["found"].clone()).collect()
}

/// The random draws of the reports.
fn draws(reports: &[Value]) -> Vec<f64> {
    reports
        .iter()
        .map(|r| r["random"].as_f64().expect("a random draw"))
        .collect()
}

#[test]
fn a_rust_task_finds_nothing_an_earlier_task_left() {
    let reports = rust("isolation-rust", 1).three_probes();
    let nothing = json!({"global": null, "heap": []});
    assert_eq!(reports, [nothing.clone(), nothing.clone(), nothing]);
}

#[test]
fn a_rust_task_finds_what_an_earlier_task_left_in_a_reused_instance() {
    let reports = rust("isolation-rust-reused", 3).three_probes();
    assert_eq!(reports[1]["global"], "secret-1");
    assert_eq!(reports[1]["heap"], json!(["probe42:secret-1;"]));
}

#[test]
fn a_python_task_finds_nothing_an_earlier_task_left() {
    let reports = python("isolation-python", 1).three_probes();
    let nothing = json!({"global": null, "attribute": null, "file": null, "heap": []});
    assert_eq!(found(&reports), [nothing.clone(), nothing.clone(), nothing]);
}

#[test]
fn python_tasks_draw_independent_random_numbers() {
    let draws = draws(&python("isolation-python-random", 1).three_probes());
    assert!(
        draws[0] != draws[1] && draws[1] != draws[2] && draws[0] != draws[2],
        "each task started from the same random state: {draws:?}"
    );
}

#[test]
fn a_python_task_finds_what_an_earlier_task_left_in_a_reused_instance() {
    let reports = python("isolation-python-reused", 3).three_probes();
    let second = &reports[1]["found"];
    assert_eq!(second["global"], "secret-1");
    assert_eq!(second["attribute"], "secret-1");
    assert_eq!(second["heap"], json!(["taskhost-probe-secret:secret-1"]));
}

#[test]
fn a_javascript_task_finds_nothing_an_earlier_task_left() {
    let reports = js("isolation-js", 1).three_probes();
    let nothing = json!({"module": null, "builtin": null, "global": null, "map": []});
    assert_eq!(found(&reports), [nothing.clone(), nothing.clone(), nothing]);
}

#[test]
fn javascript_tasks_draw_independent_random_numbers() {
    let draws = draws(&js("isolation-js-random", 1).three_probes());
    assert!(
        draws[0] != draws[1] && draws[1] != draws[2] && draws[0] != draws[2],
        "each task started from the same random state: {draws:?}"
    );
}

#[test]
fn a_javascript_task_finds_what_an_earlier_task_left_in_a_reused_instance() {
    let reports = js("isolation-js-reused", 3).three_probes();
    let second = &reports[1]["found"];
    assert_eq!(second["module"], "secret-1");
    assert_eq!(second["builtin"], "secret-1");
    assert_eq!(second["global"], "secret-1");
    assert_eq!(second["map"], json!(["secret-1"]));
}

/// Leaves a stream handle open in one task and uses its number in the next: the second
/// task's result document.
fn leave_then_use_a_handle(s: &mut Setup) -> Value {
    let handle = s.client.success("hostile.leave_handle", json!([]));
    let id = s.client.send("hostile.use_handle", json!([handle]));
    s.client.result(&id)
}

#[test]
fn a_handle_an_earlier_task_left_open_is_gone_for_the_next() {
    let mut s = rust("isolation-handle", 1);
    let used = leave_then_use_a_handle(&mut s);
    assert_eq!(used["status"], "FAILURE", "{used}");
    assert_eq!(used["result"]["exc_type"], "PluginTrap", "{used}");
}

#[test]
fn a_handle_an_earlier_task_left_open_is_there_in_a_reused_instance() {
    let mut s = rust("isolation-handle-reused", 3);
    let used = leave_then_use_a_handle(&mut s);
    assert_eq!(used["status"], "SUCCESS", "{used}");
}
