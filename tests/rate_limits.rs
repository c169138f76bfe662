//! A rate limit that holds across the fleet: `[tasks."NAME"] fleet_rate_limit`, counted in
//! Redis, postponing tasks over it rather than dropping them. Timing is measured from the
//! results Redis stores, with a generous lower bound (a benchmark-style check); the upper bound
//! is the promise.

use std::time::Duration;
use taskhost_tests::{Client, Process, RedisServer, TestDir, wait_for_within};

#[test]
fn a_fleet_rate_limit_of_20_per_second_holds_across_three_workers() {
    let dir = TestDir::new("fleet-rate");
    let redis = RedisServer::start(&dir);
    let config = dir.write(
        "taskhost.toml",
        "[tasks.\"demo.add\"]\nfleet_rate_limit = \"20/s\"\n",
    );
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let workers: Vec<Process> = ["a@test", "b@test", "c@test"]
        .iter()
        .map(|node| {
            let flags = ["-n", node, "-c", "4", "--config", &config];
            Process::worker(&dir, &redis, &plugins, &flags)
        })
        .collect();
    let mut client = Client::new(&redis);
    let ids: Vec<String> = (0..120)
        .map(|i| client.send("demo.add", serde_json::json!([i, 1])))
        .collect();
    let mut done: Vec<f64> = Vec::new();
    for id in &ids {
        let doc = wait_for_within(
            &format!("task {id} to finish"),
            Duration::from_secs(60),
            || client.state(id).filter(taskhost_tests::is_ready),
        );
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        let at = time::OffsetDateTime::parse(
            doc["date_done"].as_str().expect("date_done"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("an ISO 8601 date_done");
        done.push(at.unix_timestamp_nanos() as f64 / 1e9);
    }
    drop(workers);
    done.sort_by(f64::total_cmp);
    // The middle 100 finishes: past the start, before the last stragglers.
    let window = done[110] - done[10];
    let rate = 100.0 / window;
    eprintln!(
        "fleet rate limit 20/s across three workers: measured {rate:.2}/s over {window:.2} s"
    );
    assert!(rate <= 22.0, "over the limit: {rate:.2}/s");
    assert!(rate >= 14.0, "far under the limit: {rate:.2}/s");
}

#[test]
fn two_thousand_capped_tasks_wait_without_churning_or_delaying_another_plugins_task() {
    let dir = TestDir::new("capped-backlog");
    let redis = RedisServer::start(&dir);
    let config = dir.write("taskhost.toml", "[plugins.demo]\nmax_instances = 1\n");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let plugins = dir.plugins(&["demo"]);
    let hostile = taskhost_tests::test_plugin_wasm("hostile");
    std::fs::copy(hostile, plugins.join("hostile.wasm")).expect("a second plugin");
    let flags = ["-n", "capped@test", "-c", "4", "--config", &config];
    let _worker = Process::worker(&dir, &redis, &plugins, &flags);
    let mut client = Client::new(&redis);
    // One runs for a minute; the other 1,999 are over demo's max_instances.
    for _ in 0..2000 {
        client.send("demo.sleep", serde_json::json!([60_000]));
    }
    wait_for_within(
        "the capped tasks to wait in the delayed set",
        Duration::from_secs(60),
        || {
            let delayed: usize = redis::cmd("ZCARD")
                .arg("taskhost:delayed")
                .query(client.broker())
                .expect("ZCARD");
            (delayed >= 1_990).then_some(())
        },
    );
    // Waiting, they cost Redis next to nothing: they come back about as fast as one instance
    // could take them, not all of them every 200 ms.
    let before = commands_processed(&mut client);
    taskhost_tests::pace(Duration::from_secs(2));
    let churn = commands_processed(&mut client) - before;
    eprintln!("1,999 capped tasks waiting: {churn} Redis commands in 2 s");
    assert!(churn < 1_000, "{churn} Redis commands in 2 s");
    let mut slowest = Duration::ZERO;
    for n in 0..20 {
        let sent = std::time::Instant::now();
        let id = client.send("hostile.remember", serde_json::json!([n]));
        let doc = wait_for_within("the other plugin's task", Duration::from_secs(30), || {
            client.state(&id).filter(taskhost_tests::is_ready)
        });
        assert_eq!(doc["status"], "SUCCESS", "{doc}");
        slowest = slowest.max(sent.elapsed());
    }
    eprintln!("another plugin's task beside 1,999 capped ones: slowest of 20 took {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a task of another plugin waited {slowest:?} behind capped tasks"
    );
}

/// Redis's count of commands processed so far.
fn commands_processed(client: &mut Client) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(client.broker())
        .expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_commands_processed")
}
