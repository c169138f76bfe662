//! The command line as a user meets it: `exec`, `plugins`, `dev` with `call`, and clear errors.

use serde_json::json;
use taskhost_tests::{Process, RedisServer, TestDir, plugin_wasm, wait_for};

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn exec_runs_one_task_locally() {
    let dir = TestDir::new("exec");
    let demo = path(&plugin_wasm("demo"));
    let out = Process::run(&dir, &["exec", &demo, "demo.add", "--args", "[2, 3]"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout.trim(), "5");

    let out = Process::run(
        &dir,
        &[
            "exec",
            &demo,
            "demo.echo",
            "--kwargs",
            r#"{"value": {"a": [1, null]}}"#,
        ],
    );
    assert_eq!(out.stdout.trim(), r#"{"a":[1,null]}"#, "{out:?}");

    let out = Process::run(&dir, &["exec", &demo, "demo.add", "--args", r#"[2, "x"]"#]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("TypeError") && out.stderr.contains("argument 'y'"),
        "{out:?}"
    );

    let out = Process::run(&dir, &["exec", &demo, "demo.fail", "--args", r#"["nope"]"#]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stderr.trim(), "FAILURE RuntimeError: nope");

    let out = Process::run(&dir, &["exec", &demo, "demo.retry", "--args", "[1]"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a retry request has its own exit code: {out:?}"
    );
    assert!(out.stderr.contains("--retries 1"), "{out:?}");
    let out = Process::run(
        &dir,
        &[
            "exec",
            &demo,
            "demo.retry",
            "--args",
            "[1]",
            "--retries",
            "1",
        ],
    );
    assert_eq!(out.stdout.trim(), "1", "{out:?}");

    let out = Process::run(&dir, &["exec", &demo, "demo.nothing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("does not serve task \"demo.nothing\"")
            && out.stderr.contains("demo.add"),
        "{out:?}"
    );
}

#[test]
fn plugins_lists_tasks_and_refuses_what_is_not_a_plugin() {
    let dir = TestDir::new("plugins-cmd");
    let plugins = dir.plugins(&["demo", "crucible"]);
    let out = Process::run(&dir, &["plugins", &path(&plugins)]);
    assert!(out.status.success(), "{out:?}");
    for expected in [
        "demo  version",
        "wit taskhost:plugin@0.1.0",
        "demo.add",
        "tasks.evaluate_code",
        "max_retries=3",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected:?} missing:\n{}",
            out.stdout
        );
    }
    std::fs::write(plugins.join("junk.wasm"), b"\0asm but not really").expect("write junk");
    let bytes = std::fs::read(plugin_wasm("demo")).expect("read demo");
    std::fs::write(plugins.join("truncated.wasm"), &bytes[..bytes.len() / 2])
        .expect("write truncated");
    let out = Process::run(&dir, &["plugins", &path(&plugins)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stdout
            .contains("junk.wasm  REFUSED: not a WebAssembly component"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("truncated.wasm  REFUSED"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("demo.add"),
        "good plugins still listed:\n{}",
        out.stdout
    );
}

#[test]
fn dev_starts_its_own_redis_and_call_finds_it() {
    let dir = TestDir::new("dev");
    let plugins = dir.plugins(&["demo"]);
    let mut dev = Process::spawn(
        &dir,
        "dev.log",
        Process::command(&dir, &["dev", "--plugins", &path(&plugins)]),
    );
    dev.wait_log("worker ready");
    assert!(
        dev.log().contains("call demo.add --args '[2,3]' --wait"),
        "{}",
        dev.log()
    );
    let out = Process::run(&dir, &["call", "demo.add", "--args", "[2,3]", "--wait"]);
    assert!(out.status.success(), "{out:?}\n{}", dev.log());
    assert_eq!(out.stdout.trim(), "5");
    let state = std::fs::read_to_string(dir.path().join("dev-state.json")).expect("dev state file");
    let state: serde_json::Value = serde_json::from_str(&state).expect("state is JSON");
    let url = state["broker_url"].as_str().expect("broker url").to_owned();
    let status = dev.stop_with(libc::SIGINT);
    assert!(status.success(), "{status}");
    assert!(
        !dir.path().join("dev-state.json").exists(),
        "state file removed on exit"
    );
    wait_for("the private redis-server to be gone", || {
        redis::Client::open(url.as_str())
            .ok()
            .and_then(|c| c.get_connection().err())
            .map(|_| ())
    });
    let out = Process::run(&dir, &["call", "demo.add", "--args", "[2,3]", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("no broker"), "{out:?}");
}

#[test]
fn bad_input_gives_one_clear_line_and_a_failure_exit() {
    let dir = TestDir::new("errors");
    let plugins = path(&dir.plugins(&["demo"]));
    let redis = RedisServer::start(&dir);
    let broker = redis.url(0);
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let unreachable = format!("redis://127.0.0.1:{dead_port}/0");
    let config = path(&dir.write("bad.toml", "[plugins.demo]\nallow_htp = []\n"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "worker",
                "--broker",
                "amqp://guest@localhost//",
                "--plugins",
                &plugins,
            ],
            "Redis transport",
        ),
        (
            vec![
                "worker",
                "--broker",
                "redis://:99999999/x",
                "--plugins",
                &plugins,
            ],
            "invalid Redis URL",
        ),
        (
            vec!["worker", "--broker", &broker, "--plugins", "/no/such/dir"],
            "plugin directory /no/such/dir does not exist",
        ),
        (
            vec![
                "worker",
                "--broker",
                &broker,
                "--plugins",
                &plugins,
                "--prefetch-multiplier",
                "0",
            ],
            "--prefetch-multiplier must be between 1 and 1000, got 0",
        ),
        (
            vec![
                "worker",
                "--broker",
                &broker,
                "--plugins",
                &plugins,
                "--config",
                &config,
            ],
            "allow_htp",
        ),
        (
            vec![
                "worker",
                "--broker",
                &broker,
                "--plugins",
                &plugins,
                "-c",
                "0",
            ],
            "concurrency",
        ),
        (vec!["worker", "--plugins", &plugins], "no broker"),
        (
            vec!["call", "demo.add", "--broker", &broker, "--args", "[2,"],
            "--args is not JSON",
        ),
        (
            vec!["call", "demo.add", "--broker", &broker, "--args", "{}"],
            "must be a JSON array",
        ),
        (
            vec!["call", "demo.add", "--broker", &unreachable],
            "cannot connect to Redis",
        ),
        (vec!["exec", "/no/such.wasm", "demo.add"], "does not exist"),
    ];
    for (args, expected) in cases {
        let out = Process::run(&dir, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let line = out.stderr.trim();
        assert!(
            line.starts_with("error: ") && line.contains(expected),
            "{args:?}: {line}"
        );
        assert_eq!(line.lines().count(), 1, "{args:?}: one line, got:\n{line}");
        assert!(!out.stderr.contains("panicked"), "{args:?}: {line}");
    }
    let out = Process::run(&dir, &["worker", "--concurrency", "many"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2: {out:?}");
    for command in ["worker", "dev", "call", "exec", "plugins"] {
        let out = Process::run(&dir, &[command, "--help"]);
        assert!(
            out.status.success() && out.stdout.contains("Usage: taskhost"),
            "{command} --help: {out:?}"
        );
    }
}

#[test]
fn a_worker_waits_for_an_unreachable_redis_and_stops_cleanly() {
    let dir = TestDir::new("unreachable");
    let plugins = path(&dir.plugins(&["demo"]));
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let unreachable = format!("redis://127.0.0.1:{dead_port}/0");
    let mut worker = Process::spawn(
        &dir,
        "worker.log",
        Process::command(
            &dir,
            &["worker", "--broker", &unreachable, "--plugins", &plugins],
        ),
    );
    worker.wait_log_count("Redis is not reachable (retrying in", 2);
    let status = worker.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
}

#[test]
fn dead_letters_can_be_listed_shown_requeued_and_purged() {
    let dir = TestDir::new("dead-cli");
    let redis = RedisServer::start(&dir);
    // A worker without the demo plugin: demo tasks are dead-lettered.
    let plugins = dir.plugins(&["crucible"]);
    let worker = Process::worker(&dir, &redis, &plugins, &[]);
    let mut client = taskhost_tests::Client::new(&redis);
    let id = client.send("demo.add", json!([2, 3]));
    client.push_raw("celery", b"garbage");
    wait_for("two dead letters", || {
        (client.dead_letters().len() == 2).then_some(())
    });
    let broker = redis.url(0);
    let dead = |args: &[&str]| {
        let mut all = vec!["dead"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--broker", &broker]);
        Process::run(&dir, &all)
    };
    let out = dead(&["list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("2 dead-letter entries"),
        "{}",
        out.stdout
    );
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&id))
        .expect("the demo.add entry listed")
        .to_owned();
    assert!(
        line.contains("demo.add") && line.contains("not served"),
        "{line}"
    );
    let index = line.split_whitespace().next().expect("index").to_owned();
    let out = dead(&["show", &index]);
    assert!(
        out.stdout.contains("\"task_id\"") && out.stdout.contains(&id),
        "{}",
        out.stdout
    );
    // Once a plugin serves it, the entry is replayed and runs.
    std::fs::copy(plugin_wasm("demo"), plugins.join("demo.wasm")).expect("add demo");
    worker.wait_log("plugin loaded plugin=demo");
    let out = dead(&["requeue", &index]);
    assert!(
        out.status.success() && out.stdout.contains("onto celery"),
        "{out:?}"
    );
    wait_for("the requeued task to succeed", || {
        client.state(&id).filter(|d| d["status"] == "SUCCESS")
    });
    assert_eq!(client.dead_letters().len(), 1);
    let out = dead(&["requeue", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("no dead-letter entry 7"), "{out:?}");
    let out = dead(&["purge"]);
    assert_eq!(out.status.code(), Some(1), "purge wants --yes");
    let out = dead(&["purge", "--yes"]);
    assert!(out.stdout.contains("purged 1"), "{out:?}");
    assert!(client.dead_letters().is_empty());
}
