//! Celery's remote control, as `celery control`, `celery inspect`, `app.control` and Flower use
//! it: commands broadcast on the pidbox channel, each answered on the caller's reply list with
//! what Celery's worker answers.
//!
//! Served: `ping`; `inspect active|reserved|scheduled|revoked|registered|stats|active_queues|
//! conf|clock`; `control revoke` (with `terminate`), `terminate`, `rate_limit`, `time_limit`,
//! `add_consumer`, `cancel_consumer`, `pool_grow`, `pool_shrink`, `shutdown`,
//! `enable_events`, `disable_events`, `heartbeat`, `hello`. The commands and their arguments
//! are `protocol::pidbox::Request`; what each does to the worker, the worker says through the
//! [`Worker`] trait. A new command: a `Request` variant, an arm in [`execute`].

use super::events::Events;
use super::revocations::Revocations;
use crate::protocol::event::WorkerEvent;
use crate::protocol::pidbox::{Command, Request, queue_dict, reply};
use crate::redis::{Client, Connection, Subscription};
use crate::shutdown::Stopping;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How often the revoked set is re-read, in case a broadcast was missed.
const REFRESH: Duration = Duration::from_secs(5);

/// Why a control command was refused; the text is the reply's `error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("unknown task")]
    UnknownTask,
    #[error("{0}")]
    BadRate(#[from] crate::config::rate::RateError),
    #[error("time limits must be non-negative seconds")]
    BadTimeLimit,
    #[error("invalid queue name {0:?}")]
    BadQueue(String),
    #[error("cannot register the queue: {0}")]
    Register(String),
    #[error("{0} is the only queue this worker consumes; add another first")]
    LastQueue(String),
}

/// The worker as remote control sees it: what `inspect` reports and what `control` changes.
/// Each reply is shaped in [`execute`]; what only the worker knows (request dicts, `stats`,
/// `conf`) it gives in Celery's shapes through this trait (implemented in `worker::remote`).
pub trait Worker: Send + Sync {
    /// Tasks running now, as Celery's request dicts.
    fn active(&self) -> Vec<Value>;
    /// Messages fetched and not started, as request dicts.
    fn reserved(&self) -> Vec<Value>;
    /// Tasks waiting for their eta in this worker's queues: `{eta, priority, request}`.
    fn scheduled(&self) -> BoxFuture<'_, Vec<Value>>;
    /// Task names served.
    fn registered(&self) -> Vec<String>;
    /// Celery's `stats` dict.
    fn stats(&self) -> Value;
    /// Queues consumed now.
    fn queues(&self) -> Vec<String>;
    /// Settings, as Celery's `conf` (secrets redacted).
    fn conf(&self) -> Value;
    /// Sets (or with `None` removes) a task's rate limit, e.g. `10/m`.
    fn set_rate_limit(&self, task: &str, rate: Option<&str>) -> Result<(), ControlError>;
    /// Sets a task's soft and hard time limits, seconds.
    fn set_time_limit(
        &self,
        task: &str,
        soft: Option<f64>,
        hard: Option<f64>,
    ) -> Result<(), ControlError>;
    /// Starts consuming `queue`; false if it already was.
    fn add_consumer(&self, queue: &str) -> BoxFuture<'_, Result<bool, ControlError>>;
    /// Stops consuming `queue`; false if it was not.
    fn cancel_consumer(&self, queue: &str) -> Result<bool, ControlError>;
    /// Changes the number of tasks run at once by `delta`; returns the new number.
    fn resize_pool(&self, delta: i64) -> usize;
    /// Stops the worker as a first SIGTERM does.
    fn shutdown(&self);
    /// Stores a REVOKED result for each task revoked by id that no worker holds.
    fn revoked(&self, task_ids: Vec<String>) -> BoxFuture<'_, ()>;
    /// (tasks running, tasks processed), as worker events report them.
    fn counts(&self) -> (u64, u64);
}

/// A boxed future, for the trait's async methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`serve`] works with.
#[derive(Clone)]
pub struct Context {
    pub node: String,
    pub worker: Arc<dyn Worker>,
    pub revocations: Arc<Revocations>,
    pub events: Arc<Events>,
}

/// Serves remote-control commands until `stop`, on `subscribed` first if given (subscribe
/// before the worker says it is ready, so no command sent after that is missed), then on new
/// subscriptions if it is lost.
pub async fn serve(
    client: Client,
    subscribed: Option<Subscription>,
    mut conn: Connection,
    context: Context,
    mut stop: Stopping,
) {
    let mut first = subscribed;
    loop {
        if let Err(e) = context.revocations.refresh(&mut conn).await {
            tracing::warn!("cannot read revoked tasks: {e}");
        }
        let subscribed = match first.take() {
            Some(subscription) => Ok(subscription),
            None => crate::redis::control::subscribe(&client).await,
        };
        let mut subscription = match subscribed {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot subscribe to remote control (retrying): {e}");
                tokio::select! {
                    () = tokio::time::sleep(REFRESH) => continue,
                    () = crate::shutdown::stopped(&mut stop) => return,
                }
            }
        };
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                payload = subscription.next() => {
                    let Some(payload) = payload else {
                        tracing::warn!("remote control subscription lost; resubscribing");
                        break;
                    };
                    handle(&payload, &context, &mut conn).await;
                }
                _ = refresh.tick() => {
                    if let Err(e) = context.revocations.refresh(&mut conn).await {
                        tracing::debug!("cannot refresh revoked tasks: {e}");
                    }
                }
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

async fn handle(payload: &[u8], context: &Context, conn: &mut Connection) {
    let Some(command) = Command::decode(payload) else {
        tracing::debug!("ignoring an undecodable remote-control message");
        return;
    };
    if !command.is_for(&context.node) {
        return;
    }
    if let Some(clock) = command.clock {
        context.events.observe_clock(clock);
    }
    tracing::debug!(request = ?command.request, "remote control");
    let answer = execute(&command.request, context, conn).await;
    if let (Some(answer), Some(to)) = (answer, &command.reply_to) {
        let message = reply(&context.node, to, context.events.tick(), answer);
        if let Err(e) = crate::redis::control::send_reply(conn, &to.routing_key, message).await {
            tracing::warn!(request = ?command.request, "cannot reply to a remote-control command: {e}");
        }
    }
}

/// Runs one request; its reply, if it has one.
async fn execute(request: &Request, context: &Context, conn: &mut Connection) -> Option<Value> {
    let worker = context.worker.as_ref();
    let reply = match request {
        Request::Ping => json!({"ok": "pong"}),
        Request::Revoke { ids, terminate } => revoke(ids, *terminate, conn, context).await,
        Request::Active => Value::Array(worker.active()),
        Request::Reserved => Value::Array(worker.reserved()),
        Request::Scheduled => Value::Array(worker.scheduled().await),
        Request::Revoked => json!(context.revocations.ids()),
        Request::Registered => json!(worker.registered()),
        Request::Stats => worker.stats(),
        Request::ActiveQueues => {
            Value::Array(worker.queues().iter().map(|q| queue_dict(q)).collect())
        }
        Request::Conf => worker.conf(),
        Request::Clock => json!({"clock": context.events.clock()}),
        Request::Hello { from_node } => {
            if from_node.as_deref() == Some(context.node.as_str()) {
                return None;
            }
            json!({"revoked": context.revocations.ids(), "clock": context.events.clock()})
        }
        Request::EnableEvents => enable_events(context),
        Request::DisableEvents => {
            if context.events.set_enabled(false) {
                tracing::info!("Celery events turned off by remote control");
            }
            json!({"ok": "task events disabled"})
        }
        Request::Heartbeat => {
            let (active, processed) = worker.counts();
            context
                .events
                .worker(WorkerEvent::Heartbeat, active, processed);
            return None;
        }
        Request::RateLimit { task, rate } => {
            answer(worker.set_rate_limit(task, rate.as_deref()).map(|()| {
                if rate.is_some() {
                    "new rate limit set successfully".to_owned()
                } else {
                    "rate limit disabled successfully".to_owned()
                }
            }))
        }
        Request::TimeLimit { task, soft, hard } => answer(
            worker
                .set_time_limit(task, *soft, *hard)
                .map(|()| "time limits set successfully".to_owned()),
        ),
        Request::AddConsumer { queue } => add_consumer(worker, queue.as_deref()).await,
        Request::CancelConsumer { queue } => cancel_consumer(worker, queue.as_deref()),
        Request::ResizePool { grow, by } => {
            let now = worker.resize_pool(if *grow { *by } else { -by });
            let (verb, done) = if *grow {
                ("pool_grow", "grow")
            } else {
                ("pool_shrink", "shrink")
            };
            tracing::info!(concurrency = now, "{verb} by remote control");
            json!({"ok": format!("pool will {done}")})
        }
        Request::Shutdown => {
            tracing::warn!("shutdown requested by remote control");
            worker.shutdown();
            json!({"ok": "shutting down"})
        }
        Request::Unknown(method) => json!({"error": format!("No such control command: {method}")}),
    };
    Some(reply)
}

/// `{"ok": text}` or `{"error": why}`.
fn answer(outcome: Result<String, ControlError>) -> Value {
    match outcome {
        Ok(text) => json!({"ok": text}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

fn enable_events(context: &Context) -> Value {
    if context.events.set_enabled(true) {
        return json!({"ok": "task events already enabled"});
    }
    tracing::info!("Celery events turned on by remote control");
    let (active, processed) = context.worker.counts();
    context
        .events
        .worker(WorkerEvent::Online, active, processed);
    json!({"ok": "task events enabled"})
}

async fn add_consumer(worker: &dyn Worker, queue: Option<&str>) -> Value {
    let Some(queue) = queue else {
        return json!({"error": "add_consumer needs a queue"});
    };
    answer(worker.add_consumer(queue).await.map(|added| {
        if added {
            format!("add consumer {queue}")
        } else {
            format!("already consuming from '{queue}'")
        }
    }))
}

fn cancel_consumer(worker: &dyn Worker, queue: Option<&str>) -> Value {
    let Some(queue) = queue else {
        return json!({"error": "cancel_consumer needs a queue"});
    };
    answer(worker.cancel_consumer(queue).map(|removed| {
        if removed {
            format!("no longer consuming from {queue}")
        } else {
            format!("not consuming from {queue}")
        }
    }))
}

async fn revoke(
    ids: &[String],
    terminate: bool,
    conn: &mut Connection,
    context: &Context,
) -> Value {
    if ids.is_empty() {
        return json!({"error": "revoke needs task_id"});
    }
    let terminated = context.revocations.revoke(conn, ids, terminate).await;
    // The results of thousands of ids (a group's) take a while to store: meanwhile the
    // control loop goes on answering (ping included).
    let (worker, stored) = (context.worker.clone(), ids.to_vec());
    tokio::spawn(async move { worker.revoked(stored).await });
    let shown = ids
        .iter()
        .take(10)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(tasks = %shown, count = ids.len(), terminate, terminated, "tasks revoked");
    let listed = ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if terminate {
        json!({"ok": format!("tasks {{{listed}}} flagged as revoked; {terminated} terminated")})
    } else {
        json!({"ok": format!("tasks {{{listed}}} flagged as revoked")})
    }
}
