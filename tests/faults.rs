//! Nothing lost: workers killed, Redis restarted or cutting connections, shutdowns under load,
//! a poison task, a million far-ETA tasks. Each fault run counts tasks sent, completed, lost and
//! run twice, and prints the count (`cargo test -- --nocapture` shows them).

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use taskhost_tests::{
    Client, Process, RedisServer, ResultFeed, Tally, TestDir, celery_message, rss_kib, wait_for,
    wait_for_within,
};

/// How long a fault run may take to finish all its tasks.
const SETTLE: Duration = Duration::from_secs(90);

/// A worker named `name@test` with its own log, consuming `celery`.
fn worker(dir: &TestDir, redis: &RedisServer, name: &str, extra: &[&str]) -> Process {
    let plugins = dir.path().join("plugins");
    if !plugins.exists() {
        dir.plugins(&["demo", "crucible"]);
    }
    let node = format!("{name}@test");
    let mut args = vec!["-n", node.as_str()];
    args.extend_from_slice(extra);
    Process::worker_logged(dir, &format!("{name}.log"), redis, &plugins, &args)
}

fn read_logs(dir: &TestDir) -> Vec<String> {
    std::fs::read_dir(dir.path())
        .expect("test dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// Sends `n` tasks: two `demo.add` for every `demo.sleep(ms)`.
fn send_mixed(client: &mut Client, n: usize, sleep_ms: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 3 == 2 {
                client.send("demo.sleep", json!([sleep_ms]))
            } else {
                client.send("demo.add", json!([i, 1]))
            }
        })
        .collect()
}

#[test]
fn killing_workers_loses_nothing() {
    let dir = TestDir::new("fault-kill");
    let redis = RedisServer::start(&dir);
    let feed = ResultFeed::start(&redis);
    let lapse = ["-c", "16", "--heartbeat-lapse", "2"];
    let mut w1 = worker(&dir, &redis, "w1", &lapse);
    let mut w2 = worker(&dir, &redis, "w2", &lapse);
    let _w3 = worker(&dir, &redis, "w3", &lapse);
    let mut client = Client::new(&redis);
    let ids = send_mixed(&mut client, 3000, 200);
    let mut recoveries = Vec::new();
    let mut replacements = Vec::new();
    for (victim, node, replacement) in [(&mut w1, "w1@test", "w4"), (&mut w2, "w2@test", "w5")] {
        let held = wait_for(&format!("more than 10 tasks in flight on {node}"), || {
            let n = client.in_flight(node);
            (n > 10).then_some(n)
        });
        let killed = Instant::now();
        victim.stop_with(libc::SIGKILL);
        wait_for(&format!("{node}'s tasks to be returned"), || {
            (client.in_flight(node) == 0).then_some(())
        });
        recoveries.push((node, held, killed.elapsed()));
        replacements.push(worker(&dir, &redis, replacement, &lapse));
    }
    let (results, _) = client.results(&ids, SETTLE);
    let logs = read_logs(&dir);
    let tally = Tally::of(&ids, &results, &feed);
    assert!(
        !logs.iter().any(|l| l.contains("worker=w3@test")),
        "a live worker was taken for dead"
    );
    for (node, held, took) in &recoveries {
        eprintln!("killed {node} holding {held} tasks: returned to the queue after {took:?}");
    }
    eprintln!("kill -9 twice: {tally}");
    assert_eq!(tally.lost, 0, "{tally}");
    assert!(results.values().all(|d| d["status"] == "SUCCESS"));
}

#[test]
fn a_long_task_on_a_live_worker_is_not_run_twice() {
    let dir = TestDir::new("fault-long");
    let redis = RedisServer::start(&dir);
    let feed = ResultFeed::start(&redis);
    let lapse = ["--heartbeat-lapse", "2"];
    let _w1 = worker(&dir, &redis, "w1", &lapse);
    let _w2 = worker(&dir, &redis, "w2", &lapse);
    let mut client = Client::new(&redis);
    // Longer than the lapse, twice over.
    let ids = vec![client.send("demo.sleep", json!([5000]))];
    let (results, _) = client.results(&ids, SETTLE);
    let logs = read_logs(&dir);
    let tally = Tally::of(&ids, &results, &feed);
    eprintln!("a 5 s task with a 2 s heartbeat lapse: {tally}");
    assert_eq!((tally.completed, tally.duplicated), (1, 0), "{tally}");
    assert!(
        !logs.iter().any(|l| l.contains("worker lapsed")),
        "no live worker was taken for dead"
    );
}

/// Pushes with a fresh connection, retrying while Redis is away.
fn push_retrying(redis: &RedisServer, message: &str) {
    wait_for("Redis to take a task", || {
        let client = redis::Client::open(redis.url(0)).ok()?;
        let mut conn = client.get_connection().ok()?;
        redis::cmd("LPUSH")
            .arg("celery")
            .arg(message)
            .query::<()>(&mut conn)
            .ok()
    });
}

#[test]
fn restarting_redis_with_aof_loses_nothing() {
    let dir = TestDir::new("fault-redis");
    let mut redis =
        RedisServer::start_with(&dir, &["--appendonly", "yes", "--appendfsync", "always"]);
    let feed = ResultFeed::start(&redis);
    let w = worker(&dir, &redis, "w1", &["-c", "8"]);
    let mut ids = Vec::new();
    for round in 0..2 {
        for i in 0..1000 {
            let id = uuid::Uuid::new_v4().to_string();
            let (task, args) = if i % 3 == 2 {
                ("demo.sleep", json!([50]))
            } else {
                ("demo.add", json!([i, 1]))
            };
            push_retrying(
                &redis,
                &celery_message(&id, task, args, json!({}), "celery"),
            );
            ids.push(id);
        }
        if round == 0 {
            // Mid-run, with tasks queued, in flight and being settled.
            redis.restart();
        }
    }
    let mut client = Client::new(&redis);
    let (results, _) = client.results(&ids, SETTLE);
    let tally = Tally::of(&ids, &results, &feed);
    eprintln!("Redis killed and restarted (AOF, fsync always) mid-run: {tally}");
    assert_eq!(tally.lost, 0, "{tally}\n{}", w.log());
}

/// Kills every client connection but `keep`'s own.
fn kill_clients(keep: &mut redis::Connection) -> usize {
    let own: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query(keep)
        .expect("CLIENT ID");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(keep)
        .expect("CLIENT LIST");
    let mut killed = 0;
    for line in list.lines() {
        let id = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("id="))
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(id) = id.filter(|id| *id != own) {
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query(keep)
                .unwrap_or(0);
            killed += usize::try_from(n).unwrap_or(0);
        }
    }
    killed
}

#[test]
fn killed_idle_and_flapping_connections_do_not_leave_the_worker_deaf() {
    let dir = TestDir::new("fault-conn");
    let redis = RedisServer::start(&dir);
    let w = worker(&dir, &redis, "w1", &["-c", "4"]);
    let mut client = Client::new(&redis);
    let mut admin = redis.conn(0);
    let mut ids = Vec::new();
    let check = |what: &str, client: &mut Client, ids: &mut Vec<String>| {
        let start = Instant::now();
        let batch: Vec<String> = (0..50)
            .map(|i| client.send("demo.add", json!([i, 1])))
            .collect();
        let (results, missing) = client.results(&batch, SETTLE);
        assert!(
            missing.is_empty(),
            "{what}: {} tasks never ran\n{}",
            missing.len(),
            w.log()
        );
        assert_eq!(results.len(), 50);
        eprintln!(
            "{what}: consumption resumed, 50 tasks done {:?} after sending",
            start.elapsed()
        );
        ids.extend(batch);
    };
    check("before", &mut client, &mut ids);
    // Every connection of the worker killed (CLIENT KILL), and this test's own but `admin`.
    assert!(kill_clients(&mut admin) > 0);
    client = Client::new(&redis);
    check("after CLIENT KILL", &mut client, &mut ids);
    // Idle connections closed by Redis itself (`timeout`): wait until one of the worker's
    // goes, then check the worker still consumes.
    let client_ids = |admin: &mut redis::Connection| -> Vec<String> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(admin)
            .unwrap_or_default();
        list.lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("id="))
                    .map(str::to_owned)
            })
            .collect()
    };
    let before = client_ids(&mut admin);
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg("1")
        .query::<()>(&mut admin)
        .expect("timeout");
    wait_for("Redis to close an idle connection", || {
        let now = client_ids(&mut admin);
        before.iter().any(|id| !now.contains(id)).then_some(())
    });
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg("0")
        .query::<()>(&mut admin)
        .expect("timeout");
    client = Client::new(&redis);
    check("after idle connections timed out", &mut client, &mut ids);
    // A flapping connection: killed every 100 ms while tasks are sent and run.
    let flapping = {
        let url = redis.url(0);
        std::thread::spawn(move || {
            let mut admin = redis::Client::open(url)
                .and_then(|c| c.get_connection())
                .expect("admin");
            let until = Instant::now() + Duration::from_secs(3);
            let mut kills = 0;
            while Instant::now() < until {
                kills += kill_clients(&mut admin);
                // The flapping itself: cut, let it reconnect, cut again.
                std::thread::sleep(Duration::from_millis(100));
            }
            kills
        })
    };
    let mut sent = Vec::new();
    while !flapping.is_finished() {
        let id = uuid::Uuid::new_v4().to_string();
        push_retrying(
            &redis,
            &celery_message(&id, "demo.add", json!([1, 1]), json!({}), "celery"),
        );
        sent.push(id);
    }
    let kills = flapping.join().expect("flapping thread");
    let mut client = Client::new(&redis);
    let (results, missing) = client.results(&sent, SETTLE);
    eprintln!(
        "flapping ({kills} connections killed in 3 s): {} sent, {} done",
        sent.len(),
        results.len()
    );
    assert!(
        missing.is_empty(),
        "{} tasks never ran after the flapping\n{}",
        missing.len(),
        w.log()
    );
    check("after flapping", &mut client, &mut ids);
    // Stalled: CLIENT PAUSE longer than the fetch stall: the worker says it is not fetching,
    // then that it is again. (The flapping killed `admin` too.)
    let mut admin = redis.conn(0);
    assert!(
        !w.log().contains("not fetching"),
        "no stall before the pause"
    );
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(7000)
        .arg("ALL")
        .query::<()>(&mut admin)
        .expect("pause");
    w.wait_log("not fetching");
    w.wait_log("fetching again");
    check("after CLIENT PAUSE", &mut client, &mut ids);
}

#[test]
fn sigterm_under_load_loses_nothing_and_exits_zero() {
    let dir = TestDir::new("fault-sigterm");
    let redis = RedisServer::start(&dir);
    let feed = ResultFeed::start(&redis);
    let mut w1 = worker(&dir, &redis, "w1", &["-c", "8", "--shutdown-grace", "1"]);
    let mut client = Client::new(&redis);
    let ids = send_mixed(&mut client, 1500, 300);
    wait_for("tasks in flight on w1", || {
        (client.in_flight("w1@test") > 4).then_some(())
    });
    let status = w1.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        client.in_flight("w1@test"),
        0,
        "everything went back to the queue"
    );
    let mut w2 = worker(&dir, &redis, "w2", &["-c", "8"]);
    let (results, _) = client.results(&ids, SETTLE);
    let tally = Tally::of(&ids, &results, &feed);
    eprintln!("SIGTERM under load (1 s grace): {tally}");
    assert_eq!(tally.lost, 0, "{tally}");
    assert!(w2.stop_with(libc::SIGTERM).success());
    // A second signal does not wait for the grace period.
    let mut w3 = worker(&dir, &redis, "w3", &["-c", "2", "--shutdown-grace", "60"]);
    let long = client.send("demo.sleep", json!([60_000]));
    wait_for("the long task to start", || {
        (client.in_flight("w3@test") > 0).then_some(())
    });
    taskhost_tests::signal(w3.pid(), libc::SIGTERM);
    w3.wait_log("stopping: no new tasks");
    let status = w3.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert_eq!(client.in_flight("w3@test"), 0);
    assert_eq!(
        client.llen("celery"),
        1,
        "the long task is back in its queue"
    );
    let _ = long;
}

#[test]
fn a_poison_task_ends_in_the_dead_letter_list() {
    let dir = TestDir::new("fault-poison");
    let redis = RedisServer::start(&dir);
    let mut client = Client::new(&redis);
    let poison = client.send("demo.sleep", json!([600_000]));
    let args = ["--heartbeat-lapse", "2", "--max-redeliveries", "2"];
    // A task that kills every worker that runs it (here the test does the killing).
    for round in 0..3 {
        let mut w = worker(&dir, &redis, "w1", &args);
        wait_for("the poison task to be taken", || {
            (client.in_flight("w1@test") == 1).then_some(())
        });
        w.stop_with(libc::SIGKILL);
        eprintln!("poison round {round}: worker killed");
    }
    // The next worker returns it a third time: past the limit, so to the dead letters.
    let w = worker(&dir, &redis, "w1", &args);
    let dead = wait_for("the poison task to be dead-lettered", || {
        client
            .dead_letters()
            .into_iter()
            .find(|d| d["task_id"] == poison.as_str())
    });
    assert!(
        dead["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("died running it"),
        "{dead}"
    );
    assert_eq!(client.llen("celery"), 0);
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(
        client.result(&id)["result"],
        5,
        "the fleet goes on\n{}",
        w.log()
    );
}

#[test]
fn a_million_far_eta_tasks_wait_in_redis_not_in_the_worker() {
    let dir = TestDir::new("fault-eta");
    let redis = RedisServer::start(&dir);
    let w = worker(&dir, &redis, "w1", &["-c", "16"]);
    let mut client = Client::new(&redis);
    for i in 0..50 {
        let id = client.send("demo.add", json!([i, 1]));
        client.result(&id);
    }
    let before = rss_kib(w.pid());
    let eta = "2099-01-01T00:00:00+00:00";
    let mut conn = redis.conn(0);
    let total = 1_000_000;
    for chunk in 0..total / 10_000 {
        let mut pipe = redis::pipe();
        for i in 0..10_000 {
            let id = format!("far-{chunk}-{i}");
            let mut message: Value = serde_json::from_str(&celery_message(
                &id,
                "demo.add",
                json!([1, 1]),
                json!({}),
                "celery",
            ))
            .expect("json");
            message["headers"]["eta"] = json!(eta);
            pipe.cmd("LPUSH")
                .arg("celery")
                .arg(message.to_string())
                .ignore();
        }
        pipe.query::<()>(&mut conn).expect("push far-ETA tasks");
    }
    let started = Instant::now();
    wait_for_within(
        "every far-ETA task to be in the delayed set",
        SETTLE,
        || (client.zcard("taskhost:delayed") == total && client.llen("celery") == 0).then_some(()),
    );
    let moved = started.elapsed();
    let after = rss_kib(w.pid());
    eprintln!(
        "1,000,000 far-ETA tasks moved to the delayed set in {moved:?}; worker RSS {before} KiB before, {after} KiB after"
    );
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    let id = client.send("demo.add", json!([2, 3]));
    assert_eq!(client.result(&id)["result"], 5);
}
