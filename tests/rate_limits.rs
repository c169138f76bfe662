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
