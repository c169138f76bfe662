//! The worker: fetch → run → settle, with at most `concurrency` tasks running, and a clean stop.
//!
//! Fetching: a non-blocking Lua fetch takes messages in kombu's priority order into the
//! in-flight list; when the queues are empty, one waker per queue list blocks on `BLMOVE` (which
//! also moves atomically), so an idle worker answers a new task at once without polling.
//! Settling: every outcome ends in the result backend and removes the message from the
//! in-flight list; a message that cannot be run goes to the dead-letter list, never nowhere.
//! A message whose `eta` is in the future waits in the delayed set, which every worker drains.

use crate::broker::{Broker, BrokerError, Delivery};
use crate::config::{FileConfig, GrantTable, TaskSection};
use crate::control::Revocations;
use crate::lock;
use crate::plugins::cache::Cache;
use crate::plugins::live::Live;
use crate::plugins::{Plugin, TaskSpec};
use crate::protocol::{self, Exception, State, TaskMessage};
use crate::recovery::{Health, Presence};

mod remote;
use crate::events::Events;
use crate::metrics::{Metrics, TaskOutcome};
use crate::ratelimit::RateLimits;
use crate::recovery::Registration;
use crate::results::Backend;
use crate::sandbox::{Outcome, Progress, Sandbox, SandboxOptions, Scope, Task};
use crate::settler::Settler;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

/// Operator overrides of tasks' declared retry settings, by task name.
pub type TaskOverrides = Arc<HashMap<String, TaskSection>>;
use tokio::task::JoinSet;

/// (soft, hard) time limits in seconds, as remote control sets them.
type SetTimeLimits = (Option<f64>, Option<f64>);

/// Celery's default `max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Everything a worker needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub node: String,
    pub queues: Vec<String>,
    pub concurrency: usize,
    /// Unstarted messages held per slot, at most (Celery's `worker_prefetch_multiplier`).
    pub prefetch_multiplier: usize,
    pub broker_url: String,
    pub backend_url: String,
    pub result_expires: u64,
    pub plugins_dir: PathBuf,
    pub grants: GrantTable,
    /// The config file in use, watched for changes to the grants.
    pub config_path: Option<PathBuf>,
    /// The precompile cache directory, if any.
    pub cache_dir: Option<PathBuf>,
    /// Follow fleet deploys published through the broker.
    pub fleet: bool,
    /// The WebAssembly stack of every instance.
    pub stack_bytes: usize,
    /// A worker whose heartbeat is older than this is taken for dead.
    pub heartbeat_lapse: Duration,
    /// Returns from dead workers after which a message is dead-lettered.
    pub max_redeliveries: u32,
    /// `[tasks."NAME"]` sections.
    pub task_overrides: TaskOverrides,
    /// How long running tasks may take to finish once a stop is asked for.
    pub shutdown_grace: Duration,
    /// Send Celery's monitoring events from the start.
    pub task_events: bool,
    /// Where to serve /metrics and /healthz.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// What every task handler shares.
struct Shared {
    config: WorkerConfig,
    started: Instant,
    sandbox: Arc<Sandbox>,
    plugins: Arc<Live>,
    broker: Broker,
    backend: Backend,
    settler: Settler,
    grants: Arc<ArcSwap<GrantTable>>,
    node: String,
    overrides: TaskOverrides,
    /// Wakes the delayed-set mover when a message is scheduled.
    scheduled: Notify,
    revocations: Arc<Revocations>,
    health: Arc<Health>,
    /// Deliveries being handled, so a stop that cannot wait for them can return them, and
    /// when each began (seconds since the epoch), for `inspect active`.
    running: Mutex<HashMap<u64, (Delivery, f64)>>,
    /// Fetched and not started, in order.
    reserved: Mutex<VecDeque<Delivery>>,
    /// The queues consumed now (remote control changes them).
    queues: watch::Sender<Vec<String>>,
    /// This worker's registry entry, whose sources name the in-flight lists recovery returns.
    registration: Arc<Registration>,
    /// Free task slots; the pool's size is `concurrency`.
    slots: Arc<Semaphore>,
    concurrency: std::sync::atomic::AtomicUsize,
    /// Asks the worker to stop (remote control's `shutdown`).
    stop_tx: watch::Sender<bool>,
    rate_limits: RateLimits,
    /// Time limits set by remote control, per task.
    time_limits: Mutex<HashMap<String, SetTimeLimits>>,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
    /// Instances running per plugin, for its `max_instances`.
    instances: Mutex<HashMap<Arc<str>, u32>>,
    next_id: AtomicU64,
}

/// Runs a worker until `shutdown` completes, then stops fetching, lets running tasks finish
/// (up to the grace period, or until `force` completes), and returns unstarted and unfinished
/// messages to their queues.
///
/// # Errors
/// When the plugin directory cannot be read, or Redis fails at start in a way retrying cannot
/// mend (a refused password, say). An unreachable Redis is waited for, with a log line.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    force: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // A stop is a flag every loop watches, so that no Redis call that moves messages is ever
    // cancelled half-way (its messages would be moved with nobody to handle them).
    let (stop_tx, mut stop) = crate::shutdown::flag();
    let signalled = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signalled.send(true);
    });
    let slots = u32::try_from(config.concurrency)
        .unwrap_or(u32::MAX)
        .saturating_add(2);
    let sandbox = Arc::new(Sandbox::new(&SandboxOptions {
        max_instances: slots,
        max_memory_bytes: config.grants.max_memory_bytes(),
        max_table_elements: config.grants.max_table_elements(),
        stack_bytes: config.stack_bytes,
    })?);
    let Some(broker) = connect(&config, &mut stop, || {
        Broker::connect(&config.broker_url, &config.node)
    })
    .await?
    else {
        return Ok(());
    };
    let Some(backend) = connect(&config, &mut stop, || {
        Backend::connect(&config.backend_url, config.result_expires)
    })
    .await?
    else {
        return Ok(());
    };
    warn_if_redis_evicts(&mut broker.connection()).await;
    let rate_limits = RateLimits::new(&config.task_overrides)?;
    let sources = crate::broker::source_keys(&config.queues);
    let Some(presence) = Presence::claim(
        broker.connection(),
        &config.node,
        sources,
        config.heartbeat_lapse,
        config.max_redeliveries,
        &mut stop,
    )
    .await?
    else {
        return Ok(());
    };
    let cache = config.cache_dir.as_deref().and_then(|dir| match Cache::new(dir) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "precompile cache unusable, compiling every load: {e}");
            None
        }
    });
    let grants = Arc::new(ArcSwap::from_pointee(config.grants.clone()));
    let plugins =
        Arc::new(Live::open(sandbox.clone(), cache, &config.plugins_dir, grants.clone()).await?);
    let settler = Settler::start(
        broker.clone(),
        backend.clone(),
        config.broker_url == config.backend_url,
    );
    let metrics = Arc::new(Metrics::default());
    let events = Events::start(
        broker.client(),
        broker.connection(),
        &config.node,
        config.task_events,
        metrics.clone(),
    );
    let shared = Arc::new(Shared {
        config: config.clone(),
        started: Instant::now(),
        reserved: Mutex::new(VecDeque::new()),
        queues: watch::channel(config.queues.clone()).0,
        registration: presence.registration(),
        slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
        concurrency: std::sync::atomic::AtomicUsize::new(config.concurrency.max(1)),
        stop_tx,
        rate_limits,
        time_limits: Mutex::new(HashMap::new()),
        metrics,
        events,
        sandbox,
        plugins,
        broker,
        backend,
        settler,
        grants,
        node: config.node.clone(),
        overrides: config.task_overrides.clone(),
        scheduled: Notify::new(),
        running: Mutex::new(HashMap::new()),
        instances: Mutex::new(HashMap::new()),
        revocations: Arc::new(Revocations::default()),
        health: Arc::new(Health::default()),
        next_id: AtomicU64::new(0),
    });
    // The heartbeat outlives the stop: it must go on while running tasks finish, or other
    // workers would take them for a dead worker's and run them again.
    let (gone_tx, gone) = crate::shutdown::flag();
    let beats = tokio::spawn(remote::heartbeats(shared.clone(), gone.clone()));
    let heartbeat = tokio::spawn(presence.run(shared.health.clone(), gone));
    let _watcher = crate::plugins::watcher::watch(
        shared.plugins.clone(),
        config.config_path.clone(),
        config_reloader(&shared, config.config_path.clone()),
        stop.clone(),
    )?;
    tokio::spawn(crate::deploy::report_running(
        shared.broker.connection(),
        config.node.clone(),
        shared.plugins.clone(),
        stop.clone(),
    ));
    if config.fleet {
        tokio::spawn(crate::deploy::follow(
            shared.broker.client().clone(),
            shared.broker.connection(),
            config.plugins_dir.clone(),
            stop.clone(),
        ));
    }
    let control = crate::control::subscribe(shared.broker.client()).await?;
    tokio::spawn(crate::control::serve(
        shared.broker.client().clone(),
        control,
        shared.broker.connection(),
        remote::context(&shared),
        stop.clone(),
    ));
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for /metrics on {addr}"))?;
        tracing::info!(addr = %listener.local_addr().map_or(addr, |a| a), "serving /metrics and /healthz");
        tokio::spawn(crate::endpoint::serve(
            listener,
            Arc::new(remote::Status(shared.clone())),
            stop.clone(),
        ));
    }
    // Changes made while the directory was first loaded, before the watch began.
    shared.plugins.rescan().await;
    let mover = tokio::spawn(move_due_messages(shared.clone(), stop.clone()));
    let registry = shared.plugins.registry();
    tracing::info!(
        node = %config.node,
        broker = %crate::broker::redact(&config.broker_url),
        queues = %config.queues.join(","),
        concurrency = config.concurrency,
        plugins = registry.plugins().count(),
        refused = shared.plugins.refused().len(),
        tasks = %registry.task_names().join(","),
        fleet = config.fleet,
        "worker ready"
    );
    let mut fetcher = Fetcher::start(&shared, stop.clone());
    let semaphore = shared.slots.clone();
    let mut tasks = JoinSet::new();

    loop {
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!("task handler ended abnormally: {e}");
            }
        }
        shared
            .health
            .set_waiting_for_slot(semaphore.available_permits() == 0);
        let permit = tokio::select! {
            permit = semaphore.clone().acquire_owned() => permit.context("semaphore closed")?,
            () = crate::shutdown::stopped(&mut stop) => break,
        };
        shared.health.set_waiting_for_slot(false);
        // Fetched in batches (fewer Redis calls per task), at most the prefetch allowance
        // beyond the free slots: what is fetched waits in the in-flight list, safe, but
        // unavailable to other workers.
        let batch = (semaphore.available_permits() + 1).max(
            shared
                .concurrency
                .load(Ordering::Relaxed)
                .saturating_mul(config.prefetch_multiplier),
        );
        let Some(delivery) = fetcher.next(batch).await else {
            break;
        };
        // Known as running before the handler starts, so a reconciliation in between does not
        // take it for an orphan.
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&shared.running).insert(id, (delivery.clone(), crate::events::now_s()));
        let shared = shared.clone();
        tasks.spawn(async move {
            handle(&shared, &delivery).await;
            lock(&shared.running).remove(&id);
            drop(permit);
        });
    }

    tracing::info!(
        running = lock(&shared.running).len(),
        grace_s = config.shutdown_grace.as_secs_f64(),
        "stopping: no new tasks; waiting for running ones (a second signal stops them at once)"
    );
    let unstarted = fetcher.stop().await;
    let finished = tokio::select! {
        finished = tokio::time::timeout(config.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        }) => finished.is_ok(),
        () = force => false,
    };
    if !finished {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let unfinished: Vec<Delivery> = lock(&shared.running).drain().map(|(_, (d, _))| d).collect();
    let returned = unstarted.len() + unfinished.len();
    let mut all_returned = true;
    for delivery in unstarted.iter().chain(&unfinished) {
        if let Err(e) = shared.broker.requeue(delivery).await {
            all_returned = false;
            tracing::error!(
                "could not return a message to {}: {e}; it stays in {} until another worker \
                 returns it",
                delivery.source,
                shared.broker.inflight_key(&delivery.source)
            );
        }
    }
    mover.abort();
    let _ = gone_tx.send(true);
    let _ = heartbeat.await;
    let _ = beats.await;
    if all_returned {
        crate::recovery::leave(&mut shared.broker.connection(), &config.node).await;
    }
    tracing::info!(returned_to_queue = returned, "worker stopped");
    Ok(())
}

/// Connects with `open`, retrying with backoff (and saying so) while Redis is unreachable;
/// none if a stop comes first.
async fn connect<T, F: Future<Output = Result<T, BrokerError>>>(
    config: &WorkerConfig,
    stop: &mut crate::shutdown::Stopping,
    mut open: impl FnMut() -> F,
) -> anyhow::Result<Option<T>> {
    let mut failures = 0u32;
    loop {
        match open().await {
            Ok(connected) => {
                if failures > 0 {
                    tracing::info!("Redis is reachable again");
                }
                return Ok(Some(connected));
            }
            Err(e @ BrokerError::Url { .. }) => return Err(e.into()),
            Err(e) => {
                failures += 1;
                let pause = backoff(failures);
                tracing::error!(
                    broker = %crate::broker::redact(&config.broker_url),
                    "Redis is not reachable (retrying in {pause:?}): {e}"
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = crate::shutdown::stopped(stop) => return Ok(None),
                }
            }
        }
    }
}

/// Warns when Redis may evict keys when full: queued tasks have no expiry, and an `allkeys-*`
/// policy drops them silently.
async fn warn_if_redis_evicts(conn: &mut redis::aio::ConnectionManager) {
    let policy: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    if let Ok(policy) = policy
        && let Some(value) = policy.get(1)
        && value.starts_with("allkeys-")
    {
        tracing::warn!(
            "Redis maxmemory-policy is {value}: when Redis is full it evicts any key, queued tasks \
             included, without a trace; set maxmemory-policy noeviction (or volatile-*)"
        );
    }
}

/// Re-reads the config file when it changes: a valid one replaces the grants for the tasks
/// that start from then on; an invalid one is refused with the reason, and the old one stays.
fn config_reloader(shared: &Arc<Shared>, path: Option<PathBuf>) -> impl Fn() + Send + 'static {
    let grants = shared.grants.clone();
    let max_memory = shared.sandbox.max_memory_bytes();
    let max_table = shared.sandbox.max_table_elements();
    move || {
        let Some(path) = &path else { return };
        let loaded = FileConfig::load(Some(path))
            .map_err(anyhow::Error::from)
            .and_then(|(file, _)| Ok(file.grants(&|var| std::env::var(var).ok())?));
        match loaded {
            Ok(table) if table.max_memory_bytes() > max_memory => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: a memory limit above the \
                 {} MiB this worker started with needs a restart",
                max_memory >> 20
            ),
            Ok(table) if table.max_table_elements() > max_table => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: a table limit above the \
                 {max_table} elements this worker started with needs a restart"
            ),
            Ok(table) => {
                grants.store(Arc::new(table));
                tracing::info!(file = %path.display(), "config reloaded: new grants apply to tasks starting now");
            }
            Err(e) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: {e:#}"
            ),
        }
    }
}

/// Takes messages: first from what the wakers already moved, then the Lua fetch, then (when
/// every queue is empty) by arming the wakers and waiting.
/// The queues consumed can change at run time (`add_consumer`, `cancel_consumer`): the keys are
/// recomputed then, and a waker is started for every key that never had one.
struct Fetcher {
    shared: Arc<Shared>,
    keys: Vec<String>,
    queues: watch::Receiver<Vec<String>>,
    from_wakers: mpsc::Receiver<Delivery>,
    to_fetcher: mpsc::Sender<Delivery>,
    armed: watch::Sender<bool>,
    wakers: JoinSet<()>,
    waking: std::collections::HashSet<String>,
    state: Arc<FetchState>,
    stop: watch::Receiver<bool>,
}

/// What the fetcher and its wakers share.
#[derive(Default)]
struct FetchState {
    /// Blocking fetches sent to Redis and not answered yet.
    outstanding: std::sync::atomic::AtomicUsize,
    /// A fetch failed after it may have moved messages: its answer, naming them, was lost (a
    /// killed connection, say), so messages may sit in the in-flight lists with nobody
    /// handling them until the lists are reconciled.
    lost_reply: std::sync::atomic::AtomicBool,
}

impl Fetcher {
    fn start(shared: &Arc<Shared>, stop: watch::Receiver<bool>) -> Self {
        let (to_fetcher, from_wakers) = mpsc::channel(16);
        let mut fetcher = Self {
            shared: shared.clone(),
            keys: Vec::new(),
            queues: shared.queues.subscribe(),
            from_wakers,
            to_fetcher,
            armed: watch::channel(false).0,
            wakers: JoinSet::new(),
            waking: std::collections::HashSet::new(),
            state: Arc::new(FetchState::default()),
            stop,
        };
        fetcher.follow_queues();
        fetcher
    }

    /// Takes up the queues consumed now.
    fn follow_queues(&mut self) {
        self.keys = crate::broker::source_keys(&self.queues.borrow_and_update());
        for key in &self.keys {
            if self.waking.insert(key.clone()) {
                self.wakers.spawn(waker(
                    self.shared.clone(),
                    self.state.clone(),
                    key.clone(),
                    self.armed.subscribe(),
                    self.stop.clone(),
                    self.to_fetcher.clone(),
                ));
            }
        }
    }

    /// The next message, or none once a stop is asked for; `room` is how many could start now.
    async fn next(&mut self, room: usize) -> Option<Delivery> {
        let mut failures = 0u32;
        loop {
            if crate::shutdown::is_stopping(&self.stop) {
                return None;
            }
            if self.state.lost_reply.load(Ordering::SeqCst) && !self.reconcile().await {
                failures += 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff(failures)) => {}
                    () = crate::shutdown::stopped(&mut self.stop) => return None,
                }
                continue;
            }
            if self.queues.has_changed().unwrap_or(false) {
                self.follow_queues();
            }
            {
                let mut buffered = lock(&self.shared.reserved);
                while let Ok(d) = self.from_wakers.try_recv() {
                    buffered.push_back(d);
                }
                if let Some(d) = buffered.pop_front() {
                    return Some(d);
                }
            }
            match self.shared.broker.fetch(&self.keys, room).await {
                Ok(fetched) if !fetched.is_empty() => {
                    failures = 0;
                    self.shared.health.fetched();
                    lock(&self.shared.reserved).extend(fetched);
                }
                Ok(_) => {
                    failures = 0;
                    self.shared.health.fetched();
                    self.armed.send_replace(true);
                    let woken = tokio::select! {
                        woken = self.from_wakers.recv() => woken.map(Some),
                        // The queues changed: follow them, then fetch from the new set.
                        _ = self.queues.changed() => Some(None),
                        () = crate::shutdown::stopped(&mut self.stop) => None,
                    };
                    self.armed.send_replace(false);
                    match woken {
                        Some(Some(d)) => return Some(d),
                        Some(None) => self.follow_queues(),
                        None => {}
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.state.lost_reply.store(true, Ordering::SeqCst);
                    let pause = backoff(failures);
                    tracing::error!("fetching from the broker failed (retrying in {pause:?}): {e}");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = crate::shutdown::stopped(&mut self.stop) => return None,
                    }
                }
            }
        }
    }

    /// After a lost fetch answer: with no fetch under way, returns every message of this
    /// worker's in-flight lists that it is not handling to its queue. True once done.
    async fn reconcile(&mut self) -> bool {
        self.armed.send_replace(false);
        let quiet_by = Instant::now() + crate::broker::BLOCK_TIMEOUT * 3 + Duration::from_secs(10);
        while self.state.outstanding.load(Ordering::SeqCst) > 0 && Instant::now() < quiet_by {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let known: std::collections::HashSet<Vec<u8>> = {
            let mut buffered = lock(&self.shared.reserved);
            while let Ok(d) = self.from_wakers.try_recv() {
                buffered.push_back(d);
            }
            buffered
                .iter()
                .map(|d| d.raw.clone())
                .chain(
                    lock(&self.shared.running)
                        .values()
                        .map(|(d, _)| d.raw.clone()),
                )
                .collect()
        };
        let sources = self.shared.registration.sources().await;
        let held = match self.shared.broker.in_flight(&sources).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!("cannot read the in-flight lists to reconcile them: {e}");
                return false;
            }
        };
        let mut returned = 0;
        for orphan in held.iter().filter(|d| !known.contains(&d.raw)) {
            if let Err(e) = self.shared.broker.requeue(orphan).await {
                tracing::warn!(
                    "cannot return an orphaned message to {}: {e}",
                    orphan.source
                );
                return false;
            }
            returned += 1;
        }
        if returned > 0 {
            tracing::warn!(
                returned,
                "a fetch answer was lost with its connection: the messages it moved went back to their queues"
            );
        }
        self.state.lost_reply.store(false, Ordering::SeqCst);
        true
    }

    /// Stops the wakers and returns what was fetched but not started.
    async fn stop(mut self) -> Vec<Delivery> {
        self.armed.send_replace(false);
        while self.wakers.join_next().await.is_some() {}
        let mut buffered = lock(&self.shared.reserved);
        while let Ok(d) = self.from_wakers.try_recv() {
            buffered.push_back(d);
        }
        buffered.drain(..).collect()
    }
}

/// Blocks on one queue list while armed, handing what it moves to the fetcher.
async fn waker(
    shared: Arc<Shared>,
    state: Arc<FetchState>,
    key: String,
    mut armed: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<Delivery>,
) {
    let broker = &shared.broker;
    let queue = crate::broker::queue_of(&key).to_owned();
    let mut consumed = shared.queues.subscribe();
    let mut conn = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            r = armed.wait_for(|a| *a) => if r.is_err() { return },
            () = crate::shutdown::stopped(&mut stop) => return,
        }
        if crate::shutdown::is_stopping(&stop) {
            return;
        }
        // A queue no longer consumed (cancel_consumer): wait until it is again.
        if !consumed.borrow_and_update().contains(&queue) {
            tokio::select! {
                r = consumed.changed() => if r.is_err() { return },
                () = crate::shutdown::stopped(&mut stop) => return,
            }
            continue;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match broker.blocking_connection().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(queue = %key, "cannot open a blocking connection: {e}");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            },
        };
        state.outstanding.fetch_add(1, Ordering::SeqCst);
        let fetched = broker.blocking_fetch(c, &key).await;
        match fetched {
            Ok(Some(delivery)) => {
                failures = 0;
                shared.health.fetched();
                // Handed over before it stops counting as outstanding, so a reconciliation
                // finds it in the channel.
                let sent = tx.send(delivery).await;
                state.outstanding.fetch_sub(1, Ordering::SeqCst);
                if let Err(mpsc::error::SendError(d)) = sent {
                    let _ = broker.requeue(&d).await;
                    return;
                }
            }
            Ok(None) => {
                failures = 0;
                shared.health.fetched();
                state.outstanding.fetch_sub(1, Ordering::SeqCst);
            }
            Err(e) => {
                failures += 1;
                state.lost_reply.store(true, Ordering::SeqCst);
                state.outstanding.fetch_sub(1, Ordering::SeqCst);
                conn = None;
                tracing::warn!(queue = %key, "blocking fetch failed: {e}");
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

/// 100 ms doubling up to 5 s, for retrying the broker.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6)).min(5_000))
}

/// Moves due messages from the delayed set to their queues, waking when the next is due.
async fn move_due_messages(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let now = now_ms();
        let wait = match shared.broker.move_due(now).await {
            Ok((moved, next)) => {
                if moved > 0 {
                    tracing::debug!(moved, "moved due messages to their queues");
                }
                next.map_or(1_000, |due| (due - now).clamp(0, 1_000))
            }
            Err(e) => {
                tracing::warn!("moving due messages failed: {e}");
                1_000
            }
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))) => {}
            () = shared.scheduled.notified() => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Milliseconds since the Unix epoch, `after` from now.
pub fn deadline_ms(after: Duration) -> u64 {
    u64::try_from(now_ms())
        .unwrap_or(0)
        .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Handles one delivery from decode to settlement.
async fn handle(shared: &Shared, delivery: &Delivery) {
    let message = match TaskMessage::decode(&delivery.raw) {
        Ok(m) => m,
        Err(bad) => {
            let reason = format!("undecodable message: {}", bad.error);
            let exc = Exception::new("DecodeError", reason.clone());
            refuse(
                shared,
                delivery,
                bad.task_id.as_deref(),
                bad.task_name.as_deref(),
                &exc,
                &reason,
            )
            .await;
            return;
        }
    };
    shared.events.task("task-received", &message.id, |e| {
        e.insert("name".into(), message.task.clone().into());
        e.insert("args".into(), message.args_repr().into());
        e.insert("kwargs".into(), message.kwargs_repr().into());
        e.insert("root_id".into(), message.root_id.clone().into());
        e.insert("parent_id".into(), message.parent_id.clone().into());
        e.insert("retries".into(), message.retries.into());
        e.insert("eta".into(), message.eta.map(protocol::format_time).into());
        e.insert(
            "expires".into(),
            message.expires.map(protocol::format_time).into(),
        );
    });
    let now = OffsetDateTime::now_utc();
    if message.expires.is_some_and(|e| e <= now) {
        finish_revoked(
            shared,
            delivery,
            &message,
            "expired",
            "expired before it ran",
        )
        .await;
        return;
    }
    if shared.revocations.is_revoked(&message.id) {
        finish_revoked(
            shared,
            delivery,
            &message,
            "revoked",
            "revoked before it ran",
        )
        .await;
        return;
    }
    if let Some(eta) = message.eta.filter(|eta| *eta > now) {
        let due = i64::try_from(eta.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        postpone(shared, delivery, due, "schedule a message with an eta").await;
        tracing::debug!(task_id = %message.id, task = %message.task, eta = %protocol::format_time(eta), "scheduled");
        return;
    }
    let resolved = shared
        .plugins
        .registry()
        .resolve(&message.task)
        .map(|(plugin, spec)| (plugin.clone(), spec.clone()));
    let Some((plugin, spec)) = resolved else {
        let exc = Exception::new("NotRegistered", message.task.clone());
        let reason = format!("task {:?} is not served by any plugin", message.task);
        refuse(
            shared,
            delivery,
            Some(&message.id),
            Some(&message.task),
            &exc,
            &reason,
        )
        .await;
        return;
    };
    if let Some(wait) = shared
        .rate_limits
        .acquire(&message.task, spec.defaults.rate_limit.as_deref())
    {
        // Over its rate: it waits its turn in the delayed set, not in a worker slot.
        let due = now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        postpone(
            shared,
            delivery,
            due,
            "reschedule a task over its rate limit",
        )
        .await;
        tracing::debug!(task_id = %message.id, wait_s = wait.as_secs_f64(), "task over its rate limit; rescheduled");
        return;
    }
    let Some(_instance) = InstanceSlot::take(shared, &plugin.name) else {
        // The plugin runs as many instances as it may: this one waits its turn in the delayed
        // set (not in a worker slot, which tasks of other plugins can use meanwhile).
        let due = now_ms() + 200;
        postpone(
            shared,
            delivery,
            due,
            "reschedule a task over its plugin's max_instances",
        )
        .await;
        tracing::debug!(task_id = %message.id, plugin = %plugin.name, "plugin at max_instances; task rescheduled");
        return;
    };
    let started = Instant::now();
    shared.events.task("task-started", &message.id, |_| {});
    let terminated = shared.revocations.started(&message.id);
    let outcome = tokio::select! {
        outcome = run_task(shared, &plugin, &spec, &message) => Some(outcome),
        Ok(()) = terminated => None,
    };
    shared.revocations.finished(&message.id);
    let Some(outcome) = outcome else {
        finish_revoked(
            shared,
            delivery,
            &message,
            "terminated",
            "terminated by a revoke",
        )
        .await;
        return;
    };
    let policy = RetryPolicy::of(&spec, shared.overrides.get(&message.task));
    let runtime = started.elapsed().as_secs_f64();
    let log = |outcome: &str| {
        tracing::info!(
            task_id = %message.id, task = %message.task, plugin = %plugin.name,
            version = %plugin.version, runtime_s = runtime, "task {outcome}"
        );
    };
    if let Outcome::Failure(exc) = &outcome
        && let Some(limit) = limit_hit(&exc.kind)
    {
        shared.metrics.limit_hit(&plugin.name, limit);
    }
    match outcome {
        // Checked to be JSON, not parsed: the plugin's text is stored as it is.
        Outcome::Success(json) => match serde_json::from_str::<&RawValue>(&json) {
            Ok(value) => {
                log("succeeded");
                shared
                    .metrics
                    .task(&message.task, TaskOutcome::Succeeded, Some(runtime));
                shared.events.task("task-succeeded", &message.id, |e| {
                    let result = crate::pyrepr::python_repr(&protocol::parse(value));
                    e.insert("result".into(), result.into());
                    e.insert("runtime".into(), runtime.into());
                });
                finish(shared, delivery, &message, State::Success, value, None).await;
            }
            Err(e) => {
                let exc =
                    Exception::new("EncodeError", format!("plugin returned invalid JSON: {e}"));
                fail(shared, delivery, &message, &exc, Some(runtime)).await;
            }
        },
        Outcome::Failure(exc) if policy.autoretry_for.contains(&exc.kind) => {
            retry(shared, delivery, &message, &policy, None, exc, runtime).await;
        }
        Outcome::Failure(exc) => {
            log("failed");
            fail(shared, delivery, &message, &exc, Some(runtime)).await;
        }
        Outcome::Retry { countdown, reason } => {
            retry(
                shared, delivery, &message, &policy, countdown, reason, runtime,
            )
            .await;
        }
        Outcome::Reject(reason) => {
            log("rejected");
            let exc = Exception::new("Reject", reason.clone());
            let reason = format!("rejected by plugin {}: {reason}", plugin.name);
            refuse(
                shared,
                delivery,
                Some(&message.id),
                Some(&message.task),
                &exc,
                &reason,
            )
            .await;
        }
    }
}

/// Settles `delivery` by moving its message, unchanged, to the delayed set until `due_ms`
/// (retrying until Redis takes it; `what` names the step in the log), and wakes the mover.
async fn postpone(shared: &Shared, delivery: &Delivery, due_ms: i64, what: &str) {
    retrying(what, || {
        shared
            .broker
            .ack_and_schedule(delivery, &delivery.source, &delivery.raw, Some(due_ms))
    })
    .await;
    shared.scheduled.notify_one();
}

/// One running instance of a plugin, counted against its `max_instances` until dropped.
struct InstanceSlot<'a> {
    shared: &'a Shared,
    plugin: Arc<str>,
}

impl<'a> InstanceSlot<'a> {
    fn take(shared: &'a Shared, plugin: &Arc<str>) -> Option<Self> {
        let limit = shared.grants.load().for_plugin(plugin).limits.max_instances;
        let mut counts = lock(&shared.instances);
        let count = counts.entry(plugin.clone()).or_default();
        if limit.is_some_and(|max| *count >= max) {
            return None;
        }
        *count += 1;
        Some(Self {
            shared,
            plugin: plugin.clone(),
        })
    }
}

impl Drop for InstanceSlot<'_> {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.shared.instances).get_mut(&self.plugin) {
            *count = count.saturating_sub(1);
        }
    }
}

/// Runs the task in its plugin under the applicable limits: the producer's `timelimit`, else
/// the operator's, else the plugin's declared defaults.
async fn run_task(
    shared: &Shared,
    plugin: &Arc<Plugin>,
    spec: &TaskSpec,
    message: &TaskMessage,
) -> Outcome {
    let grants = shared.grants.load().for_plugin(&plugin.name);
    let (mut soft, mut hard) = time_limits(message.time_limit, &grants.limits, &spec.defaults);
    // Set by remote control: in place of the configured limits, under the producer's.
    if let Some((set_soft, set_hard)) = lock(&shared.time_limits).get(&message.task).copied() {
        let seconds = Duration::from_secs_f64;
        if message.time_limit.0.is_none() {
            soft = set_soft.map(seconds);
        }
        if message.time_limit.1.is_none() {
            hard = set_hard.map(seconds);
        }
    }
    let task = task_record(message, soft.map(deadline_ms), &shared.node);
    let progress = ProgressWriter {
        backend: shared.backend.clone(),
        task_id: message.id.clone(),
        parent_id: message.parent_id.clone(),
        group: message.group.clone(),
    };
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: message.task.clone(),
        task_id: message.id.as_str().into(),
        grants,
        progress: Some(Arc::new(progress)),
    };
    shared.sandbox.run(&plugin.pre, scope, &task, hard).await
}

/// The task as the plugin receives it.
pub fn task_record(message: &TaskMessage, soft_deadline_ms: Option<u64>, hostname: &str) -> Task {
    Task {
        id: message.id.clone(),
        name: message.task.clone(),
        args: message.args.get().to_owned(),
        kwargs: message.kwargs.get().to_owned(),
        retries: message.retries,
        root_id: message.root_id.clone(),
        parent_id: message.parent_id.clone(),
        soft_deadline_ms,
        hostname: hostname.to_owned(),
    }
}

/// A task's (soft, hard) time limits. The producer's `timelimit` wins (producers are trusted,
/// as in Celery); otherwise the plugin's declared limit applies, but only to tighten the
/// operator's (or the default) limit: a plugin cannot give itself more time than it was granted.
pub fn time_limits(
    requested: (Option<f64>, Option<f64>),
    granted: &crate::config::Limits,
    declared: &crate::sandbox::TaskDefaults,
) -> (Option<Duration>, Option<Duration>) {
    let seconds = |s: f64| (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s));
    let tighten = |granted: Option<Duration>, declared: Option<f64>| match (
        granted,
        declared.and_then(seconds),
    ) {
        (Some(g), Some(d)) => Some(g.min(d)),
        (g, d) => g.or(d),
    };
    let soft = requested
        .0
        .and_then(seconds)
        .or_else(|| tighten(granted.soft_time_limit, declared.soft_time_limit));
    let hard = requested
        .1
        .and_then(seconds)
        .or_else(|| tighten(granted.time_limit, declared.time_limit));
    (soft, hard)
}

/// The sandbox limit a failure's kind reports, as the metrics name it.
fn limit_hit(kind: &str) -> Option<&'static str> {
    match kind {
        "TimeLimitExceeded" => Some("time"),
        "MemoryLimitExceeded" => Some("memory"),
        "StackOverflow" => Some("stack"),
        "ResultTooLarge" => Some("result_size"),
        _ => None,
    }
}

/// Stores a FAILURE and settles the message; `runtime` if the task ran.
async fn fail(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    exc: &Exception,
    runtime: Option<f64>,
) {
    tracing::warn!(task_id = %message.id, task = %message.task, "{}: {}", exc.kind, exc.message);
    shared
        .metrics
        .task(&message.task, TaskOutcome::Failed, runtime);
    shared.events.task("task-failed", &message.id, |e| {
        e.insert(
            "exception".into(),
            crate::pyrepr::exception_repr(&exc.kind, &exc.message).into(),
        );
        e.insert(
            "traceback".into(),
            exc.traceback.clone().unwrap_or_default().into(),
        );
    });
    finish(
        shared,
        delivery,
        message,
        State::Failure,
        &exc.to_json(),
        exc.traceback.as_deref(),
    )
    .await;
}

/// Celery's retry: after `max_retries` the task fails with the reason; before, the RETRY state
/// is stored, then the next try is published (with an eta after the countdown) and this
/// message settled, in one transaction.
async fn retry(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    policy: &RetryPolicy,
    countdown: Option<f64>,
    reason: Exception,
    runtime: f64,
) {
    if message.retries >= policy.max_retries {
        let mut exc = reason;
        exc.message = format!(
            "{} (gave up after {} retries)",
            exc.message, message.retries
        );
        fail(shared, delivery, message, &exc, Some(runtime)).await;
        return;
    }
    shared
        .metrics
        .task(&message.task, TaskOutcome::Retried, Some(runtime));
    shared.events.task("task-retried", &message.id, |e| {
        e.insert(
            "exception".into(),
            crate::pyrepr::exception_repr(&reason.kind, &reason.message).into(),
        );
        e.insert(
            "traceback".into(),
            reason.traceback.clone().unwrap_or_default().into(),
        );
    });
    let countdown = countdown.unwrap_or_else(|| {
        retry_countdown(
            message.retries,
            policy.backoff,
            policy.backoff_max,
            policy.jitter,
        )
    });
    tracing::info!(
        task_id = %message.id, task = %message.task, retries = message.retries + 1,
        countdown_s = countdown, "task retrying: {}: {}", reason.kind, reason.message
    );
    store_for(
        shared,
        message,
        State::Retry,
        &reason.to_json(),
        reason.traceback.as_deref(),
    )
    .await;
    let eta =
        (countdown > 0.0).then(|| OffsetDateTime::now_utc() + Duration::from_secs_f64(countdown));
    let next = message.retry_message(eta);
    let due = eta.map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX));
    let queued = retrying("publish a retry", || {
        shared
            .broker
            .ack_and_schedule(delivery, &delivery.source, &next, due)
    })
    .await;
    if queued && due.is_some() {
        shared.scheduled.notify_one();
    }
}

/// How a task is retried: the operator's `[tasks."NAME"]` over the task's declared defaults
/// over Celery's.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: f64,
    pub backoff_max: f64,
    pub jitter: bool,
    /// Error kinds that retry the task instead of failing it (Celery's `autoretry_for`).
    pub autoretry_for: Vec<String>,
}

impl RetryPolicy {
    pub fn of(spec: &TaskSpec, overrides: Option<&TaskSection>) -> Self {
        let d = &spec.defaults;
        let o = overrides.cloned().unwrap_or_default();
        Self {
            max_retries: o
                .max_retries
                .or(d.max_retries)
                .unwrap_or(DEFAULT_MAX_RETRIES),
            backoff: o.retry_backoff.or(d.retry_backoff).unwrap_or(1.0),
            backoff_max: o.retry_backoff_max.or(d.retry_backoff_max).unwrap_or(600.0),
            jitter: o.retry_jitter.or(d.retry_jitter).unwrap_or(true),
            autoretry_for: o
                .autoretry_for
                .or_else(|| d.autoretry_for.clone())
                .unwrap_or_default(),
        }
    }
}

/// Celery's exponential backoff: `min(maximum, factor * 2^retries)`, drawn uniformly from
/// `[0, that]` with jitter.
pub fn retry_countdown(retries: u32, factor: f64, maximum: f64, jitter: bool) -> f64 {
    let countdown = (factor * 2f64.powi(i32::try_from(retries.min(62)).unwrap_or(62))).min(maximum);
    let countdown = if countdown.is_finite() {
        countdown.max(0.0)
    } else {
        maximum.max(0.0)
    };
    if jitter {
        fastrand::f64() * countdown
    } else {
        countdown
    }
}

/// Stores the task's state (unless the producer asked to ignore its result).
async fn store_for(
    shared: &Shared,
    message: &TaskMessage,
    state: State,
    result: &Value,
    traceback: Option<&str>,
) {
    if message.ignore_result {
        return;
    }
    let doc = message.result_document(state, result, traceback);
    retrying("store a result", || shared.backend.store(&message.id, &doc)).await;
}

/// Stores the task's final state (unless the producer asked to ignore its result) and
/// acknowledges its message, through the settler's batches.
async fn finish<R: serde::Serialize + ?Sized>(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    state: State,
    result: &R,
    traceback: Option<&str>,
) {
    let document = (!message.ignore_result).then(|| {
        (
            message.id.clone(),
            message.result_document(state, result, traceback),
        )
    });
    shared
        .settler
        .settle(document, state == State::Success, delivery)
        .await;
}

/// Stores Celery's REVOKED result (`TaskRevokedError(reason)`) and settles the message; `what`
/// says why in the log line.
async fn finish_revoked(
    shared: &Shared,
    delivery: &Delivery,
    message: &TaskMessage,
    reason: &str,
    what: &str,
) {
    tracing::info!(task_id = %message.id, task = %message.task, "task {what}: REVOKED");
    // Revoked and expired tasks are settled before their plugin is looked up.
    let label = metrics_label(shared, Some(&message.task));
    shared.metrics.task(label, TaskOutcome::Revoked, None);
    shared.events.task("task-revoked", &message.id, |e| {
        e.insert("terminated".into(), (reason == "terminated").into());
        e.insert("signum".into(), Value::Null);
        e.insert("expired".into(), (reason == "expired").into());
    });
    let exc = Exception::new("TaskRevokedError", reason);
    finish(
        shared,
        delivery,
        message,
        State::Revoked,
        &exc.to_json(),
        None,
    )
    .await;
}

/// For a message that cannot be run: fails its task with `exc` where the message has a task
/// id (so a waiting producer gets an answer), and moves it to the dead-letter list with
/// `reason`.
async fn refuse(
    shared: &Shared,
    delivery: &Delivery,
    task_id: Option<&str>,
    task: Option<&str>,
    exc: &Exception,
    reason: &str,
) {
    if let Some(id) = task_id {
        let doc = protocol::result_document(
            id,
            State::Failure.as_str(),
            &exc.to_json(),
            exc.traceback.as_deref(),
            None,
            None,
            OffsetDateTime::now_utc(),
        );
        retrying("store a result", || shared.backend.store(id, &doc)).await;
    }
    tracing::error!(
        task_id = task_id.unwrap_or("-"), task = task.unwrap_or("-"),
        queue = %crate::broker::queue_of(&delivery.source),
        "message dead-lettered to {}: {reason}", crate::broker::DEAD_LETTER_KEY
    );
    shared
        .metrics
        .task(metrics_label(shared, task), TaskOutcome::Rejected, None);
    if let Some(id) = task_id {
        let kind = if exc.kind == "Reject" {
            "task-rejected"
        } else {
            "task-failed"
        };
        shared.events.task(kind, id, |e| {
            e.insert(
                "exception".into(),
                crate::pyrepr::exception_repr(&exc.kind, &exc.message).into(),
            );
            e.insert(
                "traceback".into(),
                exc.traceback.clone().unwrap_or_default().into(),
            );
            e.insert("requeue".into(), false.into());
        });
    }
    if retrying("dead-letter a message", || {
        shared
            .broker
            .dead_letter(delivery, reason, task_id, task, &shared.node)
    })
    .await
    {
        shared.metrics.dead_lettered();
    }
}

/// The `task` label of a task that may not be served: its name only when a plugin serves it,
/// since names from producers are unbounded.
fn metrics_label<'a>(shared: &Shared, task: Option<&'a str>) -> &'a str {
    task.filter(|t| shared.plugins.registry().resolve(t).is_some())
        .unwrap_or("(unregistered)")
}

/// Retries a Redis write until it works, with backoff: a result is never dropped because Redis
/// was away for a while. (While it fails, the message stays in the in-flight list: late, never
/// lost; a stop that cannot wait aborts this and leaves it there for recovery.)
pub(crate) async fn retrying<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut op: impl FnMut() -> F,
) -> bool {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(_) => {
                if attempt > 1 {
                    tracing::info!("could {what} after {attempt} attempts");
                }
                return true;
            }
            Err(e) => {
                // Say so at the first failure and then at attempts 2, 4, 8, …: heard, not a flood.
                if attempt.is_power_of_two() {
                    tracing::warn!("could not {what} (attempt {attempt}, retrying): {e}");
                }
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
}

/// Stores a running task's progress as its state.
struct ProgressWriter {
    backend: Backend,
    task_id: String,
    parent_id: Option<String>,
    group: Option<String>,
}

impl Progress for ProgressWriter {
    fn update(
        &self,
        state: String,
        meta: Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let doc = protocol::result_document(
                &self.task_id,
                &state,
                &meta,
                None,
                self.parent_id.as_deref(),
                self.group.as_deref(),
                OffsetDateTime::now_utc(),
            );
            self.backend
                .store(&self.task_id, &doc)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_can_tighten_but_not_extend_its_time_limit() {
        let granted = crate::config::Limits::default();
        let mut declared = crate::sandbox::TaskDefaults {
            queue: None,
            max_retries: None,
            retry_backoff: None,
            retry_backoff_max: None,
            retry_jitter: None,
            soft_time_limit: None,
            time_limit: Some(1e9),
            rate_limit: None,
            autoretry_for: None,
        };
        let default = granted.time_limit;
        assert_eq!(
            time_limits((None, None), &granted, &declared),
            (None, default)
        );
        declared.time_limit = Some(2.0);
        declared.soft_time_limit = Some(1.0);
        assert_eq!(
            time_limits((None, None), &granted, &declared),
            (Some(Duration::from_secs(1)), Some(Duration::from_secs(2)))
        );
        assert_eq!(
            time_limits((Some(5.0), Some(7.0)), &granted, &declared),
            (Some(Duration::from_secs(5)), Some(Duration::from_secs(7)))
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(retry_countdown(0, 1.0, 600.0, false), 1.0);
        assert_eq!(retry_countdown(3, 1.0, 600.0, false), 8.0);
        assert_eq!(retry_countdown(20, 1.0, 600.0, false), 600.0);
        assert_eq!(retry_countdown(u32::MAX, 2.0, 60.0, false), 60.0);
        for _ in 0..100 {
            let c = retry_countdown(2, 1.0, 600.0, true);
            assert!((0.0..=4.0).contains(&c));
        }
    }
}
