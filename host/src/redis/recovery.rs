//! Worker liveness and crash recovery: nothing a dead worker had taken is lost.
//!
//! Every worker keeps an entry in the `taskhost:workers` hash (node name → heartbeat time, the
//! queue lists it fetches from, its process), refreshed every [`HEARTBEAT`] (or a quarter of the
//! lapse, if that is shorter, so one late beat never looks like a death). Every worker also
//! looks over the others: when a worker's heartbeat is older than the lapse, the recover
//! script (`scripts/recover-2.lua`) returns the messages in its in-flight lists to the lists they came from — re-checking
//! the lapse and removing the entry in the same atomic step, so it happens exactly once
//! whichever workers notice. A slow task on a live worker is never returned: only a lapsed
//! heartbeat counts. And a worker judges others only while its own heartbeats have landed
//! steadily for a whole lapse ([`Steady`]): a Redis that stalled, restarted or failed over
//! makes every heartbeat look old at once, and a reaper that saw its own beat wait, fail or
//! come late gives the others one more lapse to beat again.
//!
//! A message returned more than `max_redeliveries` times (it keeps killing its workers) goes
//! to the dead-letter list instead, so a poison task cannot take a fleet down one worker after
//! another. The count is kept per delivery tag (`taskhost:redelivered:<tag>`, expiring). The
//! worker that dead-letters such a message fails its task ([`Presence::lost`]).
//!
//! A worker starting under a name whose entry is still fresh waits for it to lapse (two live
//! workers must not share a name, hence in-flight lists), unless that entry is a process of
//! this machine that no longer exists; it then returns its predecessor's leftovers at once.

use super::keys::{DEAD, REDELIVERED_PREFIX, WORKERS, inflight_prefix};
use super::{Connection, RedisError, scripts};
use crate::clock::now_ms;
use crate::protocol::time::format_time;
use crate::shutdown::Stopping;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How often a worker refreshes its entry, at most.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How often a worker with this `lapse` beats: often enough that several beats fit in a lapse.
pub fn heartbeat_interval(lapse: Duration) -> Duration {
    (lapse / 4).clamp(Duration::from_millis(100), HEARTBEAT)
}

/// How long a redelivery count is remembered.
const REDELIVERY_MEMORY_S: u64 = 7 * 86_400;

/// One worker's entry in [`WORKERS`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Last heartbeat, milliseconds since the Unix epoch by Redis's clock (`TIME`).
    pub hb: i64,
    pub host: String,
    pub pid: u32,
    /// The queue lists it fetches from (its in-flight lists are named after them).
    pub sources: Vec<String>,
    /// Whether it is consuming (fetches answered recently, or every slot busy).
    pub fetching: bool,
}

/// Returns a lapsed worker's in-flight messages to their queues (or, past the redelivery
/// limit, to the dead-letter list) and removes its entry, if its heartbeat is older than
/// `lapse` when the script runs (`scripts/recover-2.lua`). Returns how many were returned and
/// the messages dead-lettered, or none if the worker is alive.
pub async fn recover(
    conn: &mut Connection,
    node: &str,
    lapse: Duration,
    max_redeliveries: u32,
) -> Result<Option<(u64, Vec<Vec<u8>>)>, RedisError> {
    let (returned, dead): (i64, Vec<Vec<u8>>) = scripts::recover()
        .key(WORKERS)
        .key(DEAD)
        .arg(node)
        .arg(u64::try_from(lapse.as_millis()).unwrap_or(u64::MAX))
        .arg(inflight_prefix(node))
        .arg(max_redeliveries)
        .arg(REDELIVERY_MEMORY_S)
        .arg(format_time(crate::clock::now()))
        .arg(REDELIVERED_PREFIX)
        .invoke_async(conn)
        .await?;
    Ok((returned >= 0).then(|| (u64::try_from(returned).unwrap_or(0), dead)))
}

/// Whether this worker's own heartbeats have been landing steadily for a whole lapse: only
/// then may it judge others dead. A Redis that stalled writes, restarted or failed over makes
/// every worker's heartbeat look old at once; a reaper whose own beat failed, stalled or came
/// late has seen that happen, and gives the others one more lapse to beat again.
#[derive(Debug)]
pub struct Steady {
    interval: Duration,
    lapse: Duration,
    /// When the current run of steady beats began.
    since: Option<tokio::time::Instant>,
    /// When the last beat landed.
    last: Option<tokio::time::Instant>,
}

impl Steady {
    pub fn new(interval: Duration, lapse: Duration) -> Self {
        Self {
            interval,
            lapse,
            since: None,
            last: None,
        }
    }

    /// A beat asked at `asked` landed at `landed`.
    pub fn landed(&mut self, asked: tokio::time::Instant, landed: tokio::time::Instant) {
        // A beat that took longer than the interval waited on Redis; one landing more than two
        // intervals after the last was late: either way, the others' beats may have too.
        let stalled = landed.duration_since(asked) > self.interval;
        let late = self
            .last
            .is_none_or(|last| landed.duration_since(last) > self.interval * 2);
        if stalled || late {
            self.since = Some(landed);
        }
        self.last = Some(landed);
    }

    /// A beat failed.
    pub fn failed(&mut self) {
        self.since = None;
        self.last = None;
    }

    /// Whether the beats have been steady for a lapse, up to `now`.
    pub fn may_judge(&self, now: tokio::time::Instant) -> bool {
        match (self.since, self.last) {
            (Some(since), Some(last)) => {
                now.duration_since(last) <= self.interval && now.duration_since(since) >= self.lapse
            }
            _ => false,
        }
    }
}

/// A worker's entry in the registry, shared by its heartbeat and whatever changes the queues
/// it consumes: an entry is written whole, under the lock, so a heartbeat never writes back
/// sources older than those already written.
pub struct Registration {
    conn: Connection,
    node: String,
    entry: tokio::sync::Mutex<Entry>,
    /// When a heartbeat was last written (ms since the epoch, this machine's clock).
    last_beat_ms: AtomicI64,
}

impl Registration {
    /// Writes the entry with a fresh heartbeat, on Redis's clock.
    async fn beat(&self, fetching: bool) -> Result<(), RedisError> {
        let mut entry = self.entry.lock().await;
        entry.hb = redis_now_ms(&mut self.conn.clone()).await?;
        entry.fetching = fetching;
        self.write(&entry).await?;
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
        Ok(())
    }

    async fn write(&self, entry: &Entry) -> Result<(), RedisError> {
        let json = serde_json::to_string(entry).unwrap_or_default();
        let () = self.conn.clone().hset(WORKERS, &self.node, json).await?;
        Ok(())
    }

    /// Adds lists this worker may fetch from, and writes them before it does: recovery returns
    /// the in-flight lists of the sources written here, so a source must be written before a
    /// message can be in its list. Sources are never removed while the worker runs (a queue no
    /// longer consumed may still have messages in flight).
    ///
    /// # Errors
    /// When Redis does not take the entry; the sources are then not to be fetched from.
    pub async fn add_sources(&self, sources: &[String]) -> Result<(), RedisError> {
        let mut entry = self.entry.lock().await;
        let before = entry.sources.len();
        for source in sources {
            if !entry.sources.contains(source) {
                entry.sources.push(source.clone());
            }
        }
        if entry.sources.len() > before
            && let Err(e) = self.write(&entry).await
        {
            entry.sources.truncate(before);
            return Err(e);
        }
        Ok(())
    }

    /// Every list this worker has fetched from in this run.
    pub async fn sources(&self) -> Vec<String> {
        self.entry.lock().await.sources.clone()
    }

    /// Whether the last heartbeat was written within `within`.
    pub fn beat_within(&self, within: Duration) -> bool {
        now_ms() - self.last_beat_ms.load(Ordering::Relaxed)
            < i64::try_from(within.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A worker's presence in the registry.
#[derive(Clone)]
pub struct Presence {
    conn: Connection,
    node: String,
    registration: Arc<Registration>,
    lapse: Duration,
    max_redeliveries: u32,
    lost: Lost,
    lost_rx: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>>>,
}

/// Where the messages recovery dead-letters go, to be failed (a dead worker's task past its
/// redeliveries still ends in a result).
type Lost = tokio::sync::mpsc::UnboundedSender<Vec<u8>>;

impl Presence {
    /// Takes the name `node`: waits while a live worker holds it (logging why), returns the
    /// leftovers of a dead predecessor, and registers this worker.
    ///
    /// # Errors
    /// When Redis fails; or `None` if a stop was asked for while waiting.
    pub async fn claim(
        mut conn: Connection,
        node: &str,
        sources: Vec<String>,
        lapse: Duration,
        max_redeliveries: u32,
        stop: &mut Stopping,
    ) -> Result<Option<Self>, RedisError> {
        let host = crate::node::machine_hostname();
        let (lost, lost_rx) = tokio::sync::mpsc::unbounded_channel();
        let limits = (lapse, max_redeliveries);
        if !take_name(&mut conn, node, &host, limits, &lost, stop).await? {
            return Ok(None);
        }
        let entry = Entry {
            // Written on Redis's clock by the first beat, below.
            hb: 0,
            host,
            pid: std::process::id(),
            sources,
            fetching: true,
        };
        let registration = Arc::new(Registration {
            conn: conn.clone(),
            node: node.to_owned(),
            entry: tokio::sync::Mutex::new(entry),
            last_beat_ms: AtomicI64::new(0),
        });
        registration.beat(true).await?;
        Ok(Some(Self {
            conn,
            node: node.to_owned(),
            registration,
            lapse,
            max_redeliveries,
            lost,
            lost_rx: Arc::new(std::sync::Mutex::new(Some(lost_rx))),
        }))
    }

    /// The messages this worker's recoveries dead-letter, from its claim of the name on (once:
    /// whoever takes them fails their tasks).
    pub fn lost(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>> {
        self.lost_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn report_lost(&self, dead: Vec<Vec<u8>>) {
        for message in dead {
            let _ = self.lost.send(message);
        }
    }

    /// The entry this presence keeps fresh.
    pub fn registration(&self) -> Arc<Registration> {
        self.registration.clone()
    }

    /// Refreshes the heartbeat (saying whether the worker is `fetching`), and returns lapsed
    /// workers' tasks, until `stop`.
    pub async fn run(mut self, fetching: impl Fn() -> bool, mut stop: Stopping) {
        let mut ticks = 0u64;
        // Look over the others about twice per lapse.
        let interval = heartbeat_interval(self.lapse);
        let reap_every = (self.lapse.as_millis() / 2 / interval.as_millis()).max(1) as u64;
        let mut steady = Steady::new(interval, self.lapse);
        loop {
            let asked = tokio::time::Instant::now();
            match self.registration.beat(fetching()).await {
                Ok(()) => steady.landed(asked, tokio::time::Instant::now()),
                Err(e) => {
                    steady.failed();
                    tracing::warn!("cannot refresh the heartbeat: {e}");
                }
            }
            if ticks.is_multiple_of(reap_every) && steady.may_judge(tokio::time::Instant::now()) {
                self.reap().await;
            }
            ticks += 1;
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }

    /// Returns the tasks of every other worker whose heartbeat lapsed.
    async fn reap(&mut self) {
        let entries: std::collections::HashMap<String, String> =
            match self.conn.hgetall(WORKERS).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::debug!("cannot read the worker registry: {e}");
                    return;
                }
            };
        let now = match redis_now_ms(&mut self.conn).await {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!("cannot read Redis's clock: {e}");
                return;
            }
        };
        for (node, entry) in entries {
            if node == self.node {
                continue;
            }
            let lapsed = serde_json::from_str::<Entry>(&entry)
                .map_or(true, |e| is_lapsed(now, e.hb, self.lapse));
            if !lapsed {
                continue;
            }
            match recover(&mut self.conn, &node, self.lapse, self.max_redeliveries).await {
                Ok(Some((returned, dead))) => {
                    tracing::warn!(
                        worker = %node, returned, dead_lettered = dead.len(),
                        "worker lapsed (no heartbeat for {} s): its unfinished tasks went back to their queues",
                        self.lapse.as_secs()
                    );
                    self.report_lost(dead);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(worker = %node, "cannot recover a lapsed worker's tasks: {e}")
                }
            }
        }
    }
}

/// Waits until no live worker holds the name `node` (logging why it waits), and returns a
/// dead predecessor's leftovers. False if a stop came first.
async fn take_name(
    conn: &mut Connection,
    node: &str,
    host: &str,
    (lapse, max_redeliveries): (Duration, u32),
    lost: &Lost,
    stop: &mut Stopping,
) -> Result<bool, RedisError> {
    let mut warned = false;
    loop {
        let current: Option<String> = conn.hget(WORKERS, node).await?;
        let holder = current.and_then(|e| serde_json::from_str::<Entry>(&e).ok());
        let stale = match &holder {
            None => true,
            Some(e) => {
                is_lapsed(redis_now_ms(conn).await?, e.hb, lapse)
                    || (e.host == host && !process_exists(e.pid))
            }
        };
        if stale {
            // Lapse 0: the previous holder is known to be gone.
            if holder.is_some()
                && let Some((returned, dead)) =
                    recover(conn, node, Duration::ZERO, max_redeliveries).await?
            {
                tracing::warn!(
                    node,
                    returned,
                    dead_lettered = dead.len(),
                    "a previous worker of this name died: its unfinished tasks went back to their queues"
                );
                for message in dead {
                    let _ = lost.send(message);
                }
            }
            return Ok(true);
        }
        if !warned {
            tracing::warn!(
                node,
                "another worker named {node} is running (its heartbeat is fresh): waiting for it \
                 to stop; give each worker its own name with -n"
            );
            warned = true;
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = crate::shutdown::stopped(stop) => return Ok(false),
        }
    }
}

/// Leaves the registry (after a clean stop, when nothing is left in flight).
pub async fn leave(conn: &mut Connection, node: &str) {
    let removed: Result<(), _> = conn.hdel(WORKERS, node).await;
    if let Err(e) = removed {
        tracing::warn!("cannot remove this worker from the registry: {e}");
    }
}

/// Milliseconds since the epoch by Redis's clock: every heartbeat is written and judged by
/// it, so no worker's clock is compared with another's.
async fn redis_now_ms(conn: &mut Connection) -> Result<i64, RedisError> {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

/// Whether a heartbeat written at `hb` is older than `lapse` at `now` (both on Redis's clock).
fn is_lapsed(now: i64, hb: i64, lapse: Duration) -> bool {
    now.saturating_sub(hb) >= i64::try_from(lapse.as_millis()).unwrap_or(i64::MAX)
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::Steady;
    use std::time::Duration;
    use tokio::time::Instant;

    const INTERVAL: Duration = Duration::from_millis(500);
    const LAPSE: Duration = Duration::from_secs(2);

    /// Beats landing every interval from `start` for `beats` beats, each taking `takes`; the
    /// time of the last.
    fn beat(steady: &mut Steady, start: Instant, beats: u32, takes: Duration) -> Instant {
        let mut at = start;
        for n in 0..beats {
            at = start + INTERVAL * n;
            steady.landed(at, at + takes);
        }
        at + takes
    }

    #[test]
    fn a_worker_judges_others_only_after_a_lapse_of_steady_beats() {
        let mut steady = Steady::new(INTERVAL, LAPSE);
        let start = Instant::now();
        assert!(!steady.may_judge(start), "before any beat");
        let last = beat(&mut steady, start, 4, Duration::ZERO);
        assert!(!steady.may_judge(last), "1.5 s of beats");
        let last = beat(&mut steady, start, 5, Duration::ZERO);
        assert!(steady.may_judge(last), "2 s of beats");
    }

    #[test]
    fn a_beat_that_waited_on_redis_holds_judgement_for_a_lapse() {
        let mut steady = Steady::new(INTERVAL, LAPSE);
        let start = Instant::now();
        let last = beat(&mut steady, start, 10, Duration::ZERO);
        assert!(steady.may_judge(last));
        // A pause of writes: the next beat lands 5 s after it was asked.
        let resumed = last + Duration::from_secs(5);
        steady.landed(last, resumed);
        assert!(!steady.may_judge(resumed));
        let after = beat(&mut steady, resumed + INTERVAL, 3, Duration::ZERO);
        assert!(!steady.may_judge(after), "1.5 s after Redis came back");
        let after = beat(&mut steady, resumed + INTERVAL, 4, Duration::ZERO);
        assert!(steady.may_judge(after), "a lapse after Redis came back");
    }

    #[test]
    fn a_failed_or_late_beat_holds_judgement_for_a_lapse() {
        let mut steady = Steady::new(INTERVAL, LAPSE);
        let start = Instant::now();
        let last = beat(&mut steady, start, 10, Duration::ZERO);
        steady.failed();
        assert!(!steady.may_judge(last), "after a failed beat");
        let back = last + Duration::from_secs(3);
        steady.landed(back, back);
        assert!(!steady.may_judge(back), "the first beat after the failure");
        // Beats resume, then one comes three intervals late (this worker stalled).
        let steady_again = beat(&mut steady, back, 5, Duration::ZERO);
        assert!(steady.may_judge(steady_again));
        let late = steady_again + INTERVAL * 3;
        steady.landed(late, late);
        assert!(!steady.may_judge(late), "a late beat");
        // And a judgement needs a beat just now, not a steady run long past.
        let quiet = late + LAPSE * 2;
        assert!(!steady.may_judge(quiet));
    }
}
