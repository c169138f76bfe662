//! `taskhost check` as an operator runs it before traffic: it passes on the README's
//! production set-up (its Redis settings, its ACL recipe's worker user, the crucible plugin and
//! its grants), and each check fails — or warns, where the worker would run but lose something
//! — on a Redis or config made to fail it. The outcome is read from `--json` and the exit
//! status.

use serde_json::Value;
use taskhost_tests::{Output, Process, RedisServer, TestDir, free_port, readme_block};

/// A Redis set up as the README's "Redis for production" says, with its ACL users.
fn production_redis(dir: &TestDir) -> RedisServer {
    let settings = readme_block("redis-production");
    let mut args = Vec::new();
    for line in settings.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once(' ').expect("`key value` lines");
        args.push(format!("--{key}"));
        args.push(value.trim().to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis = RedisServer::start_with(dir, &args);
    redis.apply(&readme_block("acl-recipe"));
    redis
}

/// `taskhost check --json` with the worker flags `args`, as the README's worker user on
/// `redis` (broker db 0, backend db 1), with `config` as taskhost.toml and `env` set.
fn check(
    dir: &TestDir,
    redis: &RedisServer,
    config: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, Value) {
    let config = dir.write("taskhost.toml", config);
    let plugins = dir.plugins(&["demo", "crucible"]);
    let url = |db: u8| {
        format!(
            "redis://worker:worker-secret@127.0.0.1:{}/{db}",
            redis.port()
        )
    };
    let (config, plugins) = (
        config.to_string_lossy().into_owned(),
        plugins.to_string_lossy().into_owned(),
    );
    let mut all = vec![
        "check",
        "--json",
        "--config",
        &config,
        "--plugins",
        &plugins,
    ];
    all.extend(args);
    let mut command = Process::command(dir, &all);
    command
        .env("CELERY_BROKER_URL", url(0))
        .env("CELERY_RESULT_BACKEND", url(1));
    for (k, v) in env {
        command.env(k, v);
    }
    let out = Process::run_command(dir, command);
    let report: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {out:?}"));
    (out, report)
}

/// [`check`] on a Redis of its own, set up for production and then given `redis_commands`.
fn check_after(
    test: &str,
    redis_commands: &str,
    config: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, Value) {
    let dir = TestDir::new(test);
    let redis = production_redis(&dir);
    redis.apply(redis_commands);
    check(&dir, &redis, config, args, env)
}

/// The crucible grants of the README's operator section, on a loopback executor and storage.
fn crucible_grants() -> String {
    "[plugins.crucible]\ntasks = [\"tasks.*\"]\n\
     allow_http = [\"http://127.0.0.1:8001\", \"http://127.0.0.1:8002\"]\n\
     config = { executor_service_url = \"http://127.0.0.1:8001\", storage_service_url = \"http://127.0.0.1:8002\" }\n\
     \n[schedule.\"cleanup-old-evaluations\"]\ntask = \"tasks.cleanup_old_evaluations\"\nevery = \"1h\"\n"
        .to_owned()
}

/// The check named `name`: its status and detail.
fn named<'a>(report: &'a Value, name: &str) -> (&'a str, &'a str) {
    let check = report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"));
    (
        check["status"].as_str().unwrap_or_default(),
        check["detail"].as_str().unwrap_or_default(),
    )
}

#[test]
fn the_readmes_production_set_up_passes_every_check() {
    let (out, report) = check_after("check-production", "", &crucible_grants(), &[], &[]);
    let not_ok: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["status"] != "ok")
        .collect();
    assert!(not_ok.is_empty(), "{not_ok:#?}");
    assert_eq!(report["passed"], true);
    assert!(out.status.success(), "{out:?}");
    for name in [
        "config",
        "broker",
        "backend",
        "broker acl",
        "backend acl",
        "broker eviction",
        "broker persistence",
        "broker clock",
        "plugins",
        "schedule cleanup-old-evaluations",
    ] {
        assert_eq!(named(&report, name).0, "ok", "{name}: {report:#}");
    }
}

#[test]
fn an_evicting_policy_is_a_warning_that_names_what_would_be_deleted() {
    let (out, report) = check_after(
        "check-eviction",
        "CONFIG SET maxmemory-policy allkeys-lru",
        &crucible_grants(),
        &[],
        &[],
    );
    let (status, detail) = named(&report, "broker eviction");
    assert_eq!(status, "warn", "{detail}");
    assert!(
        detail.contains("allkeys-lru") && detail.contains("noeviction"),
        "{detail}"
    );
    assert!(out.status.success(), "a warning is not a failure: {out:?}");
}

#[test]
fn persistence_off_is_a_warning() {
    let (_, report) = check_after(
        "check-aof",
        "CONFIG SET appendonly no",
        &crucible_grants(),
        &[],
        &[],
    );
    let (status, detail) = named(&report, "broker persistence");
    assert_eq!(status, "warn", "{detail}");
}

#[test]
fn an_acl_user_without_a_command_the_worker_runs_fails_naming_it() {
    // The recipe's worker, less the scripts every settle runs.
    let (out, report) = check_after(
        "check-acl",
        "ACL SETUSER worker -@scripting",
        &crucible_grants(),
        &[],
        &[],
    );
    let (status, detail) = named(&report, "broker acl");
    assert_eq!(status, "fail", "{detail}");
    assert!(
        detail.contains("EVALSHA") && detail.contains("worker"),
        "{detail}"
    );
    assert_eq!(report["passed"], false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn an_acl_user_without_a_queue_the_worker_consumes_fails_naming_the_key() {
    // The recipe grants `celery*`: a queue named otherwise is not the worker's to read.
    let queue = ["-Q", "evaluations"];
    let (out, report) = check_after("check-acl-queue", "", &crucible_grants(), &queue, &[]);
    let (status, detail) = named(&report, "broker acl");
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("evaluations"), "{detail}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_clock_a_minute_off_fails() {
    let skewed = [("TASKHOST_TEST_CLOCK_SKEW_MS", "60000")];
    let (out, report) = check_after("check-clock", "", &crucible_grants(), &[], &skewed);
    let (status, detail) = named(&report, "broker clock");
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("60.0 s ahead"), "{detail}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_granted_name_that_resolves_to_a_private_address_fails_unless_allowed() {
    let dir = TestDir::new("check-private");
    let redis = production_redis(&dir);
    let grants =
        "[plugins.crucible]\ntasks = [\"tasks.*\"]\nallow_http = [\"http://localhost:8001\"]\n";
    let (out, report) = check(&dir, &redis, grants, &[], &[]);
    let (status, detail) = named(&report, "grant crucible → http://localhost");
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("allow_private_network"), "{detail}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let allowed = format!("{grants}allow_private_network = true\n");
    let (_, report) = check(&dir, &redis, &allowed, &[], &[]);
    assert_eq!(named(&report, "grant crucible → http://localhost").0, "ok");
}

#[test]
fn a_bad_schedule_fails_the_config_naming_the_entry() {
    let config = format!(
        "{}\n[schedule.\"broken\"]\ntask = \"tasks.health_check\"\ncron = \"61 * * * *\"\n",
        crucible_grants()
    );
    let (out, report) = check_after("check-schedule", "", &config, &[], &[]);
    let (status, detail) = named(&report, "config");
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("broken"), "{detail}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_broker_that_does_not_answer_fails() {
    let dir = TestDir::new("check-unreachable");
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let config = dir.write("taskhost.toml", "");
    let plugins = dir.plugins(&["demo"]);
    let (config, plugins) = (
        config.to_string_lossy().into_owned(),
        plugins.to_string_lossy().into_owned(),
    );
    let mut command = Process::command(
        &dir,
        &[
            "check",
            "--json",
            "--config",
            &config,
            "--plugins",
            &plugins,
        ],
    );
    command.env("CELERY_BROKER_URL", &url);
    let out = Process::run_command(&dir, command);
    let report: Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(named(&report, "broker").0, "fail", "{report:#}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn a_plugin_the_worker_would_refuse_fails() {
    let dir = TestDir::new("check-refused");
    let redis = production_redis(&dir);
    let plugins = dir.plugins(&["demo", "crucible"]);
    std::fs::write(plugins.join("broken.wasm"), b"not a component").expect("write");
    let (out, report) = check(&dir, &redis, &crucible_grants(), &[], &[]);
    let refused = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("broken.wasm"))
        })
        .unwrap_or_else(|| panic!("no check of broken.wasm: {report:#}"));
    assert_eq!(refused["status"], "fail");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn the_text_report_is_one_line_per_check_and_a_verdict() {
    let dir = TestDir::new("check-text");
    let redis = production_redis(&dir);
    let config = dir.write("taskhost.toml", &crucible_grants());
    let plugins = dir.plugins(&["demo", "crucible"]);
    let url = format!("redis://worker:worker-secret@127.0.0.1:{}/0", redis.port());
    let (config, plugins) = (
        config.to_string_lossy().into_owned(),
        plugins.to_string_lossy().into_owned(),
    );
    let mut command =
        Process::command(&dir, &["check", "--config", &config, "--plugins", &plugins]);
    command.env("CELERY_BROKER_URL", &url);
    let out = Process::run_command(&dir, command);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("ok    broker acl")),
        "{}",
        out.stdout
    );
    assert_eq!(lines.last(), Some(&"all checks passed"), "{}", out.stdout);
}
