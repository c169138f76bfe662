//! Periodic tasks: `[schedule]` entries sent by every worker's scheduler, each tick once across
//! the fleet with no leader, whichever workers die and come back; `taskhost schedule list`.
//! Which ticks ran, and how often, is read from Redis.

use std::time::Duration;
use taskhost_tests::{Client, Process, RedisServer, ResultFeed, TestDir, wait_for_within};

/// One entry, every second: demo.echo("tick").
const EVERY_SECOND: &str =
    "[schedule.pulse]\ntask = \"demo.echo\"\nargs = [\"tick\"]\nevery = \"1s\"\n";

/// The task id of entry `name`'s tick at `tick_ms`, as every scheduler derives it.
fn tick_id(name: &str, tick_ms: i64) -> String {
    let key = format!("taskhost-schedule/{name}/{tick_ms}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string()
}

/// The last tick the fleet sent for `name`, ms since the epoch.
fn last_tick(redis: &RedisServer, name: &str) -> Option<i64> {
    let mut conn = redis.conn(0);
    redis::cmd("HGET")
        .arg("taskhost:schedule:last")
        .arg(name)
        .query(&mut conn)
        .ok()
        .flatten()
}

/// Waits until the fleet has sent `name`'s tick at or after `at_ms`.
fn wait_tick(redis: &RedisServer, name: &str, at_ms: i64) -> i64 {
    wait_for_within(
        &format!("schedule {name} to reach tick {at_ms}"),
        Duration::from_secs(20),
        || last_tick(redis, name).filter(|t| *t >= at_ms),
    )
}

#[test]
fn a_one_second_schedule_sends_each_tick_once_while_workers_are_killed_and_restarted() {
    let dir = TestDir::new("schedule-fleet");
    let redis = RedisServer::start(&dir);
    let config = dir.write("taskhost.toml", EVERY_SECOND);
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let feed = ResultFeed::start(&redis);
    let start = |node: &str| {
        let flags = ["-n", node, "--config", &config, "--heartbeat-lapse", "2"];
        Process::worker(&dir, &redis, &plugins, &flags)
    };
    let mut workers = vec![start("w1@test"), start("w2@test"), start("w3@test")];
    let first = wait_tick(&redis, "pulse", 0);
    // Kill two of the three in turn, each while ticks go on, and bring each back.
    for (victim, node) in [(0, "w4@test"), (1, "w5@test")] {
        let before = wait_tick(&redis, "pulse", first + 4_000 + victim as i64 * 8_000);
        workers[victim].stop_with(libc::SIGKILL);
        wait_tick(&redis, "pulse", before + 3_000);
        workers[victim] = start(node);
    }
    let last = wait_tick(&redis, "pulse", first + 24_000);
    let ticks: Vec<i64> = (first..=last).step_by(1_000).collect();
    let mut client = Client::new(&redis);
    for tick in &ticks {
        let id = tick_id("pulse", *tick);
        wait_for_within(
            &format!("tick {tick} ({id}) to run"),
            Duration::from_secs(20),
            || client.state(&id).filter(taskhost_tests::is_ready),
        );
    }
    for mut worker in workers {
        worker.stop_with(libc::SIGTERM);
    }
    let runs: Vec<(i64, usize)> = ticks
        .iter()
        .map(|t| (*t, feed.endings(&tick_id("pulse", *t))))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(ticks.len() >= 25, "{} ticks", ticks.len());
    assert!(runs.is_empty(), "ticks not run exactly once: {runs:?}");
}

#[test]
fn schedule_list_shows_each_entry_with_its_last_and_next_run() {
    let dir = TestDir::new("schedule-list");
    let redis = RedisServer::start(&dir);
    let config = dir.write(
        "taskhost.toml",
        &format!(
            "{EVERY_SECOND}\n[schedule.cleanup]\ntask = \"tasks.cleanup_old_evaluations\"\n\
             cron = \"0 * * * *\"\ntimezone = \"Europe/Berlin\"\n"
        ),
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let worker = Process::worker(&dir, &redis, &plugins, &["--config", &config]);
    let tick = wait_tick(&redis, "pulse", 0);
    let broker = redis.url(0);
    let out = Process::run(
        &dir,
        &["schedule", "list", "--config", &config, "-b", &broker],
    );
    drop(worker);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let line = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name}: {}", out.stdout))
            .to_owned()
    };
    let pulse = line("pulse");
    assert!(
        pulse.contains("demo.echo") && pulse.contains("every 1s"),
        "{pulse}"
    );
    assert!(!pulse.contains("never"), "pulse has run: {pulse}");
    assert!(tick > 0);
    let cleanup = line("cleanup");
    assert!(
        cleanup.contains("Europe/Berlin")
            && cleanup.contains("never")
            && cleanup.contains(":00:00Z"),
        "{cleanup}"
    );
}

#[test]
fn taskhost_beat_sends_the_ticks_that_no_beat_workers_only_run() {
    let dir = TestDir::new("schedule-beat");
    let redis = RedisServer::start(&dir);
    let config = dir.write("taskhost.toml", EVERY_SECOND);
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let _worker = Process::worker(&dir, &redis, &plugins, &["--config", &config, "--no-beat"]);
    let mut client = Client::new(&redis);
    let broker = redis.url(0);
    let mut command = Process::command(&dir, &["beat", "--config", &config, "-b", &broker]);
    command.env_remove("RUST_LOG");
    let mut beat = Process::spawn(&dir, "beat.log", command);
    let tick = wait_tick(&redis, "pulse", 0);
    let id = tick_id("pulse", tick);
    let doc = wait_for_within("the beat's tick to run", Duration::from_secs(20), || {
        client.state(&id).filter(taskhost_tests::is_ready)
    });
    beat.stop_with(libc::SIGTERM);
    assert_eq!(doc["result"], "tick");
}

#[test]
fn the_readme_schedule_example_is_read_and_listed() {
    let dir = TestDir::new("schedule-readme");
    let redis = RedisServer::start(&dir);
    let config = dir.write(
        "taskhost.toml",
        &taskhost_tests::readme_block("schedule-example"),
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let broker = redis.url(0);
    let out = Process::run(
        &dir,
        &["schedule", "list", "--config", &config, "-b", &broker],
    );
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("cleanup_old_evaluations"))
        .unwrap_or_else(|| panic!("no entry listed: {}", out.stdout));
    assert!(
        line.contains("tasks.cleanup_old_evaluations")
            && line.contains("Europe/Berlin")
            && line.contains(":00:00Z"),
        "{line}"
    );
}

/// Redis's clock, ms since the epoch.
fn redis_now_ms(redis: &RedisServer) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(&mut redis.conn(0)).expect("TIME");
    secs * 1000 + micros / 1000
}

/// A worker with the one-second schedule whose clock reads `skew_ms` off.
fn scheduler(dir: &TestDir, redis: &RedisServer, name: &str, skew_ms: i64) -> Process {
    let config = dir.write("taskhost.toml", EVERY_SECOND);
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let node = format!("{name}@test");
    let args = ["-n", node.as_str(), "--config", config.as_str()];
    let mut command = Process::worker_command(dir, redis, &plugins, &args);
    command.env("TASKHOST_TEST_CLOCK_SKEW_MS", skew_ms.to_string());
    let worker = Process::spawn(dir, &format!("{name}.log"), command);
    worker.wait_log("worker ready");
    worker
}

/// Waits for five more ticks than `from`, each within a minute of Redis's clock.
fn ticks_go_on(redis: &RedisServer, from: i64) {
    let mut last = from;
    for _ in 0..5 {
        last = wait_tick(redis, "pulse", last + 1_000);
        let ahead = last - redis_now_ms(redis);
        assert!(
            ahead <= 60_000,
            "a tick {ahead} ms ahead of Redis's clock was stored"
        );
    }
}

#[test]
fn a_worker_a_day_fast_does_not_stop_the_schedule() {
    let dir = TestDir::new("schedule-fast-clock");
    let redis = RedisServer::start(&dir);
    let _fast = scheduler(&dir, &redis, "fast", 86_400_000);
    let _right = scheduler(&dir, &redis, "right", 0);
    ticks_go_on(&redis, redis_now_ms(&redis));
}

#[test]
fn a_last_tick_stored_a_day_ahead_does_not_stop_the_schedule() {
    let dir = TestDir::new("schedule-future-last");
    let redis = RedisServer::start(&dir);
    // As a worker with a fast clock left it before ticks were bounded.
    redis::cmd("HSET")
        .arg("taskhost:schedule:last")
        .arg("pulse")
        .arg(redis_now_ms(&redis) + 86_400_000)
        .query::<()>(&mut redis.conn(0))
        .expect("HSET");
    let _right = scheduler(&dir, &redis, "right", 0);
    let now = redis_now_ms(&redis);
    let first = wait_for_within("a tick of today", Duration::from_secs(20), || {
        last_tick(&redis, "pulse").filter(|t| *t <= now + 60_000)
    });
    ticks_go_on(&redis, first);
}
