//! What runs beside the fetch loop, and how it stops: the lifelines that outlive the stop
//! until the running tasks are done (heartbeat, worker events, the lost-task and health
//! watches), and every other loop (remote control, `/metrics`, the scheduler, the autoscaler,
//! the delayed mover, the fleet's loops, the eviction watch), each awaited at the stop.

use super::{
    Shared, autoscale, beat, fetch, health, heartbeats, refuse, reload, remote, status, supervise,
};
use crate::redis::recovery::Presence;
use crate::shutdown::{Stop, Stopping};
use anyhow::Context as _;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// What runs beside the fetch loop, and outlives its stop where it must.
pub(super) struct Background {
    /// Set once the running tasks are finished: the lifelines stop then.
    gone: Stop,
    /// The loops that outlive the stop until `gone` (see [`spawn_lifelines`]).
    lifelines: Spawned,
    /// Every other loop: each ends at the stop.
    loops: Spawned,
    _watcher: crate::plugins::watcher::Watcher,
}

/// Spawned loops, by name, to be awaited at the stop.
type Spawned = Vec<(&'static str, tokio::task::JoinHandle<()>)>;

/// How long a stopping worker waits for a loop to end before it names and aborts it.
const LOOP_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for each of `loops`, all within [`LOOP_STOP`]; one still running then is named in
/// the log and aborted.
async fn join_bounded(loops: Spawned) {
    let deadline = tokio::time::Instant::now() + LOOP_STOP;
    for (name, mut handle) in loops {
        if tokio::time::timeout_at(deadline, &mut handle)
            .await
            .is_err()
        {
            tracing::warn!(
                task = name,
                "a loop did not end within {LOOP_STOP:?} of the stop: aborted"
            );
            handle.abort();
        }
    }
}

/// The loops that outlive the stop until the running tasks are done (`gone`), supervised:
/// the worker events (worker-online, heartbeats, worker-offline) and the registry heartbeat.
fn spawn_lifelines(shared: &Arc<Shared>, presence: Presence, gone: Stopping) -> Spawned {
    let loops = shared.monitor.loops.clone();
    let worker_events = {
        let (shared, gone_in_loop) = (shared.clone(), gone.clone());
        supervise::spawn(loops.clone(), "worker events", gone.clone(), move || {
            heartbeats::heartbeats(shared.clone(), gone_in_loop.clone())
        })
    };
    let mut lifelines = vec![("worker events", worker_events)];
    if let Some(mut lost) = presence.lost() {
        // Ends when the presence, and so the heartbeat, is gone.
        let shared = shared.clone();
        let failing = tokio::spawn(async move {
            while let Some(raw) = lost.recv().await {
                refuse::fail_lost(&shared, &raw).await;
            }
        });
        lifelines.push(("failing lost tasks", failing));
    }
    let health = shared.monitor.health.clone();
    let watch = tokio::spawn(health::watch(health.clone(), gone.clone()));
    lifelines.push(("health watch", watch));
    let gone_in_loop = gone.clone();
    let heartbeat = supervise::spawn(loops, "heartbeat", gone, move || {
        let health = health.clone();
        presence
            .clone()
            .run(move || health.is_fetching(), gone_in_loop.clone())
    });
    // The heartbeat first: the presence it ends lets the lost-task loop end too.
    lifelines.insert(0, ("heartbeat", heartbeat));
    lifelines
}

/// The report of what this worker runs, the fleet follower (`--fleet`, under `trust`, which a
/// config reload replaces), and the watch on each Redis's eviction policy.
fn spawn_fleet(
    shared: &Arc<Shared>,
    trust: Arc<ArcSwap<crate::config::FleetTrust>>,
    stop: &Stopping,
) -> Spawned {
    let config = &shared.config;
    let mut loops = Spawned::new();
    let report = tokio::spawn(crate::plugins::follow::report_running(
        shared.broker.connection(),
        config.node.clone(),
        shared.plugins.clone(),
        stop.clone(),
    ));
    loops.push(("running report", report));
    if config.fleet {
        let follow = tokio::spawn(crate::plugins::follow::follow(
            shared.broker.client().clone(),
            shared.broker.connection(),
            config.plugins_dir.clone(),
            trust,
            stop.clone(),
        ));
        loops.push(("fleet follower", follow));
    }
    let redises = vec![
        ("broker", shared.broker.connection()),
        ("backend", shared.backend.connection()),
    ];
    let eviction = tokio::spawn(crate::redis::eviction::watch(redises, stop.clone()));
    loops.push(("eviction watch", eviction));
    loops
}

/// Remote control, supervised; subscribed, and the revoked set read, before the worker says it
/// is ready, so no command sent after that is missed and no task revoked before it runs.
async fn spawn_remote_control(
    shared: &Arc<Shared>,
    stop: &Stopping,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut control = Some(crate::redis::control::subscribe(shared.broker.client()).await?);
    let (client, mut conn) = (shared.broker.client().clone(), shared.broker.connection());
    // The revokes recorded before this worker started are known before it fetches its first
    // task (the loop reads them again, every few seconds).
    if let Err(e) = shared.revocations.refresh(&mut conn).await {
        tracing::warn!("cannot read revoked tasks at start (read again in a few seconds): {e}");
    }
    let (context, in_loop) = (remote::context(shared), stop.clone());
    Ok(supervise::spawn(
        shared.monitor.loops.clone(),
        "remote control",
        stop.clone(),
        move || {
            crate::monitor::control::serve(
                client.clone(),
                control.take(),
                conn.clone(),
                context.clone(),
                in_loop.clone(),
            )
        },
    ))
}

impl Background {
    pub(super) async fn spawn(
        shared: &Arc<Shared>,
        presence: Presence,
        stop: &Stopping,
    ) -> anyhow::Result<Self> {
        let config = &shared.config;
        // The heartbeat outlives the stop: it must go on while running tasks finish, or other
        // workers would take them for a dead worker's and run them again.
        let (gone, gone_rx) = crate::shutdown::flag();
        let lifelines = spawn_lifelines(shared, presence, gone_rx);
        let fleet_trust = Arc::new(ArcSwap::from_pointee(config.fleet_trust.clone()));
        let watcher = crate::plugins::watcher::watch(
            shared.plugins.clone(),
            config.config_path.clone(),
            reload::config_reloader(shared, config.config_path.clone(), fleet_trust.clone()),
            stop.clone(),
        )?;
        let mut loops = spawn_fleet(shared, fleet_trust, stop);
        loops.push(("remote control", spawn_remote_control(shared, stop).await?));
        if let Some(addr) = config.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for /metrics on {addr}"))?;
            tracing::info!(addr = %listener.local_addr().map_or(addr, |a| a), "serving /metrics and /healthz");
            let serve = tokio::spawn(crate::monitor::endpoint::serve(
                listener,
                Arc::new(status::Status(shared.clone())),
                stop.clone(),
            ));
            loops.push(("/metrics endpoint", serve));
        }
        if config.schedule.is_some() {
            let beat = tokio::spawn(beat::run(
                shared.broker.clone(),
                beat::SystemClock,
                shared.schedule.subscribe(),
                stop.clone(),
            ));
            loops.push(("scheduler", beat));
        }
        if let Some(autoscaler) = autoscale::spawn(shared, stop) {
            loops.push(("autoscaler", autoscaler));
        }
        let mover = {
            let (broker, scheduled, in_loop) = (
                shared.broker.clone(),
                shared.scheduled.clone(),
                stop.clone(),
            );
            supervise::spawn(
                shared.monitor.loops.clone(),
                "delayed mover",
                stop.clone(),
                move || {
                    fetch::move_due_messages(broker.clone(), scheduled.clone(), in_loop.clone())
                },
            )
        };
        loops.push(("delayed mover", mover));
        Ok(Self {
            gone,
            lifelines,
            loops,
            _watcher: watcher,
        })
    }

    /// Once the tasks are done: waits for every loop that ends at the stop, then ends the
    /// lifelines (worker-offline is sent then) and waits for them; none is left running.
    pub(super) async fn stop(self) {
        join_bounded(self.loops).await;
        let _ = self.gone.send(true);
        join_bounded(self.lifelines).await;
    }
}
