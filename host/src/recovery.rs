//! Worker liveness and crash recovery: nothing a dead worker had taken is lost.
//!
//! Every worker keeps an entry in the `taskhost:workers` hash (node name → heartbeat time, the
//! queue lists it fetches from, its process), refreshed every [`HEARTBEAT`] (or a quarter of the
//! lapse, if that is shorter, so one late beat never looks like a death). Every worker also
//! looks over the others: when a worker's heartbeat is older than the lapse, the [`RECOVER`]
//! script returns the messages in its in-flight lists to the lists they came from — re-checking
//! the lapse and removing the entry in the same atomic step, so it happens exactly once
//! whichever workers notice. A slow task on a live worker is never returned: only a lapsed
//! heartbeat counts.
//!
//! A message returned more than `max_redeliveries` times (it keeps killing its workers) goes
//! to the dead-letter list instead, so a poison task cannot take a fleet down one worker after
//! another. The count is kept per delivery tag (`taskhost:redelivered:<tag>`, expiring).
//!
//! A worker starting under a name whose entry is still fresh waits for it to lapse (two live
//! workers must not share a name, hence in-flight lists), unless that entry is a process of
//! this machine that no longer exists; it then returns its predecessor's leftovers at once.

use crate::broker::{BrokerError, DEAD_LETTER_KEY, inflight_prefix};
use crate::shutdown::Stopping;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// The registry of running workers.
pub const WORKERS_KEY: &str = "taskhost:workers";
/// How often a worker refreshes its entry, at most.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How often a worker with this `lapse` beats: often enough that several beats fit in a lapse.
pub fn heartbeat_interval(lapse: Duration) -> Duration {
    (lapse / 4).clamp(Duration::from_millis(100), HEARTBEAT)
}
/// How long a redelivery count is remembered.
const REDELIVERY_MEMORY_S: u64 = 7 * 86_400;
/// A worker that has not fetched for this long while it had room is not consuming.
const FETCH_STALL: Duration = Duration::from_secs(5);

/// One worker's entry in [`WORKERS_KEY`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Last heartbeat, milliseconds since the Unix epoch.
    pub hb: i64,
    /// Identifies one run of the worker.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The queue lists it fetches from (its in-flight lists are named after them).
    pub sources: Vec<String>,
    /// Whether it is consuming (see [`Health`]).
    pub fetching: bool,
}

/// Whether the fetch loop is working: it is waiting for a free slot, or it had a fetch answered
/// by Redis recently (an empty answer counts).
#[derive(Debug)]
pub struct Health {
    last_fetch_ms: AtomicI64,
    waiting_for_slot: AtomicBool,
}

impl Default for Health {
    /// Healthy from the start: the stall clock starts now.
    fn default() -> Self {
        Self {
            last_fetch_ms: AtomicI64::new(now_ms()),
            waiting_for_slot: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// A fetch was answered.
    pub fn fetched(&self) {
        self.last_fetch_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Whether every slot is busy (so not fetching is expected).
    pub fn set_waiting_for_slot(&self, waiting: bool) {
        self.waiting_for_slot.store(waiting, Ordering::Relaxed);
    }

    /// Whether the worker is consuming.
    pub fn is_fetching(&self) -> bool {
        self.waiting_for_slot.load(Ordering::Relaxed)
            || now_ms() - self.last_fetch_ms.load(Ordering::Relaxed)
                < i64::try_from(FETCH_STALL.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX)
}

/// Returns a lapsed worker's in-flight messages to their queues (or, past the redelivery
/// limit, to the dead-letter list) and removes its entry — only if its heartbeat is still
/// lapsed when the script runs. Answers {returned, dead-lettered}, or {-1, 0} if it is alive.
pub const RECOVER: &str = r"
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return {0, 0} end
local ok, w = pcall(cjson.decode, entry)
if ok and type(w) == 'table' and tonumber(ARGV[2]) - (tonumber(w.hb) or 0) < tonumber(ARGV[3]) then
  return {-1, 0}
end
local sources = {}
if ok and type(w) == 'table' and type(w.sources) == 'table' then sources = w.sources end
local returned, dead = 0, 0
for _, source in ipairs(sources) do
  local inflight = ARGV[4] .. source
  while true do
    -- Newest first, each to the consuming end: the oldest is served first again.
    local m = redis.call('LPOP', inflight)
    if not m then break end
    local tag, id, task = nil, nil, nil
    local decoded, env = pcall(cjson.decode, m)
    if decoded and type(env) == 'table' then
      if type(env.properties) == 'table' then tag = env.properties.delivery_tag end
      if type(env.headers) == 'table' then id = env.headers.id; task = env.headers.task end
    end
    local n = 1
    if type(tag) == 'string' then
      local key = 'taskhost:redelivered:' .. tag
      n = redis.call('INCR', key)
      redis.call('EXPIRE', key, ARGV[6])
    end
    if n > tonumber(ARGV[5]) then
      redis.call('LPUSH', KEYS[2], cjson.encode({
        reason = 'returned from ' .. (n - 1) .. ' workers that died running it: it may be what kills them',
        task_id = id, task = task, queue = source, worker = ARGV[1], time = ARGV[7], message = m}))
      dead = dead + 1
    else
      redis.call('RPUSH', source, m)
      returned = returned + 1
    end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return {returned, dead}
";

/// Runs [`RECOVER`] for `node`, whose heartbeat must be older than `lapse`.
pub async fn recover(
    conn: &mut ConnectionManager,
    node: &str,
    lapse: Duration,
    max_redeliveries: u32,
) -> Result<Option<(u64, u64)>, BrokerError> {
    let (returned, dead): (i64, i64) = Script::new(RECOVER)
        .key(WORKERS_KEY)
        .key(DEAD_LETTER_KEY)
        .arg(node)
        .arg(now_ms())
        .arg(u64::try_from(lapse.as_millis()).unwrap_or(u64::MAX))
        .arg(inflight_prefix(node))
        .arg(max_redeliveries)
        .arg(REDELIVERY_MEMORY_S)
        .arg(crate::protocol::format_time(time::OffsetDateTime::now_utc()))
        .invoke_async(conn)
        .await?;
    Ok((returned >= 0).then(|| {
        (
            u64::try_from(returned).unwrap_or(0),
            u64::try_from(dead).unwrap_or(0),
        )
    }))
}

/// A worker's entry in the registry, shared by its heartbeat and whatever changes the queues
/// it consumes: an entry is written whole, under the lock, so a heartbeat never writes back
/// sources older than those already written.
pub struct Registration {
    conn: ConnectionManager,
    node: String,
    entry: tokio::sync::Mutex<Entry>,
    /// When a heartbeat was last written (ms since the epoch).
    last_beat_ms: AtomicI64,
}

impl Registration {
    /// Writes the entry with a fresh heartbeat.
    async fn beat(&self, fetching: bool) -> Result<(), BrokerError> {
        let mut entry = self.entry.lock().await;
        entry.hb = now_ms();
        entry.fetching = fetching;
        self.write(&entry).await?;
        self.last_beat_ms.store(entry.hb, Ordering::Relaxed);
        Ok(())
    }

    async fn write(&self, entry: &Entry) -> Result<(), BrokerError> {
        let json = serde_json::to_string(entry).unwrap_or_default();
        let () = self
            .conn
            .clone()
            .hset(WORKERS_KEY, &self.node, json)
            .await?;
        Ok(())
    }

    /// Adds lists this worker may fetch from, and writes them before it does: recovery returns
    /// the in-flight lists of the sources written here, so a source must be written before a
    /// message can be in its list. Sources are never removed while the worker runs (a queue no
    /// longer consumed may still have messages in flight).
    ///
    /// # Errors
    /// When Redis does not take the entry; the sources are then not to be fetched from.
    pub async fn add_sources(&self, sources: &[String]) -> Result<(), BrokerError> {
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
pub struct Presence {
    conn: ConnectionManager,
    node: String,
    registration: Arc<Registration>,
    lapse: Duration,
    max_redeliveries: u32,
}

impl Presence {
    /// Takes the name `node`: waits while a live worker holds it (logging why), returns the
    /// leftovers of a dead predecessor, and registers this worker.
    ///
    /// # Errors
    /// When Redis fails; or `None` if a stop was asked for while waiting.
    pub async fn claim(
        mut conn: ConnectionManager,
        node: &str,
        sources: Vec<String>,
        lapse: Duration,
        max_redeliveries: u32,
        stop: &mut Stopping,
    ) -> Result<Option<Self>, BrokerError> {
        let host = crate::node::machine_hostname();
        let mut warned = false;
        loop {
            let current: Option<String> = conn.hget(WORKERS_KEY, node).await?;
            let holder = current.and_then(|e| serde_json::from_str::<Entry>(&e).ok());
            let stale = match &holder {
                None => true,
                Some(e) => {
                    now_ms() - e.hb >= i64::try_from(lapse.as_millis()).unwrap_or(i64::MAX)
                        || (e.host == host && !process_exists(e.pid))
                }
            };
            if stale {
                if holder.is_some() {
                    // Lapse 0: the previous holder is known to be gone.
                    if let Some((returned, dead)) =
                        recover(&mut conn, node, Duration::ZERO, max_redeliveries).await?
                    {
                        tracing::warn!(
                            node,
                            returned,
                            dead_lettered = dead,
                            "a previous worker of this name died: its unfinished tasks went back to their queues"
                        );
                    }
                }
                break;
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
                () = crate::shutdown::stopped(stop) => return Ok(None),
            }
        }
        let entry = Entry {
            hb: now_ms(),
            instance: uuid::Uuid::new_v4().to_string(),
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
        }))
    }

    /// The entry this presence keeps fresh.
    pub fn registration(&self) -> Arc<Registration> {
        self.registration.clone()
    }

    /// Refreshes the heartbeat, and returns lapsed workers' tasks, until `stop`; logs when the
    /// worker stops or resumes consuming.
    pub async fn run(mut self, health: Arc<Health>, mut stop: Stopping) {
        // Watched apart from the heartbeat, whose Redis calls a stalled Redis holds up.
        tokio::spawn(watch_health(health.clone(), stop.clone()));
        let mut ticks = 0u64;
        // Look over the others about twice per lapse.
        let interval = heartbeat_interval(self.lapse);
        let reap_every = (self.lapse.as_millis() / 2 / interval.as_millis()).max(1) as u64;
        loop {
            if let Err(e) = self.registration.beat(health.is_fetching()).await {
                tracing::warn!("cannot refresh the heartbeat: {e}");
            }
            if ticks.is_multiple_of(reap_every) {
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
            match self.conn.hgetall(WORKERS_KEY).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::debug!("cannot read the worker registry: {e}");
                    return;
                }
            };
        let lapse_ms = i64::try_from(self.lapse.as_millis()).unwrap_or(i64::MAX);
        for (node, entry) in entries {
            if node == self.node {
                continue;
            }
            let lapsed =
                serde_json::from_str::<Entry>(&entry).map_or(true, |e| now_ms() - e.hb >= lapse_ms);
            if !lapsed {
                continue;
            }
            match recover(&mut self.conn, &node, self.lapse, self.max_redeliveries).await {
                Ok(Some((returned, dead))) => tracing::warn!(
                    worker = %node, returned, dead_lettered = dead,
                    "worker lapsed (no heartbeat for {} s): its unfinished tasks went back to their queues",
                    self.lapse.as_secs()
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(worker = %node, "cannot recover a lapsed worker's tasks: {e}")
                }
            }
        }
    }
}

/// Leaves the registry (after a clean stop, when nothing is left in flight).
pub async fn leave(conn: &mut ConnectionManager, node: &str) {
    let removed: Result<(), _> = conn.hdel(WORKERS_KEY, node).await;
    if let Err(e) = removed {
        tracing::warn!("cannot remove this worker from the registry: {e}");
    }
}

/// Logs when the worker stops consuming, and when it resumes.
async fn watch_health(health: Arc<Health>, mut stop: Stopping) {
    let mut fetching = true;
    loop {
        let now_fetching = health.is_fetching();
        if now_fetching != fetching {
            if now_fetching {
                tracing::info!("fetching again");
            } else {
                tracing::warn!(
                    "not fetching: Redis has answered no fetch for {} s while slots are free",
                    FETCH_STALL.as_secs()
                );
            }
            fetching = now_fetching;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
