//! The scheduler every worker runs (and `taskhost beat` runs alone): each `[schedule]` entry's
//! due tick is sent once across the fleet, with no leader. Every scheduler computes the same
//! ticks; Redis takes the first claim on each, the claim and the message in one step
//! (`redis::schedule`), and the task id is derived from the entry and the tick, so a tick sent
//! by two schedulers at once is still one task.
//!
//! After downtime the latest missed tick is sent once (`catch_up = false` skips it); a
//! scheduler that starts with no record of an entry sends only a tick that just fell.

use crate::config::schedule::Entry;
use crate::protocol::NewTask;
use crate::redis::schedule::{TICK_AHEAD, Tick};
use crate::redis::{Broker, retrying};
use crate::telemetry::span;
use jiff::{SignedDuration, Timestamp};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// How late a tick may be sent when it is not a catch-up: past this, a tick with no run
/// recorded before it (or of an entry that does not catch up) is skipped.
const GRACE: SignedDuration = SignedDuration::from_secs(5);

/// Where ticks go: Redis, or a test's stand-in.
pub trait Ticks: Send + Sync {
    /// Each entry's last tick sent, ms since the epoch.
    fn last_runs(&self) -> impl Future<Output = HashMap<String, i64>> + Send;
    /// Sends `message` as `entry`'s tick, unless that tick or a later one was sent; true if
    /// this call sent it.
    fn send(
        &self,
        entry: &Entry,
        tick: Timestamp,
        message: Vec<u8>,
    ) -> impl Future<Output = bool> + Send;
}

impl Ticks for Broker {
    async fn last_runs(&self) -> HashMap<String, i64> {
        let what = "read the schedule's last runs";
        retrying(what, || self.schedule_last_runs())
            .await
            .unwrap_or_else(|e| {
                tracing::error!("cannot {what} (Redis refuses it for good): {e}");
                HashMap::new()
            })
    }

    async fn send(&self, entry: &Entry, tick: Timestamp, message: Vec<u8>) -> bool {
        let tick_ms = tick.as_millisecond();
        let what = "send a schedule tick";
        let sent = retrying(what, || {
            self.send_tick(&entry.name, tick_ms, &entry.queue, &message)
        })
        .await;
        match sent {
            Ok(Tick::Sent) => true,
            Ok(Tick::SentBefore) => false,
            Ok(Tick::Ahead { redis_now_ms }) => {
                let ahead_s = (tick_ms - redis_now_ms) / 1000;
                tracing::error!(
                    schedule = %entry.name, ahead_s,
                    "this machine's clock is about {ahead_s} s ahead of Redis's: its schedule ticks \
                     are refused (more than {} s ahead) and the other workers send them; set its \
                     clock right (NTP)",
                    TICK_AHEAD.as_secs()
                );
                false
            }
            Err(e) => {
                tracing::error!(entry = %entry.name, "cannot {what} (Redis refuses it for good): {e}");
                false
            }
        }
    }
}

/// What time it is: the system clock, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // This process's clock, as every other part of the worker reads it.
        Timestamp::from_millisecond(crate::clock::now_ms()).unwrap_or_else(|_| Timestamp::now())
    }
}

/// Sends the entries' ticks as they fall until `stop` turns true; `entries` may change (a
/// config reload).
pub async fn run(
    ticks: impl Ticks,
    clock: impl Clock,
    mut entries: watch::Receiver<Arc<Vec<Entry>>>,
    mut stop: watch::Receiver<bool>,
) {
    let origin = crate::node::origin();
    loop {
        let current = entries.borrow_and_update().clone();
        let now = clock.now();
        if !current.is_empty() {
            let last = ticks.last_runs().await;
            for entry in current.iter() {
                let last = last
                    .get(&entry.name)
                    .and_then(|ms| Timestamp::from_millisecond(*ms).ok())
                    .filter(|last| !beyond_bound(*last, now));
                if let Some(tick) = due(entry, last, now) {
                    let mut message = tick_message(entry, tick);
                    // A tick starts a trace of its own. Every scheduler makes the tick's
                    // message and one sends it: the others' spans say they did not.
                    let (trace, sent) = span::publishing_anew(&message);
                    message.trace = trace;
                    let claimed = ticks.send(entry, tick, message.encode(&origin)).await;
                    sent(claimed);
                    if claimed {
                        tracing::info!(schedule = %entry.name, task = %entry.task, tick = %tick, "periodic task sent");
                    }
                }
            }
        }
        let next = current.iter().filter_map(|e| e.when.next_after(now)).min();
        let sleep = match next {
            Some(next) => {
                let wait = next.duration_since(clock.now()).max(SignedDuration::ZERO);
                tokio::time::sleep(wait.unsigned_abs())
            }
            // Nothing scheduled: wait for a reload (or the stop).
            None => tokio::time::sleep(std::time::Duration::from_secs(86_400)),
        };
        tokio::select! {
            () = sleep => {}
            Ok(()) = entries.changed() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// Whether a last tick stored is further ahead of `now` than any scheduler may send (a worker
/// whose clock ran fast stored it before the bound existed): it counts as none.
fn beyond_bound(last: Timestamp, now: Timestamp) -> bool {
    SignedDuration::try_from(TICK_AHEAD).is_ok_and(|bound| last.duration_since(now) > bound)
}

/// The tick of `entry` to send at `now`, given the last one sent.
pub fn due(entry: &Entry, last: Option<Timestamp>, now: Timestamp) -> Option<Timestamp> {
    let since = last.unwrap_or_else(|| now - GRACE);
    let tick = entry.when.latest(since, now)?;
    let late = now.duration_since(tick);
    if (last.is_none() || !entry.catch_up) && late > GRACE {
        return None;
    }
    Some(tick)
}

/// The message of `entry`'s tick: a task id derived from the entry and the tick, so every
/// scheduler builds the same one.
pub fn tick_message(entry: &Entry, tick: Timestamp) -> NewTask {
    let expires = entry.expires.and_then(|e| {
        let at = tick.checked_add(SignedDuration::try_from(e).ok()?).ok()?;
        time::OffsetDateTime::from_unix_timestamp_nanos(at.as_nanosecond()).ok()
    });
    NewTask {
        id: entry.task_id(tick),
        task: entry.task.clone(),
        args: entry.args.clone(),
        kwargs: entry.kwargs.clone(),
        queue: entry.queue.clone(),
        expires,
        ..NewTask::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schedule::ScheduleSection;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Ticks kept in memory, as the Redis script keeps them.
    #[derive(Default, Clone)]
    struct Memory {
        last: Arc<Mutex<HashMap<String, i64>>>,
        sent: Arc<Mutex<Vec<(String, Timestamp, String)>>>,
    }

    impl Ticks for Memory {
        async fn last_runs(&self) -> HashMap<String, i64> {
            crate::lock(&self.last).clone()
        }

        async fn send(&self, entry: &Entry, tick: Timestamp, message: Vec<u8>) -> bool {
            let mut last = crate::lock(&self.last);
            let ms = tick.as_millisecond();
            if last.get(&entry.name).is_some_and(|l| *l >= ms) {
                return false;
            }
            last.insert(entry.name.clone(), ms);
            let decoded = crate::protocol::TaskMessage::decode(&message).expect("decodes");
            crate::lock(&self.sent).push((entry.name.clone(), tick, decoded.id));
            true
        }
    }

    /// The system time `start` plus however far tokio's (paused) clock has moved.
    struct TestClock {
        start: Timestamp,
        origin: tokio::time::Instant,
    }

    impl Clock for TestClock {
        fn now(&self) -> Timestamp {
            let elapsed = SignedDuration::try_from(self.origin.elapsed()).expect("small");
            self.start + elapsed
        }
    }

    fn entry(toml_text: &str) -> Entry {
        let section: ScheduleSection = toml::from_str(toml_text).expect("TOML");
        section.check("e").expect("valid")
    }

    /// Runs the scheduler over `hours` of tokio's paused clock, starting at `start`.
    async fn run_for(entries: Vec<Entry>, memory: &Memory, start: &str, hours: u64) {
        let clock = TestClock {
            start: start.parse().expect("timestamp"),
            origin: tokio::time::Instant::now(),
        };
        let (_entries_tx, entries_rx) = watch::channel(Arc::new(entries));
        let (stop_tx, stop_rx) = watch::channel(false);
        let scheduler = tokio::spawn(run(memory.clone(), clock, entries_rx, stop_rx));
        tokio::time::sleep(Duration::from_secs(hours * 3600)).await;
        stop_tx.send(true).expect("scheduler running");
        scheduler.await.expect("scheduler stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cron_entry_sends_each_tick_at_its_computed_time() {
        let memory = Memory::default();
        let hourly = entry("task = \"t\"\ncron = \"0 * * * *\"");
        run_for(vec![hourly], &memory, "2026-12-02T07:13:00Z", 3).await;
        let sent: Vec<String> = crate::lock(&memory.sent)
            .iter()
            .map(|(_, tick, _)| tick.to_string())
            .collect();
        assert_eq!(
            sent,
            [
                "2026-12-02T08:00:00Z",
                "2026-12-02T09:00:00Z",
                "2026-12-02T10:00:00Z"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_schedulers_send_each_tick_once_with_the_same_task_id() {
        let memory = Memory::default();
        let every = entry("task = \"t\"\nevery = \"10m\"");
        let one = run_for(vec![every.clone()], &memory, "2026-12-02T07:13:00Z", 1);
        let two = run_for(vec![every.clone()], &memory, "2026-12-02T07:13:00Z", 1);
        tokio::join!(one, two);
        let sent = crate::lock(&memory.sent).clone();
        let ticks: Vec<String> = sent.iter().map(|(_, t, _)| t.to_string()).collect();
        assert_eq!(ticks.len(), 6, "{ticks:?}");
        for (_, tick, id) in &sent {
            assert_eq!(*id, every.task_id(*tick));
        }
    }

    #[test]
    fn after_downtime_the_latest_missed_tick_is_sent_once_unless_catch_up_is_off() {
        let hourly = entry("task = \"t\"\ncron = \"0 * * * *\"");
        let last = Some("2026-12-02T03:00:00Z".parse().expect("timestamp"));
        let now: Timestamp = "2026-12-02T07:13:00Z".parse().expect("timestamp");
        assert_eq!(
            due(&hourly, last, now).map(|t| t.to_string()),
            Some("2026-12-02T07:00:00Z".into())
        );
        let strict = entry("task = \"t\"\ncron = \"0 * * * *\"\ncatch_up = false");
        assert_eq!(due(&strict, last, now), None);
        // A scheduler with no record sends only a tick that just fell.
        assert_eq!(due(&hourly, None, now), None);
    }
}
