//! The sandbox against a hostile plugin: every misbehaviour fails its own task with a precise
//! error, what a well-behaved plugin may do still works, the worker's memory returns to its
//! baseline, and the normal tasks flowing beside the hostile ones all come back correct.
//!
//! Each test starts its own worker (demo, crucible and the `hostile` test plugin, `-c 2`) with
//! two stand-in HTTP services: one the hostile plugin is granted, one it is not.

use serde_json::{Value, json};
use taskhost_tests::{
    Beside, Client, HttpStub, Process, RedisServer, Reply, TestDir, python, rss_kib,
    test_plugin_wasm,
};

/// Memory the worker may keep above its baseline after a hostile task, KiB. The hostile tasks
/// reach for 128 MiB of guest memory and 20 MiB results; what stays must be far less.
const RSS_TOLERANCE_KIB: u64 = 12 * 1024;

/// Dropped in field order: the worker first, its directory last.
struct Setup {
    worker: Process,
    client: Client,
    redis: RedisServer,
    /// The origin the hostile plugin is granted.
    granted: HttpStub,
    /// An origin it is not granted.
    forbidden: HttpStub,
    dir: TestDir,
}

/// A worker serving demo, crucible and hostile with `-c 2`.
fn setup(name: &str) -> Setup {
    setup_with(name, "", &["-c", "2"])
}

/// A worker with `extra_config` in hostile's section of `taskhost.toml` and `worker_args`.
fn setup_with(name: &str, extra_config: &str, worker_args: &[&str]) -> Setup {
    setup_on(name, extra_config, worker_args, &[])
}

/// [`setup_with`], the worker run with the environment variables `env` besides.
fn setup_on(name: &str, extra_config: &str, worker_args: &[&str], env: &[(&str, &str)]) -> Setup {
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
             [plugins.crucible]\ntasks = [\"tasks.*\"]\nconfig = {{ executor_service_url = \"crucible's secret\" }}\n",
            granted.url()
        ),
    );
    let config = config.to_string_lossy().into_owned();
    let cache = shared_precompile_cache();
    let mut args = vec!["--config", config.as_str(), "--cache-dir", cache.as_str()];
    args.extend_from_slice(worker_args);
    let mut command = Process::worker_command(&dir, &redis, &plugins, &args);
    command.envs(env.iter().copied());
    let worker = Process::spawn(&dir, "worker.log", command);
    worker.wait_log("worker ready");
    let client = Client::new(&redis);
    Setup {
        worker,
        client,
        redis,
        granted,
        forbidden,
        dir,
    }
}

/// A precompile cache every worker of this file shares (across runs too: entries are keyed by
/// the plugin's digest and the engine), so each test's worker loads the three plugins without
/// compiling them again. What the cache does is tested in `reload.rs`.
fn shared_precompile_cache() -> String {
    taskhost_tests::target_dir()
        .join("test-runs")
        .join("sandbox-precompiled")
        .to_string_lossy()
        .into_owned()
}

impl Setup {
    /// Sends `attempt` and waits for its final result document.
    fn run(&mut self, attempt: Attempt) -> (String, Value) {
        let args = (attempt.args)(self);
        let id = self
            .client
            .send_with_time_limit(attempt.task, args, attempt.limits);
        let doc = self.client.result(&id);
        (id, doc)
    }

    /// Runs `attempt`, checks it succeeded, and returns its result.
    fn succeeds(&mut self, attempt: Attempt) -> Value {
        let (_, doc) = self.run(attempt);
        assert_eq!(doc["status"], "SUCCESS", "{}: {doc}", attempt.task);
        doc["result"].clone()
    }

    /// The paths the granted service was asked for.
    fn granted_paths(&self) -> Vec<String> {
        self.granted
            .requests()
            .into_iter()
            .map(|r| r.path)
            .collect()
    }

    /// The worker's log lines that mention task `id`.
    fn log_lines_of(&self, id: &str) -> Vec<String> {
        self.worker
            .log()
            .lines()
            .filter(|l| l.contains(id))
            .map(str::to_owned)
            .collect()
    }
}

/// A task the hostile plugin is asked to run: its name, its arguments (which may name the
/// test's services) and its time limits (soft, hard) in seconds.
#[derive(Clone, Copy)]
struct Attempt {
    task: &'static str,
    args: fn(&Setup) -> Value,
    limits: (Option<f64>, Option<f64>),
}

const NO_LIMITS: (Option<f64>, Option<f64>) = (None, None);

const SPIN: Attempt = Attempt {
    task: "hostile.spin",
    args: |_| json!([]),
    limits: (None, Some(1.0)),
};
const MEMORY_BOMB: Attempt = Attempt {
    task: "hostile.memory_bomb",
    args: |_| json!([512]),
    limits: NO_LIMITS,
};
const ENDLESS_RECURSION: Attempt = Attempt {
    task: "hostile.recurse",
    args: |_| json!([100_000_000u64]),
    limits: NO_LIMITS,
};
/// 20 MiB: fits in guest memory, over the plugin's result limit.
const BIG_RESULT: Attempt = Attempt {
    task: "hostile.big_result",
    args: |_| json!([20]),
    limits: NO_LIMITS,
};
/// 200 MiB: more than the guest's memory can hold.
const HUGE_RESULT: Attempt = Attempt {
    task: "hostile.big_result",
    args: |_| json!([200]),
    limits: NO_LIMITS,
};
const PANIC: Attempt = Attempt {
    task: "hostile.panic",
    args: |_| json!(["boom from a plugin"]),
    limits: NO_LIMITS,
};
const READ_HOST_FILE: Attempt = Attempt {
    task: "hostile.read_file",
    args: |_| json!(["/etc/passwd"]),
    limits: NO_LIMITS,
};
const READ_ENVIRONMENT: Attempt = Attempt {
    task: "hostile.read_env",
    args: |_| json!([]),
    limits: NO_LIMITS,
};
/// A TCP connection to the test's Redis.
const OPEN_SOCKET: Attempt = Attempt {
    task: "hostile.connect",
    args: |s| json!([format!("127.0.0.1:{}", s.redis.port())]),
    limits: NO_LIMITS,
};
const GET_UNGRANTED: Attempt = Attempt {
    task: "hostile.http_get",
    args: |s| json!([s.forbidden.url(), false]),
    limits: NO_LIMITS,
};
/// A granted URL answering with a redirect to the ungranted host, followed by the plugin.
const FOLLOW_REDIRECT_TO_UNGRANTED: Attempt = Attempt {
    task: "hostile.http_get",
    args: |s| json!([format!("{}/redirect", s.granted.url()), true]),
    limits: NO_LIMITS,
};
/// A granted URL answering with 17 MiB, over the 16 MiB response cap.
const GET_OVERSIZED_ANSWER: Attempt = Attempt {
    task: "hostile.http_get",
    args: |s| json!([format!("{}/huge", s.granted.url()), false]),
    limits: NO_LIMITS,
};
const WORK_UNTIL_SOFT_LIMIT: Attempt = Attempt {
    task: "hostile.until_soft_limit",
    args: |_| json!([]),
    limits: (Some(0.3), Some(10.0)),
};
const GET_GRANTED: Attempt = Attempt {
    task: "hostile.http_get",
    args: |s| json!([format!("{}/ok", s.granted.url()), false]),
    limits: NO_LIMITS,
};
const READ_OWN_CONFIG: Attempt = Attempt {
    task: "hostile.read_config",
    args: |_| json!(["own"]),
    limits: NO_LIMITS,
};
/// A key only crucible's config holds.
const READ_OTHER_PLUGINS_CONFIG: Attempt = Attempt {
    task: "hostile.read_config",
    args: |_| json!(["executor_service_url"]),
    limits: NO_LIMITS,
};
/// 20 000 lines on stdout and on stderr.
const FLOOD_OUTPUT: Attempt = Attempt {
    task: "hostile.flood",
    args: |_| json!([20_000]),
    limits: NO_LIMITS,
};

/// A failure whose message and traceback are 20 MiB each.
const HUGE_ERROR: Attempt = Attempt {
    task: "hostile.huge_error",
    args: |_| json!([20]),
    limits: NO_LIMITS,
};
/// 100,000 HTTP fields resources held at once.
const RESOURCE_FLOOD: Attempt = Attempt {
    task: "hostile.resource_flood",
    args: |_| json!([100_000]),
    limits: NO_LIMITS,
};
/// 1 KiB header values appended to one fields resource until the host refuses.
const HEADER_FLOOD: Attempt = Attempt {
    task: "hostile.header_flood",
    args: |_| json!([]),
    limits: NO_LIMITS,
};
/// 50 GETs at once to the granted origin.
const HTTP_SWARM: Attempt = Attempt {
    task: "hostile.http_swarm",
    args: |s| json!([format!("{}/ok", s.granted.url()), 50]),
    limits: NO_LIMITS,
};

/// Every hostile attempt, in the order the whole-worker tests run them.
const HOSTILE: [Attempt; 16] = [
    SPIN,
    MEMORY_BOMB,
    ENDLESS_RECURSION,
    BIG_RESULT,
    HUGE_RESULT,
    PANIC,
    READ_HOST_FILE,
    READ_ENVIRONMENT,
    OPEN_SOCKET,
    GET_UNGRANTED,
    FOLLOW_REDIRECT_TO_UNGRANTED,
    GET_OVERSIZED_ANSWER,
    HUGE_ERROR,
    RESOURCE_FLOOD,
    HEADER_FLOOD,
    HTTP_SWARM,
];

/// What a well-behaved plugin under the same limits does, run after the hostile attempts.
const WELL_BEHAVED: [Attempt; 5] = [
    WORK_UNTIL_SOFT_LIMIT,
    GET_GRANTED,
    READ_OWN_CONFIG,
    READ_OTHER_PLUGINS_CONFIG,
    FLOOD_OUTPUT,
];

/// One test per hostile attempt: its task ends in FAILURE with exception `exc_type`, whose
/// message contains `message`.
macro_rules! fails_with {
    ($($(#[$doc:meta])* $test:ident: $attempt:expr => $exc_type:literal, $message:literal;)*) => {$(
        $(#[$doc])*
        #[test]
        fn $test() {
            let mut s = setup(stringify!($test));
            let (_, doc) = s.run($attempt);
            assert_eq!(doc["status"], "FAILURE", "{doc}");
            assert_eq!(doc["result"]["exc_type"], $exc_type, "{doc}");
            let text = doc["result"]["exc_message"][0]
                .as_str()
                .expect("the failure has a message");
            assert!(text.contains($message), "{text}");
        }
    )*};
}

fails_with! {
    a_task_spinning_forever_fails_at_its_hard_time_limit:
        SPIN => "TimeLimitExceeded", "hard time limit (1.0 s)";
    a_task_allocating_past_its_memory_limit_fails_with_memory_limit_exceeded:
        MEMORY_BOMB => "MemoryLimitExceeded", "128 MiB";
    a_task_recursing_without_end_fails_with_stack_overflow:
        ENDLESS_RECURSION => "StackOverflow", "stack";
    a_result_over_the_plugins_result_limit_fails_with_result_too_large:
        BIG_RESULT => "ResultTooLarge", "over this plugin's limit";
    a_result_too_big_for_guest_memory_fails_with_memory_limit_exceeded:
        HUGE_RESULT => "MemoryLimitExceeded", "128 MiB";
    a_panicking_task_fails_as_a_plugin_trap_with_its_message:
        PANIC => "PluginTrap", "boom from a plugin";
    reading_a_host_file_is_denied:
        READ_HOST_FILE => "CapabilityDenied", "open /etc/passwd";
    a_plugin_sees_no_environment_variables:
        READ_ENVIRONMENT => "CapabilityDenied", "no variables are visible";
    opening_a_socket_is_denied:
        OPEN_SOCKET => "CapabilityDenied", "connect 127.0.0.1";
    an_http_request_to_an_ungranted_origin_is_denied:
        GET_UNGRANTED => "CapabilityDenied", "HTTP request denied";
    a_redirect_to_an_ungranted_origin_is_denied:
        FOLLOW_REDIRECT_TO_UNGRANTED => "CapabilityDenied", "/stolen: HTTP request denied";
    /// The guest sees its body stream fail (how it words that varies).
    an_http_answer_over_the_size_cap_fails_the_task:
        GET_OVERSIZED_ANSWER => "ConnectionError", "/huge";
    /// Cut to 64 KiB before anything copies it (results, logs, events, dead letters).
    a_huge_error_message_is_cut_to_its_bound:
        HUGE_ERROR => "RuntimeError", "(20971520 bytes)";
    /// 1,000 resources per task, not wasmtime's 1,000,000.
    a_task_holding_too_many_resources_fails_as_a_plugin_trap:
        RESOURCE_FLOOD => "PluginTrap", "resource table";
    /// 16 KiB of header fields per fields resource, not wasmtime's 128 KiB.
    a_task_flooding_header_fields_fails_as_a_plugin_trap:
        HEADER_FLOOD => "PluginTrap", "total size of fields exceeds limit";
}

#[test]
fn a_huge_traceback_is_cut_to_its_bound() {
    let mut s = setup("sandbox-huge-traceback");
    let (_, doc) = s.run(HUGE_ERROR);
    let traceback = doc["traceback"].as_str().expect("a traceback");
    assert!(
        traceback.len() <= 256 * 1024 + 32,
        "{} bytes",
        traceback.len()
    );
    assert!(traceback.ends_with("(20971520 bytes)"));
}

#[test]
fn a_task_has_at_most_eight_http_requests_in_flight() {
    let mut s = setup("sandbox-http-swarm");
    let result = s.succeeds(HTTP_SWARM);
    let answered = result["answered"].as_u64().expect("a count");
    assert!((1..=8).contains(&answered), "{result}");
    let errors = result["errors"].as_array().expect("errors");
    assert_eq!(errors.len() as u64, 50 - answered, "{result}");
    assert!(
        errors.iter().all(|e| e
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("connection limit")
                || e.contains("ConnectionLimitReached"))),
        "{result}"
    );
    assert!(
        s.granted.requests().len() <= 8 + 1,
        "at most 8 reached the service"
    );
}

#[test]
fn a_denied_http_request_never_reaches_the_ungranted_origin() {
    let mut s = setup("sandbox-denied-unsent");
    s.run(GET_UNGRANTED);
    assert!(
        s.forbidden.requests().is_empty(),
        "nothing reached the forbidden host"
    );
}

#[test]
fn a_redirect_to_an_ungranted_origin_reaches_only_the_granted_one() {
    let mut s = setup("sandbox-redirect-unsent");
    s.run(FOLLOW_REDIRECT_TO_UNGRANTED);
    assert_eq!(s.granted_paths(), ["/redirect"], "the redirect was allowed");
    assert!(
        s.forbidden.requests().is_empty(),
        "nothing reached the forbidden host"
    );
}

#[test]
fn the_size_cap_cuts_the_answer_not_the_request() {
    let mut s = setup("sandbox-huge-requested");
    s.run(GET_OVERSIZED_ANSWER);
    assert_eq!(s.granted_paths(), ["/huge"], "the huge answer was allowed");
}

#[test]
fn a_denied_http_request_is_reported_to_the_operator() {
    let mut s = setup("sandbox-denied-logged");
    let (id, _) = s.run(GET_UNGRANTED);
    // The operator's warning is the behaviour under test; it is logged before the task ends.
    let lines = s.log_lines_of(&id);
    assert!(
        lines.iter().any(|l| l.contains("denied HTTP request")),
        "{lines:#?}"
    );
}

#[test]
fn an_http_answer_cut_off_at_the_size_cap_is_reported_to_the_operator() {
    let mut s = setup("sandbox-huge-logged");
    s.run(GET_OVERSIZED_ANSWER);
    // The operator's warning is the behaviour under test; it is logged before the task ends.
    assert!(
        s.worker
            .log()
            .contains("HTTP response body over the 16777216 byte limit cut off")
    );
}

#[test]
fn a_task_stopping_at_its_soft_time_limit_succeeds() {
    let mut s = setup("sandbox-soft-limit");
    assert_eq!(
        s.succeeds(WORK_UNTIL_SOFT_LIMIT)["stopped"],
        "soft time limit"
    );
}

#[test]
fn an_http_request_to_a_granted_origin_succeeds() {
    let mut s = setup("sandbox-granted-http");
    assert_eq!(s.succeeds(GET_GRANTED)["status"], 200);
    assert_eq!(s.granted_paths(), ["/ok"]);
}

#[test]
fn a_plugin_reads_its_own_config() {
    let mut s = setup("sandbox-own-config");
    assert_eq!(s.succeeds(READ_OWN_CONFIG), "mine");
}

#[test]
fn a_plugin_cannot_read_another_plugins_config() {
    let mut s = setup("sandbox-other-config");
    assert_eq!(
        s.succeeds(READ_OTHER_PLUGINS_CONFIG),
        Value::Null,
        "a plugin cannot read another plugin's config"
    );
}

#[test]
fn a_task_flooding_its_output_still_succeeds() {
    let mut s = setup("sandbox-flood-succeeds");
    assert_eq!(s.succeeds(FLOOD_OUTPUT), 20_000);
}

#[test]
fn a_flooding_task_logs_no_more_lines_than_its_budget() {
    let mut s = setup("sandbox-flood-budget");
    s.succeeds(FLOOD_OUTPUT);
    // The log budget is the behaviour under test: the plugin's lines reach the worker's log
    // (before the task ends), up to 200 per task.
    let logged = s.worker.log().matches("flood line").count();
    assert!(logged > 0, "the plugin's output is logged");
    assert!(
        logged <= 200,
        "at most the budget of lines is logged: {logged}"
    );
}

#[test]
fn plugin_output_over_its_budget_is_reported_as_dropped() {
    let mut s = setup("sandbox-flood-reported");
    let (id, _) = s.run(FLOOD_OUTPUT);
    // The operator's summary is the behaviour under test; it is logged before the task ends.
    let lines = s.log_lines_of(&id);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("plugin output over its budget was dropped")),
        "flood summary logged: {lines:#?}"
    );
}

/// What a worker went through in [`hostile_tasks_beside_traffic`].
struct HostileRun {
    /// The worker's RSS after 20 normal tasks, before anything hostile, KiB.
    baseline: u64,
    /// Each attempt and the worker's RSS right after its result, KiB.
    rss_after: Vec<(Attempt, u64)>,
    /// The RSS once everything, the traffic included, has its result, KiB.
    final_rss: u64,
    /// Each demo.add sent beside the attempts: its expected sum and its final document.
    traffic: Vec<(i64, Value)>,
}

/// Runs every hostile attempt, then the well-behaved ones, one after the other, while a steady
/// trickle of demo.add tasks flows beside them; measures the worker's memory throughout.
fn hostile_tasks_beside_traffic(name: &str) -> HostileRun {
    let mut s = setup(name);
    // Baseline: the worker after it has run tasks, before anything hostile.
    for i in 0..20 {
        let id = s.client.send("demo.add", json!([i, 1]));
        assert_eq!(s.client.result(&id)["result"], i + 1);
    }
    let baseline = rss_kib(s.worker.pid());
    let traffic = Beside::start(&s.redis);
    let mut rss_after = Vec::new();
    for attempt in HOSTILE.into_iter().chain(WELL_BEHAVED) {
        s.run(attempt);
        rss_after.push((attempt, rss_kib(s.worker.pid())));
    }
    let traffic = traffic.finish(&mut s.client);
    let final_rss = rss_kib(s.worker.pid());
    HostileRun {
        baseline,
        rss_after,
        final_rss,
        traffic,
    }
}

#[test]
fn the_workers_memory_stays_near_its_baseline_through_hostile_tasks() {
    let run = hostile_tasks_beside_traffic("sandbox-rss");
    let baseline = run.baseline;
    for (attempt, rss) in &run.rss_after {
        assert!(
            *rss <= baseline + RSS_TOLERANCE_KIB,
            "after {}: worker RSS {rss} KiB, baseline {baseline} KiB",
            attempt.task
        );
    }
    let rss = run.final_rss;
    assert!(
        rss <= baseline + RSS_TOLERANCE_KIB,
        "final RSS {rss} KiB, baseline {baseline} KiB"
    );
    let highest = run.rss_after.iter().map(|(_, r)| *r).max().unwrap_or(0);
    eprintln!(
        "worker RSS: baseline {baseline} KiB, highest after a hostile task {highest} KiB, final {rss} KiB"
    );
}

#[test]
fn normal_tasks_beside_hostile_ones_all_come_back_correct() {
    let run = hostile_tasks_beside_traffic("sandbox-traffic");
    assert!(
        run.traffic.len() > 50,
        "traffic flowed during the hostile tasks: {}",
        run.traffic.len()
    );
    for (expected, doc) in &run.traffic {
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        assert_eq!(doc["result"], *expected, "{doc}");
    }
}

#[test]
fn a_spinning_plugin_does_not_stall_the_other_slot() {
    short_tasks_beside_a_spinner(setup("sandbox-fairness"));
}

#[test]
fn a_spinning_plugin_does_not_stall_a_worker_with_one_io_thread() {
    let env = [("TASKHOST_IO_THREADS", "1")];
    short_tasks_beside_a_spinner(setup_on("sandbox-fairness-one-io", "", &[], &env));
}

/// 100 `demo.add` on `-c 2` while `hostile.spin` computes in the other slot until its hard
/// time limit: all of them come back before the spinner ends.
fn short_tasks_beside_a_spinner(mut s: Setup) {
    let client = &mut s.client;
    let spinner = client.send_with_time_limit("hostile.spin", json!([]), (None, Some(5.0)));
    let mut latencies = Vec::new();
    for i in 0..100 {
        let sent = std::time::Instant::now();
        let id = client.send("demo.add", json!([i, 1]));
        assert_eq!(client.result(&id)["result"], i + 1);
        latencies.push(sent.elapsed());
    }
    // All of them ran while the spinner held the other slot: it has not finished yet...
    assert!(
        client.state(&spinner).is_none(),
        "the spinner was still running"
    );
    latencies.sort();
    eprintln!(
        "demo.add beside a spinning slot (-c 2), 100 tasks: p50 {:?}, max {:?}",
        latencies[50], latencies[99]
    );
    // ...and it was spinning, not waiting: it ends at its hard time limit.
    let doc = client.result(&spinner);
    assert_eq!(doc["result"]["exc_type"], "TimeLimitExceeded");
}

/// Three 300 ms `hostile.hold` tasks under `max_instances = 1`, then a demo.add, on `-c 4`.
fn holds_under_max_instances_one(name: &str) -> (Setup, Vec<String>, String) {
    let mut s = setup_with(name, "max_instances = 1\n", &["-c", "4"]);
    let holds = (0..3)
        .map(|_| s.client.send("hostile.hold", json!([300])))
        .collect();
    let add = s.client.send("demo.add", json!([1, 1]));
    (s, holds, add)
}

#[test]
fn a_plugin_runs_no_more_instances_than_granted() {
    let (mut s, holds, _) = holds_under_max_instances_one("sandbox-instances");
    let mut spans: Vec<(u64, u64)> = holds
        .iter()
        .map(|id| {
            let r = s.client.result(id)["result"].clone();
            (
                r["start"].as_u64().expect("hold reports its start"),
                r["end"].as_u64().expect("hold reports its end"),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "instances overlapped: {spans:?}");
    }
}

#[test]
fn a_plugin_at_its_instance_limit_does_not_hold_up_other_plugins() {
    let (mut s, holds, add) = holds_under_max_instances_one("sandbox-instances-others");
    assert_eq!(
        s.client.result(&add)["result"],
        2,
        "other plugins are not held up"
    );
    // The holds run one at a time, 300 ms each: the last cannot have finished yet.
    assert!(
        holds.iter().any(|id| s.client.state(id).is_none()),
        "demo.add finished while hostile.hold tasks still waited for their instance"
    );
}

// --- instance reuse --------------------------------------------------------------------------

impl Setup {
    /// Runs `hostile.remember(value)`, one task at a time, and returns what it found kept.
    fn remember(&mut self, value: i64) -> Value {
        self.client.success("hostile.remember", json!([value]))
    }
}

#[test]
fn by_default_a_task_never_sees_what_an_earlier_one_left_in_memory() {
    let mut s = setup_with("sandbox-fresh", "", &["-c", "1"]);
    let found: Vec<Value> = (1..=3).map(|v| s.remember(v)).collect();
    assert_eq!(found, [Value::Null, Value::Null, Value::Null]);
}

#[test]
fn a_reused_instance_serves_at_most_reuse_instances_tasks() {
    let mut s = setup_with(
        "sandbox-reuse",
        "reuse_instances = 3
",
        &["-c", "1"],
    );
    let found: Vec<Value> = (1..=7).map(|v| s.remember(v)).collect();
    // Tasks 1-3 in one instance, 4-6 in the next, 7 in a third.
    assert_eq!(
        found,
        [
            Value::Null,
            json!(1),
            json!(2),
            Value::Null,
            json!(4),
            json!(5),
            Value::Null
        ]
    );
}

#[test]
fn an_instance_that_trapped_is_not_reused() {
    let mut s = setup_with(
        "sandbox-reuse-trap",
        "reuse_instances = 100
",
        &["-c", "1"],
    );
    assert_eq!(s.remember(1), Value::Null);
    assert_eq!(s.remember(2), json!(1), "reused before the trap");
    let id = s.client.send("hostile.panic", json!(["boom"]));
    assert_eq!(s.client.result(&id)["result"]["exc_type"], "PluginTrap");
    assert_eq!(
        s.remember(3),
        Value::Null,
        "a fresh instance after the trap"
    );
}

#[test]
fn an_instance_interrupted_by_its_time_limit_is_not_reused() {
    let mut s = setup_with(
        "sandbox-reuse-limit",
        "reuse_instances = 100
",
        &["-c", "1"],
    );
    assert_eq!(s.remember(1), Value::Null);
    let (_, doc) = s.run(SPIN);
    assert_eq!(doc["result"]["exc_type"], "TimeLimitExceeded", "{doc}");
    assert_eq!(
        s.remember(2),
        Value::Null,
        "a fresh instance after the interruption"
    );
}

/// Runs, in Python Celery, `AsyncResult.get()` on the task `raised(...)` sends (`call`), and
/// asserts `check` about the exception `e` it raised.
fn python_sees(name: &str, call: &str, check: &str) {
    let s = setup(name);
    let script = s.dir.write(
        "errors.py",
        &format!(
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
    raise SystemExit(f"{{name}} did not fail")

e = {call}
assert {check}, repr(e)
print("python OK")
"#
        ),
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

#[test]
fn python_sees_a_hard_time_limit_as_celerys_time_limit_exceeded() {
    python_sees(
        "sandbox-python-time-limit",
        r#"raised("hostile.spin", time_limit=1)"#,
        "isinstance(e, celery.exceptions.TimeLimitExceeded)",
    );
}

#[test]
fn python_sees_memory_limit_exceeded_with_its_message() {
    python_sees(
        "sandbox-python-memory",
        r#"raised("hostile.memory_bomb", (512,))"#,
        r#"type(e).__name__ == "MemoryLimitExceeded" and "128 MiB" in str(e)"#,
    );
}

#[test]
fn python_sees_a_plugin_trap_with_its_message() {
    python_sees(
        "sandbox-python-trap",
        r#"raised("hostile.panic", ("seen from python",))"#,
        r#"type(e).__name__ == "PluginTrap" and "seen from python" in str(e)"#,
    );
}

#[test]
fn python_sees_capability_denied() {
    python_sees(
        "sandbox-python-denied",
        r#"raised("hostile.read_file", ("/etc/passwd",))"#,
        r#"type(e).__name__ == "CapabilityDenied""#,
    );
}
