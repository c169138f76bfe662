//! Hot reload: swapping, refusing, removing plugins and reloading the config while a worker
//! runs, and the precompile cache.
//!
//! Where a change shows in what the worker serves, the tests wait for that (the `versioned`
//! test plugins report which build ran each task). A refusal changes nothing a task could see,
//! so there the worker's report of it is what the test waits for.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use taskhost_tests::{
    Client, HttpStub, Process, RedisServer, Reply, TestDir, plugin_version, plugin_wasm,
    test_plugin_wasm, wait_for,
};

/// How a new version is put in place.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Written under a hidden name, then renamed over the old file (what deploy tools do).
    Rename,
    /// Truncated and rewritten in place.
    Overwrite,
    /// Truncated and rewritten in place in small chunks, with pauses, like a slow copy.
    SlowChunks,
}

fn put(target: &Path, source: &Path, how: Placement) {
    let bytes = std::fs::read(source).expect("read new version");
    match how {
        Placement::Rename => {
            let tmp = target.with_file_name(".incoming.wasm.tmp");
            std::fs::write(&tmp, &bytes).expect("write temp");
            std::fs::rename(&tmp, target).expect("rename into place");
        }
        Placement::Overwrite => std::fs::write(target, &bytes).expect("overwrite"),
        Placement::SlowChunks => {
            let mut file = std::fs::File::create(target).expect("truncate");
            for chunk in bytes.chunks(bytes.len() / 8 + 1) {
                file.write_all(chunk).expect("write chunk");
                file.flush().expect("flush");
                // The slow writer under test (not a wait for the worker): the watcher must
                // not serve the file before it is complete.
                taskhost_tests::pace(std::time::Duration::from_millis(30));
            }
        }
    }
}

/// Dropped in field order: the worker first, its directory last.
struct Setup {
    worker: Process,
    client: Client,
    redis: RedisServer,
    plugins: PathBuf,
    dir: TestDir,
}

/// A worker watching a plugin directory that holds a copy of `plugin` as `demo.wasm`.
fn watching(name: &str, plugin: &Path, worker_args: &[&str]) -> Setup {
    let dir = TestDir::new(name);
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    std::fs::copy(plugin, plugins.join("demo.wasm")).expect("install demo.wasm");
    let worker = start(&dir, &redis, &plugins, &[], worker_args);
    let client = Client::new(&redis);
    Setup {
        worker,
        client,
        redis,
        plugins,
        dir,
    }
}

/// A worker on `redis` watching `plugins`, on the precompile cache this file's tests share.
fn start(
    dir: &TestDir,
    redis: &RedisServer,
    plugins: &Path,
    config_args: &[&str],
    worker_args: &[&str],
) -> Process {
    // Shared across tests and runs (entries are keyed by the plugin's digest and the engine),
    // so workers load what earlier tests compiled. The cache's own tests use their own.
    let cache = taskhost_tests::target_dir()
        .join("test-runs")
        .join("reload-precompiled");
    let cache = cache.to_string_lossy();
    let mut args = vec!["--cache-dir", &cache];
    args.extend_from_slice(config_args);
    args.extend_from_slice(worker_args);
    Process::worker(dir, redis, plugins, &args)
}

impl Setup {
    /// The plugin file the worker serves demo's tasks from.
    fn demo(&self) -> PathBuf {
        self.plugins.join("demo.wasm")
    }

    /// Sends demo.add(2, 3) and waits for its final result document.
    fn add_2_3(&mut self) -> Value {
        let id = self.client.send("demo.add", json!([2, 3]));
        self.client.result(&id)
    }
}

// Swapping versions under load.

/// Worker arguments for [`wait_serving`]'s probes: the `probes` queue, taken before `celery`,
/// so a probe does not wait behind a load.
const PROBED: [&str; 2] = ["-Q", "probes,celery"];

/// Waits until demo's tasks are served by build `version` ("v1" or "v2"), probing with
/// demo.echo on the `probes` queue (the worker must consume it: [`PROBED`]).
fn wait_serving(client: &mut Client, version: &str) {
    wait_for(&format!("build {version} to serve demo.echo"), || {
        let id = client.send_to("probes", "demo.echo", json!(["probe"]), json!({}));
        (client.result(&id)["result"]["version"] == version).then_some(())
    });
}

/// What a worker did with a steady stream of tasks while its plugin was swapped.
struct SwapRun {
    s: Setup,
    /// How many tasks the stream sent.
    total: i64,
    /// Each task of the stream: its number and its final result document (demo.echo for
    /// every fifth, demo.add otherwise).
    results: Vec<(i64, Value)>,
    /// How many times the plugin file was changed.
    swaps: usize,
}

/// Swaps versioned-v1 and versioned-v2 twelve times, each of the three ways in turn, while a
/// producer sends a steady stream of 3000 tasks; waits for each swap to serve before the next.
fn swapping_under_load(name: &str) -> SwapRun {
    let (v1, v2) = (
        test_plugin_wasm("versioned-v1"),
        test_plugin_wasm("versioned-v2"),
    );
    let mut s = watching(
        name,
        &v1,
        &[&["-c", "4", "--metrics-addr", "127.0.0.1:0"][..], &PROBED].concat(),
    );
    let total = 3000i64;
    let began = std::time::Instant::now();
    let producer = {
        let mut client = Client::new(&s.redis);
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            for i in 0..total {
                let id = if i % 5 == 0 {
                    client.send("demo.echo", json!([{"i": i}]))
                } else {
                    client.send("demo.add", json!([i, 1]))
                };
                sent.push((id, i));
                if i % 100 == 0 {
                    // Pace the stream so it spans the swaps (a producer, not a wait).
                    taskhost_tests::pace(std::time::Duration::from_millis(20));
                }
            }
            (sent, began.elapsed())
        })
    };
    let ways = [
        Placement::Rename,
        Placement::Overwrite,
        Placement::SlowChunks,
    ];
    let swaps = 12;
    for n in 0..swaps {
        let (next, version) = if n % 2 == 0 { (&v2, "v2") } else { (&v1, "v1") };
        put(&s.demo(), next, ways[n % ways.len()]);
        wait_serving(&mut s.client, version);
    }
    let swapped = began.elapsed();
    let (sent, streamed) = producer.join().expect("producer thread");
    eprintln!("{swaps} swaps served within {swapped:?}, {total} tasks sent within {streamed:?}");
    let results = sent
        .iter()
        .map(|(id, i)| (*i, s.client.result(id)))
        .collect();
    SwapRun {
        s,
        total,
        results,
        swaps,
    }
}

#[test]
fn swapping_a_plugin_under_load_loses_and_fails_nothing() {
    let mut run = swapping_under_load("reload-load");
    assert_eq!(run.results.len() as i64, run.total);
    for (i, doc) in &run.results {
        assert_eq!(doc["status"], "SUCCESS", "task {i}: {doc}");
        let result = &doc["result"];
        if i % 5 == 0 {
            assert_eq!(result["value"], json!({"i": i}), "task {i}");
        } else {
            assert_eq!(result["sum"], i + 1, "task {i}");
        }
    }
    let dead = run.s.client.dead_letters();
    assert!(dead.is_empty(), "{dead:?}");
}

#[test]
fn tasks_sent_across_swaps_are_served_by_both_versions() {
    let run = swapping_under_load("reload-load-versions");
    let mut versions: HashMap<String, usize> = HashMap::new();
    for (i, doc) in &run.results {
        let version = doc["result"]["version"]
            .as_str()
            .unwrap_or_else(|| panic!("task {i} reports its version: {doc}"));
        *versions.entry(version.to_owned()).or_default() += 1;
    }
    assert!(
        versions.get("v1").is_some_and(|n| *n > 0) && versions.get("v2").is_some_and(|n| *n > 0),
        "both versions served: {versions:?}"
    );
}

/// Plugin files the worker loaded or swapped in since it started, as `/metrics` counts them.
fn reloads(addr: &str) -> usize {
    let (status, text) =
        taskhost_tests::http_get(addr, "/metrics", None).expect("/metrics answers");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("taskhost_plugin_reloads_total{result=\"success\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reload counter in:\n{text}"))
}

#[test]
fn each_change_of_a_plugin_file_under_load_is_one_swap() {
    let run = swapping_under_load("reload-load-swaps");
    // The first load of demo.wasm, then one per change: a slow chunked write or an in-place
    // overwrite is still one swap. Each change was served before the next was made.
    let addr = run.s.worker.metrics_addr();
    assert_eq!(reloads(&addr), 1 + run.swaps, "one swap per change");
}

#[test]
fn a_tasks_success_line_names_the_plugin_version_that_ran_it() {
    let v2 = test_plugin_wasm("versioned-v2");
    let mut s = watching(
        "reload-version-line",
        &test_plugin_wasm("versioned-v1"),
        &PROBED,
    );
    put(&s.demo(), &v2, Placement::Rename);
    wait_serving(&mut s.client, "v2");
    let id = s.client.send("demo.add", json!([2, 3]));
    assert_eq!(
        s.client.result(&id)["result"],
        json!({"sum": 5, "version": "v2"})
    );
    // The operator's line for the task is the behaviour under test.
    let log = s.worker.log();
    let line = log
        .lines()
        .find(|l| l.contains(&id) && l.contains("task succeeded"))
        .unwrap_or_else(|| panic!("a success line for {id}:\n{log}"));
    assert!(
        line.contains(&format!("version={}", plugin_version(&v2))),
        "{line}"
    );
}

// Refusing a broken file.

/// A file that starts like WebAssembly and is not a component.
fn corrupt(dir: &TestDir) -> PathBuf {
    dir.write("corrupt", "\0asm\x0d\0\x01\0 this is not a component")
}

/// The first third of demo.wasm.
fn truncated(dir: &TestDir) -> PathBuf {
    let good = std::fs::read(plugin_wasm("demo")).expect("read demo");
    let path = dir.path().join("truncated");
    std::fs::write(&path, &good[..good.len() / 3]).expect("write truncated file");
    path
}

/// A plugin built for taskhost:plugin@0.2.0.
fn wrong_wit(_: &TestDir) -> PathBuf {
    test_plugin_wasm("wrongwit")
}

/// A worker serving demo, once it has refused `broken` put in place of demo.wasm.
fn refusing(name: &str, broken: fn(&TestDir) -> PathBuf) -> Setup {
    let s = watching(name, &plugin_wasm("demo"), &[]);
    put(&s.demo(), &broken(&s.dir), Placement::Rename);
    s.worker
        .wait_log("plugin refused, the loaded version keeps serving");
    s
}

/// The worker's report of the refusal of demo.wasm names `reason`.
fn assert_refused_for(s: &Setup, reason: &str) {
    // The refusal's report is the behaviour under test: it is all the operator sees of it.
    let log = s.worker.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("plugin refused"))
        .unwrap_or_default();
    assert!(
        line.contains(reason) && line.contains("demo.wasm"),
        "{line}"
    );
}

#[test]
fn a_corrupt_file_is_refused_with_its_reason() {
    let s = refusing("reload-corrupt-reason", corrupt);
    assert_refused_for(&s, "not a WebAssembly component");
}

#[test]
fn a_truncated_file_is_refused_with_its_reason() {
    let s = refusing("reload-truncated-reason", truncated);
    assert_refused_for(&s, "not a WebAssembly component");
}

#[test]
fn a_plugin_built_for_another_wit_version_is_refused_with_its_reason() {
    let s = refusing("reload-wrongwit-reason", wrong_wit);
    assert_refused_for(&s, "built for taskhost:plugin@0.2.0");
}

#[test]
fn the_loaded_version_keeps_serving_when_a_corrupt_file_is_refused() {
    let mut s = refusing("reload-corrupt-serving", corrupt);
    assert_eq!(s.add_2_3()["result"], 5, "the old version still serves");
}

#[test]
fn the_loaded_version_keeps_serving_when_a_truncated_file_is_refused() {
    let mut s = refusing("reload-truncated-serving", truncated);
    assert_eq!(s.add_2_3()["result"], 5, "the old version still serves");
}

#[test]
fn the_loaded_version_keeps_serving_when_a_wrong_wit_plugin_is_refused() {
    let mut s = refusing("reload-wrongwit-serving", wrong_wit);
    assert_eq!(s.add_2_3()["result"], 5, "the old version still serves");
}

#[test]
fn the_next_good_change_of_a_refused_file_is_loaded() {
    let mut s = refusing("reload-refused-then-good", corrupt);
    put(
        &s.demo(),
        &test_plugin_wasm("versioned-v2"),
        Placement::Rename,
    );
    // demo answers 5; anything else is the new version serving.
    let answer = wait_for("the new version to serve demo.add", || {
        Some(s.add_2_3()["result"].clone()).filter(|r| *r != json!(5))
    });
    assert_eq!(answer, json!({"sum": 5, "version": "v2"}));
}

#[test]
fn a_plugin_claiming_a_task_not_granted_to_it_is_refused_with_its_reason() {
    let s = watching("reload-copycat-reason", &plugin_wasm("demo"), &[]);
    std::fs::copy(plugin_wasm("demo"), s.plugins.join("copycat.wasm")).expect("copy");
    // The refusal's report is the behaviour under test (the wait fails if it never comes).
    s.worker
        .wait_log("plugin \"copycat\" may not serve task \"demo.add\"");
}

#[test]
fn a_task_stays_with_the_plugin_already_serving_it() {
    let mut s = watching("reload-copycat-serving", &plugin_wasm("demo"), &[]);
    // A copycat that would answer differently: {"sum": 5, "version": "v2"}.
    std::fs::copy(
        test_plugin_wasm("versioned-v2"),
        s.plugins.join("copycat.wasm"),
    )
    .expect("copy");
    s.worker
        .wait_log("plugin \"copycat\" may not serve task \"demo.add\"");
    assert_eq!(s.add_2_3()["result"], 5, "demo keeps its tasks");
}

/// Waits until demo.sub.echo is served by build `version` ("v1" or "v2").
fn wait_sub_serving(client: &mut Client, version: &str) {
    wait_for(&format!("build {version} to serve demo.sub.echo"), || {
        let id = client.send("demo.sub.echo", json!(["probe"]));
        (client.result(&id)["result"]["version"] == version).then_some(())
    });
}

#[test]
fn overlapping_default_names_belong_to_the_more_specific_plugin_whatever_the_order() {
    let dir = TestDir::new("reload-overlap");
    let redis = RedisServer::start(&dir);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    // Plugin `demo` (demo.* by default) and plugin `demo.sub` (demo.sub.*) both claim
    // demo.sub.add and demo.sub.echo; `demo` loads first, by name.
    let (v1, v2) = (
        test_plugin_wasm("versioned-nested-v1"),
        test_plugin_wasm("versioned-nested-v2"),
    );
    std::fs::copy(&v1, plugins.join("demo.wasm")).expect("install demo.wasm");
    std::fs::copy(&v2, plugins.join("demo.sub.wasm")).expect("install demo.sub.wasm");
    let _worker = start(&dir, &redis, &plugins, &[], &[]);
    let mut client = Client::new(&redis);
    wait_sub_serving(&mut client, "v2");
    // Without demo.sub, demo serves its default names again.
    std::fs::remove_file(plugins.join("demo.sub.wasm")).expect("remove demo.sub.wasm");
    wait_sub_serving(&mut client, "v1");
    // Added after demo, demo.sub takes them over.
    std::fs::copy(&v2, plugins.join("demo.sub.wasm")).expect("put demo.sub.wasm back");
    wait_sub_serving(&mut client, "v2");
}

// Removing a plugin and adding it back.

/// A worker whose demo.wasm was removed; the id and document of the first demo.add that did
/// not succeed after the removal.
fn removed(name: &str) -> (Setup, String, Value) {
    let mut s = watching(name, &plugin_wasm("demo"), &[]);
    std::fs::remove_file(s.demo()).expect("remove demo");
    let (id, doc) = wait_for("demo.add to stop succeeding", || {
        let id = s.client.send("demo.add", json!([2, 3]));
        let doc = s.client.result(&id);
        (doc["status"] != "SUCCESS").then_some((id, doc))
    });
    (s, id, doc)
}

#[test]
fn a_removed_plugins_tasks_fail_as_not_registered() {
    let (_, _, doc) = removed("reload-removed");
    assert_eq!(doc["result"]["exc_type"], "NotRegistered", "{doc}");
}

#[test]
fn a_task_of_a_removed_plugin_is_dead_lettered() {
    let (mut s, id, _) = removed("reload-removed-dead");
    // The FAILURE is stored first, its dead-letter entry a moment after.
    wait_for("the task's dead-letter entry", || {
        s.client
            .dead_letters()
            .iter()
            .any(|d| d["task_id"] == id.as_str())
            .then_some(())
    });
}

#[test]
fn a_removed_plugin_added_back_serves_again() {
    let (mut s, _, _) = removed("reload-removed-back");
    put(&s.demo(), &plugin_wasm("demo"), Placement::Rename);
    let doc = wait_for("demo.add to succeed again", || {
        Some(s.add_2_3()).filter(|d| d["status"] == "SUCCESS")
    });
    assert_eq!(doc["result"], 5);
}

// Reloading the config.

/// A worker serving crucible under a config file that grants storage only, with the stubs and
/// the config file's path.
struct Configured {
    s: Setup,
    path: PathBuf,
    executor: HttpStub,
    storage: HttpStub,
}

impl Configured {
    fn new(name: &str) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let executor = HttpStub::start(|_| Reply::json(200, json!({"status": "completed"})));
        let storage = HttpStub::start(|_| Reply::json(200, json!({})));
        let path = dir.write("taskhost.toml", &config(&executor, &storage, &[&storage]));
        let plugins = dir.plugins(&["crucible"]);
        let path_arg = path.to_string_lossy().into_owned();
        let worker = start(&dir, &redis, &plugins, &["--config", &path_arg], &[]);
        let client = Client::new(&redis);
        Self {
            s: Setup {
                worker,
                client,
                redis,
                plugins,
                dir,
            },
            path,
            executor,
            storage,
        }
    }

    /// Sends an evaluation and waits for its final result document.
    fn evaluate(&mut self) -> Value {
        let id = self
            .s
            .client
            .send("tasks.evaluate_code", json!([1, "x", "python"]));
        self.s.client.result(&id)
    }

    /// Grants the executor too, and waits until an evaluation is no longer denied.
    fn grant_executor(&mut self) -> Value {
        let text = config(
            &self.executor,
            &self.storage,
            &[&self.storage, &self.executor],
        );
        std::fs::write(&self.path, text).expect("edit config");
        wait_for("an evaluation not denied", || {
            Some(self.evaluate()).filter(|d| d["result"]["exc_type"] != "CapabilityDenied")
        })
    }

    /// Writes a config with a misspelt key and waits for the worker to refuse it.
    fn bad_edit(&self) {
        std::fs::write(&self.path, "[plugins.crucible]\nallow_htttp = []\n").expect("bad edit");
        // A refused edit changes nothing a task could see: the worker's report is the signal.
        self.s
            .worker
            .wait_log("config change refused, the previous config stays");
    }
}

/// crucible's config section, granting `allow`.
fn config(executor: &HttpStub, storage: &HttpStub, allow: &[&HttpStub]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("{:?}", a.url())).collect();
    format!(
        "[plugins.crucible]\ntasks = [\"tasks.*\"]\nallow_http = [{}]\nconfig = {{ executor_service_url = {:?}, storage_service_url = {:?} }}\n",
        allow.join(", "),
        executor.url(),
        storage.url()
    )
}

#[test]
fn a_config_edit_granting_an_origin_applies_without_a_restart() {
    let mut c = Configured::new("reload-config");
    assert_eq!(c.evaluate()["result"]["exc_type"], "CapabilityDenied");
    assert_eq!(c.grant_executor()["status"], "SUCCESS");
}

#[test]
fn a_bad_config_edit_is_refused_with_its_reason() {
    let c = Configured::new("reload-config-bad-reason");
    c.bad_edit();
    // The refusal's report is the behaviour under test (the reason may span lines).
    let log = c.s.worker.log();
    let refusal = log
        .find("config change refused")
        .expect("the refusal is logged");
    assert!(
        log[refusal..].contains("allow_htttp"),
        "the reason names the bad key: {}",
        &log[refusal..]
    );
}

#[test]
fn a_refused_config_edit_keeps_the_previous_grants() {
    let mut c = Configured::new("reload-config-bad-keeps");
    c.grant_executor();
    c.bad_edit();
    assert_eq!(c.evaluate()["status"], "SUCCESS", "the old grants stay");
}

#[test]
fn a_config_edit_changing_tasks_settings_is_refused_not_ignored() {
    let mut c = Configured::new("reload-config-tasks");
    // With a grant beside it: a refused edit applies no section of it, which a task shows.
    let text = config(&c.executor, &c.storage, &[&c.storage, &c.executor]);
    let edited = format!("{text}[tasks.\"tasks.evaluate_code\"]\nmax_retries = 0\n");
    std::fs::write(&c.path, edited).expect("edit config");
    c.s.worker
        .wait_log("config change refused, the previous config stays: a change of [tasks]");
    assert_eq!(c.evaluate()["result"]["exc_type"], "CapabilityDenied");
}

#[test]
fn a_config_edit_changing_task_name_grants_is_refused() {
    let mut c = Configured::new("reload-config-task-names");
    let text = config(&c.executor, &c.storage, &[&c.storage, &c.executor]);
    std::fs::write(
        &c.path,
        text.replace("tasks = [\"tasks.*\"]", "tasks = [\"tasks.x\"]"),
    )
    .expect("edit config");
    c.s.worker
        .wait_log("config change refused, the previous config stays: a change of the task names");
    // Neither the names nor the grant beside them: the task is still served, still denied.
    assert_eq!(c.evaluate()["result"]["exc_type"], "CapabilityDenied");
}

#[test]
fn a_config_edit_changing_worker_settings_is_refused_not_ignored() {
    let mut c = Configured::new("reload-config-worker");
    let text = config(&c.executor, &c.storage, &[&c.storage, &c.executor]);
    // With a grant beside it: a refused edit applies no section of it.
    std::fs::write(&c.path, format!("[worker]\nconcurrency = 3\n{text}")).expect("edit config");
    c.s.worker
        .wait_log("config change refused, the previous config stays: a change of [worker]");
    assert_eq!(c.evaluate()["result"]["exc_type"], "CapabilityDenied");
}

// The precompile cache.

/// Workers started one after the other on one cache directory of their own.
struct CacheRig {
    client: Client,
    redis: RedisServer,
    plugins: PathBuf,
    cache: PathBuf,
    dir: TestDir,
}

impl CacheRig {
    fn new(name: &str) -> Self {
        let dir = TestDir::new(name);
        let redis = RedisServer::start(&dir);
        let client = Client::new(&redis);
        let plugins = dir.plugins(&["demo"]);
        let cache = dir.path().join("precompiled");
        Self {
            client,
            redis,
            plugins,
            cache,
            dir,
        }
    }

    /// Starts a worker on the cache, has it run demo.add, stops it with SIGTERM; returns its
    /// log. Every worker here must serve correctly and stop cleanly, whatever it loaded.
    fn run_worker(&mut self, log: &str) -> String {
        let cache = self.cache.to_string_lossy().into_owned();
        let mut worker = Process::worker_logged(
            &self.dir,
            log,
            &self.redis,
            &self.plugins,
            &["--cache-dir", &cache],
        );
        let id = self.client.send("demo.add", json!([2, 3]));
        assert_eq!(self.client.result(&id)["result"], 5, "{}", worker.log());
        assert!(worker.stop_with(libc::SIGTERM).success());
        worker.log()
    }

    /// The compiled entries in the cache.
    fn entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.cache)
            .expect("cache dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect()
    }

    /// Flips a byte in the middle of the one entry.
    fn corrupt_the_entry(&self) {
        let entries = self.entries();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let mut bytes = std::fs::read(&entries[0]).expect("read entry");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&entries[0], &bytes).expect("corrupt entry");
    }
}

// Where the code came from shows only in each load's report (`code=compiled` or
// `code=cache`) and the corruption warning: those reports are what these tests check.

#[test]
fn a_first_start_compiles_the_plugin() {
    let mut rig = CacheRig::new("reload-cache-first");
    let log = rig.run_worker("first.log");
    assert!(log.contains("code=compiled"), "{log}");
}

#[test]
fn a_restart_loads_the_plugin_from_the_cache() {
    let mut rig = CacheRig::new("reload-cache-restart");
    rig.run_worker("first.log");
    let log = rig.run_worker("second.log");
    assert!(log.contains("code=cache"), "{log}");
}

#[test]
fn the_cache_keeps_one_entry_per_plugin_across_restarts() {
    let mut rig = CacheRig::new("reload-cache-entries");
    rig.run_worker("first.log");
    rig.run_worker("second.log");
    let entries = rig.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
}

#[test]
fn a_corrupt_cache_entry_is_reported() {
    let mut rig = CacheRig::new("reload-cache-corrupt-reported");
    rig.run_worker("first.log");
    rig.corrupt_the_entry();
    let log = rig.run_worker("second.log");
    assert!(
        log.contains("precompile cache entry is corrupt; recompiling"),
        "{log}"
    );
}

#[test]
fn a_corrupt_cache_entry_is_recompiled() {
    let mut rig = CacheRig::new("reload-cache-corrupt-recompiled");
    rig.run_worker("first.log");
    rig.corrupt_the_entry();
    let log = rig.run_worker("second.log");
    assert!(log.contains("code=compiled"), "{log}");
}

#[test]
fn a_recompiled_cache_entry_is_used_on_the_next_start() {
    let mut rig = CacheRig::new("reload-cache-rebuilt");
    rig.run_worker("first.log");
    rig.corrupt_the_entry();
    rig.run_worker("second.log");
    let log = rig.run_worker("third.log");
    assert!(log.contains("code=cache"), "{log}");
}
