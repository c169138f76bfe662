//! The worker: fetch → handle → settle, with at most `concurrency` tasks running, and a clean
//! stop. This file wires the rooms together and owns the stop; each step of a task's path is
//! a file of its own:
//!
//! - [`fetch`]: taking messages into the in-flight lists (batched fetch, blocking wakers,
//!   reconciling after a lost answer), and moving due messages back from the delayed set.
//! - [`handle`]: one task's path, top to bottom: decode → gates → run → outcome → settle.
//! - [`gates`]: expiry, revocation, eta, registration, rate limit, fleet rate limit,
//!   `max_instances`, time limits: each lets a task through, postpones it or stops it.
//! - [`settle`]: every way a message leaves: result stored, acknowledged, postponed,
//!   dead-lettered; with metrics, events and the log line.
//! - [`retry`]: Celery's retry policy and backoff.
//! - [`commit`]: the group commit that batches outcomes into few Redis round trips.
//! - [`remote`]: the worker as remote control, `/metrics` and `/healthz` see it.
//! - [`held`], [`health`]: what the worker holds, and whether it is consuming.
//! - [`canvas`]: what follows a task in Celery's canvas, sent as it settles.
//! - [`beat`]: the leaderless scheduler of the `[schedule]` entries.
//! - [`progress`]: a running task's progress, stored at a bounded rate.
//! - [`supervise`]: the long-running loops, restarted if they stop; `/healthz` names them.
//! - [`reload`]: what a changed `taskhost.toml` may change while the worker runs.
//! - [`autoscale`]: the slots resized, by `--autoscale` or remote control.

mod autoscale;
mod background;
pub mod beat;
mod canvas;
mod commit;
mod dead_letters;
mod fetch;
mod gates;
mod handle;
mod health;
mod heartbeats;
mod held;
mod moved;
mod progress;
mod refuse;
mod reload;
mod remote;
mod retry;
mod rusage;
mod settle;
mod status;
mod supervise;
mod wind_down;

pub use commit::{RedisSink, Settler, Sink};
pub use dead_letters::DeadLetters;
pub use gates::time_limits;
pub use handle::task_record;
pub use retry::{DEFAULT_MAX_RETRIES, RetryPolicy, retry_countdown};

use crate::config::{GrantTable, WorkerConfig};
use crate::monitor::events::Events;
use crate::monitor::metrics::Metrics;
use crate::monitor::revocations::Revocations;
use crate::plugins::cache::Cache;
use crate::plugins::live::Live;
use crate::redis::keys::source_keys;
use crate::redis::recovery::{Presence, Registration};
use crate::redis::settle::Stores;
use crate::redis::{Backend, Broker, RedisError, backoff, redact};
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::shutdown::{Stop, Stopping, stopped};
use crate::telemetry::Telemetry;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use background::Background;
use fetch::{Fetcher, Lists};
use gates::Gates;
use health::Health;
use held::Held;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

/// How long a stopping worker waits for its last spans to reach the collector.
const TRACES_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// What every part of a running worker shares. Its capacity and what watches it are rooms
/// of their own ([`Pool`], [`Monitor`]): the status page, heartbeats and autoscaler take
/// those, not the whole worker.
struct Shared {
    config: WorkerConfig,
    sandbox: Arc<Sandbox>,
    plugins: Arc<Live>,
    grants: Arc<ArcSwap<GrantTable>>,
    broker: Broker,
    backend: Backend,
    settler: Settler,
    dead_letters: DeadLetters,
    /// This worker's registry entry, whose sources name the in-flight lists recovery returns.
    registration: Arc<Registration>,
    gates: Gates,
    revocations: Arc<Revocations>,
    /// Wakes the delayed-set mover when a message is postponed.
    scheduled: Arc<Notify>,
    /// The queues consumed now (remote control changes them).
    queues: watch::Sender<Vec<String>>,
    /// Asks the worker to stop (remote control's `shutdown`).
    stop_tx: Stop,
    /// The `[schedule]` entries this worker's scheduler sends (a config reload changes them).
    schedule: watch::Sender<Arc<Vec<crate::config::schedule::Entry>>>,
    pool: Pool,
    monitor: Monitor,
}

/// The worker's capacity: its task slots and the messages it holds.
struct Pool {
    /// Free task slots; the pool's size is `concurrency`.
    slots: Arc<Semaphore>,
    concurrency: AtomicUsize,
    /// The messages this worker holds.
    held: Arc<Held>,
}

/// What watches the worker: its counters, events, health and tracing.
struct Monitor {
    started: Instant,
    metrics: Arc<Metrics>,
    events: Arc<Events>,
    health: Arc<Health>,
    /// The supervised loops, for `/healthz`.
    loops: Arc<supervise::Loops>,
    /// Tracing, when on.
    telemetry: Option<Arc<Telemetry>>,
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
    tokio::spawn(stop_on_refusal(stop_tx.clone()));
    let Some((shared, presence)) = start(config, stop_tx, &mut stop).await? else {
        return Ok(());
    };
    let background = Background::spawn(&shared, presence, &stop).await?;
    // Changes made while the directory was first loaded, before the watch began.
    shared.plugins.rescan().await;
    log_ready(&shared);
    let fetcher = Fetcher::start(
        Lists {
            broker: shared.broker.clone(),
            registration: shared.registration.clone(),
        },
        shared.pool.held.clone(),
        shared.monitor.health.clone(),
        shared.queues.subscribe(),
        stop.clone(),
    );
    let (fetcher, tasks) = consume(&shared, fetcher, &mut stop).await?;
    let (returned, all_returned) = wind_down::wind_down(&shared, fetcher, tasks, force).await;
    background.stop().await;
    // After the heartbeat stopped, so that no beat writes the entry back.
    if all_returned {
        crate::redis::recovery::leave(&mut shared.broker.connection(), &shared.config.node).await;
    }
    if let Some(telemetry) = shared.monitor.telemetry.clone() {
        // The last spans, sent within a bound: a collector that is down delays no stop.
        let stop = move || telemetry.stop(TRACES_FLUSH);
        let _ = tokio::task::spawn_blocking(stop).await;
    }
    tracing::info!(returned_to_queue = returned, "worker stopped");
    match crate::redis::connection::refusals().borrow().as_deref() {
        Some(refusal) => anyhow::bail!("stopped because {refusal}"),
        None => Ok(()),
    }
}

/// Stops the worker at the first command Redis refuses to its ACL user: retrying cannot make
/// it pass, and a worker that cannot fetch, settle or heartbeat must not look alive. Running
/// tasks finish; messages it could not settle stay in flight for recovery.
async fn stop_on_refusal(stop: Stop) {
    let mut refusals = crate::redis::connection::refusals();
    if let Ok(refusal) = refusals.wait_for(Option::is_some).await
        && let Some(refusal) = refusal.as_deref()
    {
        tracing::error!("stopping: {refusal}");
        let _ = stop.send(true);
    }
}

/// Builds the sandbox, connects (waiting for Redis), claims the node name and loads the plugins;
/// none if a stop came first.
async fn start(
    config: WorkerConfig,
    stop_tx: Stop,
    stop: &mut Stopping,
) -> anyhow::Result<Option<(Arc<Shared>, Presence)>> {
    let sandbox = sandbox(&config)?;
    let telemetry = match &config.tracing {
        Some(tracing) => Some(Arc::new(Telemetry::start(tracing, &config.node)?)),
        None => None,
    };
    let Some((broker, backend)) = connect_both(&config, stop).await? else {
        return Ok(None);
    };
    let Some(presence) = Presence::claim(
        broker.connection(),
        &config.node,
        source_keys(&config.queues),
        config.heartbeat_lapse,
        config.max_redeliveries,
        stop,
    )
    .await?
    else {
        return Ok(None);
    };
    let grants = Arc::new(ArcSwap::from_pointee(config.grants.clone()));
    let plugins = Arc::new(
        Live::open(
            sandbox.clone(),
            cache(&config),
            &config.plugins_dir,
            grants.clone(),
        )
        .await?,
    );
    let metrics = Arc::new(Metrics::default());
    let (settler, dead_letters) = settling(&config, &broker, &backend, &metrics);
    let channels = crate::redis::events::EventChannels::new(broker.client(), broker.connection());
    let events = Events::start(channels, &config.node, config.task_events, metrics.clone());
    // Autoscaling starts at its minimum and grows with the demand.
    let concurrency = config
        .autoscale
        .map_or(config.concurrency, |a| a.min)
        .max(1);
    let shared = Arc::new(Shared {
        sandbox,
        plugins,
        grants,
        gates: Gates::new(&config.task_overrides),
        queues: watch::channel(config.queues.clone()).0,
        registration: presence.registration(),
        broker,
        backend,
        settler,
        dead_letters,
        revocations: Arc::new(Revocations::default()),
        scheduled: Arc::new(Notify::new()),
        stop_tx,
        schedule: watch::channel(Arc::new(config.schedule.clone().unwrap_or_default())).0,
        pool: Pool {
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency: AtomicUsize::new(concurrency),
            held: Arc::new(Held::default()),
        },
        monitor: Monitor {
            started: Instant::now(),
            metrics,
            events,
            health: Arc::new(Health::default()),
            loops: Arc::default(),
            telemetry,
        },
        config,
    });
    Ok(Some((shared, presence)))
}

/// The group-commit writer tasks settle through, and the dead-letter list it shares with the
/// rest of the worker.
fn settling(
    config: &WorkerConfig,
    broker: &Broker,
    backend: &Backend,
    metrics: &Arc<Metrics>,
) -> (Settler, DeadLetters) {
    let dead_letters = DeadLetters::new(
        broker.clone(),
        config.node.clone(),
        metrics.clone(),
        config.dead_letter_max,
    );
    let settler = Settler::start(RedisSink {
        stores: Stores {
            broker: broker.clone(),
            backend: backend.clone(),
            wait_replicas: crate::redis::settle::ReplicaWait::new(config.wait_replicas),
        },
        dead_letters: dead_letters.clone(),
    });
    (settler, dead_letters)
}

/// The engine every plugin of this worker is compiled for and runs in (`taskhost check`
/// loads the plugins in the same).
pub fn sandbox(config: &WorkerConfig) -> anyhow::Result<Arc<Sandbox>> {
    Ok(Arc::new(Sandbox::new(&SandboxOptions {
        max_instances: config.pool_instances,
        max_memory_bytes: config.grants.max_memory_bytes(),
        max_table_elements: config.grants.max_table_elements(),
        stack_bytes: config.stack_bytes,
        component: config.component_caps,
        incremental_dir: config.cache_dir.as_ref().map(|dir| dir.join("incremental")),
        compiler: config.compiler,
    })?))
}

/// The broker and the backend, waiting for Redis; none if a stop came first.
async fn connect_both(
    config: &WorkerConfig,
    stop: &mut Stopping,
) -> anyhow::Result<Option<(Broker, Backend)>> {
    let Some(broker) = connect(&config.broker_url, stop, || {
        Broker::connect(&config.broker_url, &config.node)
    })
    .await?
    else {
        return Ok(None);
    };
    let backend = connect(&config.backend_url, stop, || {
        Backend::connect(&config.backend_url, config.result_expires)
    })
    .await?;
    Ok(backend.map(|backend| (broker, backend)))
}

/// The precompile cache, if configured and usable.
fn cache(config: &WorkerConfig) -> Option<Cache> {
    let dir = config.cache_dir.as_deref()?;
    Cache::new(dir)
        .inspect_err(|e| {
            tracing::warn!(dir = %dir.display(), "precompile cache unusable, compiling every load: {e}");
        })
        .ok()
}

/// Connects with `open`, retrying with backoff (and saying so) while Redis at `url` is
/// unreachable; none if a stop comes first.
async fn connect<T, F: Future<Output = Result<T, RedisError>>>(
    url: &str,
    stop: &mut Stopping,
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
            Err(e) if e.is_permanent() => {
                return Err(e.into());
            }
            Err(e) => {
                failures += 1;
                let pause = backoff(failures);
                tracing::error!(
                    redis = %redact(url),
                    "Redis is not reachable (retrying in {pause:?}): {e}"
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stopped(stop) => return Ok(None),
                }
            }
        }
    }
}

fn log_ready(shared: &Shared) {
    let config = &shared.config;
    let registry = shared.plugins.registry();
    tracing::info!(
        node = %config.node,
        broker = %redact(&config.broker_url),
        queues = %config.queues.join(","),
        concurrency = shared.pool.concurrency.load(Ordering::Relaxed),
        autoscale = ?config.autoscale.map(|a| (a.max, a.min)),
        plugins = registry.plugins().count(),
        refused = shared.plugins.refused().len(),
        tasks = %registry.task_names().join(","),
        fleet = config.fleet,
        "worker ready"
    );
}

/// The fetch loop: a slot, then a message, then a handler for it, until a stop.
async fn consume(
    shared: &Arc<Shared>,
    mut fetcher: Fetcher<Lists>,
    stop: &mut Stopping,
) -> anyhow::Result<(Fetcher<Lists>, JoinSet<()>)> {
    let semaphore = shared.pool.slots.clone();
    let mut tasks = JoinSet::new();
    loop {
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!("task handler ended abnormally: {e}");
            }
        }
        shared
            .monitor
            .health
            .set_waiting_for_slot(semaphore.available_permits() == 0);
        let permit = tokio::select! {
            permit = semaphore.clone().acquire_owned() => permit.context("semaphore closed")?,
            () = stopped(stop) => break,
        };
        shared.monitor.health.set_waiting_for_slot(false);
        // Fetched in batches (fewer Redis calls per task), at most the prefetch allowance
        // beyond the free slots: what is fetched waits in the in-flight list, safe, but
        // unavailable to other workers.
        let batch = (semaphore.available_permits() + 1).max(
            shared
                .pool
                .concurrency
                .load(Ordering::Relaxed)
                .saturating_mul(shared.config.prefetch_multiplier),
        );
        let Some(delivery) = fetcher.next(batch).await else {
            break;
        };
        // Known as running before the handler starts, so a reconciliation in between does not
        // take it for an orphan.
        let id = shared.pool.held.start(&delivery);
        let shared = shared.clone();
        tasks.spawn(async move {
            handle::handle_guarded(&shared, &delivery).await;
            shared.pool.held.finish(id);
            drop(permit);
        });
    }
    Ok((fetcher, tasks))
}
