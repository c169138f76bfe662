//! Measuring helpers for the benchmarks in `tests/benches/`.

use crate::{Client, RedisServer};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Sends `task(1, 2)` at `rate` per second for `duration` and returns each task's latency from
/// send to its result being published. `between` is called before each send with the time,
/// to do something during the run (swap a plugin, say).
pub fn latency_run(
    redis: &RedisServer,
    task: &str,
    rate: f64,
    duration: Duration,
    between: &mut dyn FnMut(Instant),
) -> Vec<Duration> {
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut listener = redis.conn(1);
    let seen = received.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listening = std::thread::spawn(move || {
        let mut pubsub = listener.as_pubsub();
        pubsub.psubscribe("celery-task-meta-*").expect("psubscribe");
        pubsub
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        ready_tx.send(()).expect("ready");
        let idle_limit = Duration::from_secs(3);
        let mut last = Instant::now();
        while last.elapsed() < idle_limit {
            if let Ok(message) = pubsub.get_message() {
                let channel = message.get_channel_name().to_owned();
                let id = channel.trim_start_matches("celery-task-meta-").to_owned();
                if let Ok(mut seen) = seen.lock() {
                    seen.insert(id, Instant::now());
                }
                last = Instant::now();
            }
        }
    });
    ready_rx.recv().expect("listener ready");
    let mut client = Client::new(redis);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut sent = Vec::new();
    while start.elapsed() < duration {
        let due = start + interval * u32::try_from(sent.len()).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            // Pacing the producer at a fixed rate (the load being measured).
            crate::pace(due - now);
        }
        between(Instant::now());
        let sent_at = Instant::now();
        let id = client.send(task, json!([1, 2]));
        sent.push((id, sent_at));
    }
    listening.join().expect("listener");
    let received = received.lock().map(|r| r.clone()).unwrap_or_default();
    sent.iter()
        .map(|(id, at)| {
            let got = received
                .get(id)
                .unwrap_or_else(|| panic!("no result published for {id}"));
            got.saturating_duration_since(*at)
        })
        .collect()
}

/// (p50, p99, max) in milliseconds.
pub fn percentiles(values: &mut [Duration]) -> (f64, f64, f64) {
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let last = values.len().saturating_sub(1);
    let at = |q: f64| ms(values[((last as f64) * q).round() as usize]);
    (at(0.5), at(0.99), at(1.0))
}

/// (min, median, max) in milliseconds.
pub fn min_median_max(values: &mut [Duration]) -> (f64, f64, f64) {
    values.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(values[0]),
        ms(values[values.len() / 2]),
        ms(values[values.len() - 1]),
    )
}

/// Cores of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The load average, as /proc/loadavg gives it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
