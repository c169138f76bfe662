//! Celery's remote control, as `celery control` and `app.control` use it: broadcast commands
//! on the `/<db>.celery.pidbox` channel, replies pushed to the caller's reply list.
//!
//! Served here: `ping`; `inspect active|reserved|scheduled|revoked|registered|stats|
//! active_queues|conf|clock`; `control revoke` (with `terminate`), `terminate`, `rate_limit`,
//! `time_limit`,
//! `add_consumer`, `cancel_consumer`, `pool_grow`, `pool_shrink`, `shutdown`,
//! `enable_events`, `disable_events`, `heartbeat`, `hello`. Replies are what Celery's worker
//! sends, so `celery inspect`/`control` and Flower print them. Revoked task ids are kept in Redis
//! (`taskhost:revoked`, scored by when they are forgotten) so a worker started after the revoke
//! honours it too, and in memory for the per-task check, which costs no Redis round trip.

use crate::broker::BrokerError;
use crate::lock;
use crate::shutdown::Stopping;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// Revoked task ids.
pub const REVOKED_KEY: &str = "taskhost:revoked";
/// How long a revoke is remembered (Celery's `REVOKE_EXPIRES`: 3 hours).
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(3 * 3600);
/// How often the revoked set is re-read, in case a broadcast was missed.
const REFRESH: Duration = Duration::from_secs(5);

/// Revoked task ids, and the running tasks a `terminate` can stop.
#[derive(Default)]
pub struct Revocations {
    /// Task id → when the revoke is forgotten (ms since the epoch).
    revoked: Mutex<HashMap<String, i64>>,
    /// Task id → what stops it, for running tasks.
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

impl Revocations {
    /// Whether `task_id` was revoked.
    pub fn is_revoked(&self, task_id: &str) -> bool {
        lock(&self.revoked).contains_key(task_id)
    }

    /// Registers a running task; the receiver fires if it is revoked with `terminate`.
    pub fn started(&self, task_id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        lock(&self.running).insert(task_id.to_owned(), tx);
        rx
    }

    /// Unregisters a running task.
    pub fn finished(&self, task_id: &str) {
        lock(&self.running).remove(task_id);
    }

    fn remember(&self, ids: &[String], until_ms: i64) {
        let mut revoked = lock(&self.revoked);
        for id in ids {
            revoked.insert(id.clone(), until_ms);
        }
    }

    /// The ids of revoked tasks still remembered.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.revoked).keys().cloned().collect();
        ids.sort();
        ids
    }

    fn terminate(&self, ids: &[String]) -> usize {
        let mut running = lock(&self.running);
        ids.iter()
            .filter_map(|id| running.remove(id))
            .map(|stop| stop.send(()).is_ok())
            .filter(|sent| *sent)
            .count()
    }

    /// Loads the revokes still remembered in Redis, and forgets expired ones.
    pub async fn refresh(&self, conn: &mut ConnectionManager) -> Result<(), BrokerError> {
        let now = crate::recovery::now_ms();
        let () = conn.zrembyscore(REVOKED_KEY, "-inf", now).await?;
        let current: Vec<(String, f64)> = conn
            .zrangebyscore_withscores(REVOKED_KEY, now, "+inf")
            .await?;
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, until| *until > now);
        for (id, until) in current {
            revoked.insert(id, until as i64);
        }
        Ok(())
    }
}

/// The broadcast channel of the database `client` points at.
pub fn channel(client: &redis::Client) -> String {
    format!(
        "/{}.celery.pidbox",
        client.get_connection_info().redis_settings().db()
    )
}

/// The worker as remote control sees it: what `inspect` reports and what `control` changes.
/// Replies are built here, in Celery's format; the worker answers in its own terms.
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
    fn set_rate_limit(&self, task: &str, rate: Option<&str>) -> Result<(), String>;
    /// Sets a task's soft and hard time limits, seconds.
    fn set_time_limit(
        &self,
        task: &str,
        soft: Option<f64>,
        hard: Option<f64>,
    ) -> Result<(), String>;
    /// Starts consuming `queue`; false if it already was.
    fn add_consumer(&self, queue: &str) -> BoxFuture<'_, Result<bool, String>>;
    /// Stops consuming `queue`; false if it was not.
    fn cancel_consumer(&self, queue: &str) -> Result<bool, String>;
    /// Changes the number of tasks run at once by `delta`; returns the new number.
    fn resize_pool(&self, delta: i64) -> usize;
    /// Stops the worker as a first SIGTERM does.
    fn shutdown(&self);
    /// Stores a REVOKED result for a task revoked by id.
    fn revoked(&self, task_id: String, reason: &'static str) -> BoxFuture<'_, ()>;
}

/// A boxed future, for the trait's async methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What [`serve`] works with.
pub struct Context {
    pub node: String,
    pub worker: std::sync::Arc<dyn Worker>,
    pub revocations: std::sync::Arc<Revocations>,
    pub events: std::sync::Arc<crate::events::Events>,
    /// Counts for the worker heartbeat a `heartbeat` broadcast asks for: (active, processed).
    pub counts: std::sync::Arc<dyn Fn() -> (u64, u64) + Send + Sync>,
}

/// Subscribes to the remote-control channel.
pub async fn subscribe(client: &redis::Client) -> Result<redis::aio::PubSub, BrokerError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel(client)).await?;
    Ok(pubsub)
}

/// Serves remote-control commands until `stop`, on `subscribed` first (subscribe before the
/// worker says it is ready, so no command sent after that is missed), then on new
/// subscriptions if it is lost.
pub async fn serve(
    client: redis::Client,
    subscribed: redis::aio::PubSub,
    mut conn: ConnectionManager,
    context: Context,
    mut stop: Stopping,
) {
    let mut first = Some(subscribed);
    loop {
        if let Err(e) = context.revocations.refresh(&mut conn).await {
            tracing::warn!("cannot read revoked tasks: {e}");
        }
        let subscribed = match first.take() {
            Some(pubsub) => Ok(pubsub),
            None => subscribe(&client).await,
        };
        let mut pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot subscribe to remote control (retrying): {e}");
                tokio::select! {
                    () = tokio::time::sleep(REFRESH) => continue,
                    () = crate::shutdown::stopped(&mut stop) => return,
                }
            }
        };
        let mut messages = pubsub.on_message();
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        tracing::warn!("remote control subscription lost; resubscribing");
                        break;
                    };
                    let payload: Vec<u8> = message.get_payload().unwrap_or_default();
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

/// A command as kombu's pidbox sends it.
struct Command {
    method: String,
    arguments: Value,
    destination: Option<Vec<String>>,
    pattern: Option<String>,
    matcher: Option<String>,
    ticket: Option<String>,
    reply_to: Option<String>,
    clock: Option<u64>,
}

fn decode(payload: &[u8]) -> Option<Command> {
    let envelope: Value = serde_json::from_slice(payload).ok()?;
    let body = envelope.get("body")?.as_str()?;
    let body = match envelope
        .pointer("/properties/body_encoding")
        .and_then(Value::as_str)
    {
        Some("base64") => BASE64.decode(body).ok()?,
        _ => body.as_bytes().to_vec(),
    };
    let body: Value = serde_json::from_slice(&body).ok()?;
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
    Some(Command {
        method: text("method")?,
        arguments: body.get("arguments").cloned().unwrap_or(Value::Null),
        destination: body.get("destination").and_then(Value::as_array).map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        }),
        pattern: text("pattern"),
        matcher: text("matcher"),
        ticket: text("ticket"),
        reply_to: body
            .pointer("/reply_to/routing_key")
            .and_then(Value::as_str)
            .map(str::to_owned),
        clock: envelope.pointer("/headers/clock").and_then(Value::as_u64),
    })
}

/// Whether a command is addressed to `node` (kombu's `Node.handle_message`): a non-empty
/// destination list names it, or else a pattern matches it, or else it is for everyone.
fn addressed_to(command: &Command, node: &str) -> bool {
    if let Some(destination) = &command.destination
        && !destination.is_empty()
    {
        return destination.iter().any(|d| d == node);
    }
    match (&command.pattern, command.matcher.as_deref()) {
        (Some(pattern), None | Some("glob")) => glob_match(pattern, node),
        // Regular expressions (`pcre`) are not understood here: answer rather than ignore.
        _ => true,
    }
}

/// Shell-style matching of `*` and `?`, as Python's `fnmatch` (without character classes).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

async fn handle(payload: &[u8], context: &Context, conn: &mut ConnectionManager) {
    let Some(command) = decode(payload) else {
        tracing::debug!("ignoring an undecodable remote-control message");
        return;
    };
    if !addressed_to(&command, &context.node) {
        return;
    }
    if let Some(clock) = command.clock {
        context.events.observe_clock(clock);
    }
    tracing::debug!(method = %command.method, "remote control");
    let reply = execute(&command, context, conn).await;
    if let (Some(reply), Some(ticket), Some(routing_key)) =
        (reply, &command.ticket, &command.reply_to)
        && let Err(e) = send_reply(conn, context, ticket, routing_key, reply).await
    {
        tracing::warn!(method = %command.method, "cannot reply to a remote-control command: {e}");
    }
}

/// Runs one command; its reply, if it has one.
async fn execute(
    command: &Command,
    context: &Context,
    conn: &mut ConnectionManager,
) -> Option<Value> {
    let worker = context.worker.as_ref();
    let args = &command.arguments;
    let text = |key: &str| args.get(key).and_then(Value::as_str);
    let seconds = |key: &str| args.get(key).and_then(Value::as_f64);
    let reply = match command.method.as_str() {
        "ping" => json!({"ok": "pong"}),
        "revoke" => revoke(args, conn, context).await,
        // `celery control terminate SIGNAL ID...`: a revoke that stops running instances (the
        // signal is not used: a sandboxed task is interrupted, not signalled).
        "terminate" => {
            let mut args = args.clone();
            if let Some(map) = args.as_object_mut() {
                map.insert("terminate".into(), Value::Bool(true));
            }
            revoke(&args, conn, context).await
        }
        "active" => Value::Array(worker.active()),
        "reserved" => Value::Array(worker.reserved()),
        "scheduled" => Value::Array(worker.scheduled().await),
        "revoked" => json!(context.revocations.ids()),
        "registered" | "dump_tasks" => json!(worker.registered()),
        "stats" => worker.stats(),
        "active_queues" => Value::Array(worker.queues().iter().map(|q| queue_dict(q)).collect()),
        "conf" => worker.conf(),
        "clock" => json!({"clock": context.events.clock()}),
        "hello" => {
            if text("from_node") == Some(context.node.as_str()) {
                return None;
            }
            json!({"revoked": context.revocations.ids(), "clock": context.events.clock()})
        }
        "enable_events" => {
            if context.events.set_enabled(true) {
                json!({"ok": "task events already enabled"})
            } else {
                tracing::info!("Celery events turned on by remote control");
                let (active, processed) = (context.counts)();
                context.events.worker("worker-online", active, processed);
                json!({"ok": "task events enabled"})
            }
        }
        "disable_events" => {
            if context.events.set_enabled(false) {
                tracing::info!("Celery events turned off by remote control");
            }
            json!({"ok": "task events disabled"})
        }
        "heartbeat" => {
            let (active, processed) = (context.counts)();
            context.events.worker("worker-heartbeat", active, processed);
            return None;
        }
        "rate_limit" => {
            let task = text("task_name").unwrap_or_default();
            let rate = match args.get("rate_limit") {
                Some(Value::String(r)) if !r.is_empty() && r != "0" => Some(r.clone()),
                Some(Value::Number(n)) if n.as_f64().is_some_and(|n| n > 0.0) => {
                    Some(n.to_string())
                }
                _ => None,
            };
            match worker.set_rate_limit(task, rate.as_deref()) {
                Ok(()) if rate.is_some() => json!({"ok": "new rate limit set successfully"}),
                Ok(()) => json!({"ok": "rate limit disabled successfully"}),
                Err(e) => json!({"error": e}),
            }
        }
        "time_limit" => {
            let task = text("task_name").unwrap_or_default();
            match worker.set_time_limit(task, seconds("soft"), seconds("hard")) {
                Ok(()) => json!({"ok": "time limits set successfully"}),
                Err(e) => json!({"error": e}),
            }
        }
        "add_consumer" => match text("queue") {
            None => json!({"error": "add_consumer needs a queue"}),
            Some(queue) => match worker.add_consumer(queue).await {
                Ok(true) => json!({"ok": format!("add consumer {queue}")}),
                Ok(false) => json!({"ok": format!("already consuming from '{queue}'")}),
                Err(e) => json!({"error": e}),
            },
        },
        "cancel_consumer" => match text("queue") {
            None => json!({"error": "cancel_consumer needs a queue"}),
            Some(queue) => match worker.cancel_consumer(queue) {
                Ok(true) => json!({"ok": format!("no longer consuming from {queue}")}),
                Ok(false) => json!({"ok": format!("not consuming from {queue}")}),
                Err(e) => json!({"error": e}),
            },
        },
        "pool_grow" | "pool_shrink" => {
            let n = args.get("n").and_then(Value::as_i64).unwrap_or(1).max(0);
            let grow = command.method == "pool_grow";
            let now = worker.resize_pool(if grow { n } else { -n });
            tracing::info!(concurrency = now, "{} by remote control", command.method);
            json!({"ok": format!("pool will {}", if grow { "grow" } else { "shrink" })})
        }
        "shutdown" => {
            tracing::warn!("shutdown requested by remote control");
            worker.shutdown();
            json!({"ok": "shutting down"})
        }
        other => json!({"error": format!("No such control command: {other}")}),
    };
    Some(reply)
}

/// A queue as kombu describes it in `active_queues` (direct exchange of the queue's name).
fn queue_dict(queue: &str) -> Value {
    json!({
        "name": queue,
        "exchange": {"name": queue, "type": "direct", "arguments": null, "durable": true,
                     "passive": false, "auto_delete": false, "delivery_mode": null,
                     "no_declare": false},
        "routing_key": queue,
        "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null,
        "message_ttl": null, "max_length": null, "max_length_bytes": null, "max_priority": null,
    })
}

async fn revoke(arguments: &Value, conn: &mut ConnectionManager, context: &Context) -> Value {
    let revocations = &context.revocations;
    let ids: Vec<String> = match arguments.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    if ids.is_empty() {
        return json!({"error": "revoke needs task_id"});
    }
    let terminate = arguments
        .get("terminate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let until =
        crate::recovery::now_ms() + i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
    revocations.remember(&ids, until);
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.zadd(REVOKED_KEY, id, until).ignore();
    }
    if let Err(e) = pipe.query_async::<()>(conn).await {
        tracing::warn!("cannot record revoked tasks in Redis: {e}");
    }
    let terminated = if terminate {
        revocations.terminate(&ids)
    } else {
        0
    };
    for id in &ids {
        context.worker.revoked(id.clone(), "revoked").await;
    }
    tracing::info!(tasks = %ids.join(","), terminate, terminated, "tasks revoked");
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

/// How long an uncollected reply list is kept: clients wait seconds for replies, and Flower's
/// have grown without bound when nothing expired them.
const REPLY_TTL_S: i64 = 60;

async fn send_reply(
    conn: &mut ConnectionManager,
    context: &Context,
    ticket: &str,
    routing_key: &str,
    reply: Value,
) -> Result<(), BrokerError> {
    let body = json!({ context.node.as_str(): reply }).to_string();
    let envelope = crate::protocol::transient_envelope(
        &body,
        json!({"ticket": ticket, "clock": context.events.tick()}),
        "reply.celery.pidbox",
        routing_key,
    );
    let key = format!("{routing_key}.reply.celery.pidbox");
    let mut pipe = redis::pipe();
    pipe.lpush(&key, envelope)
        .ignore()
        .expire(&key, REPLY_TTL_S)
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match("w1@*", "w1@host"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("w?@h", "w1@h"));
        assert!(!glob_match("w2@*", "w1@host"));
        assert!(!glob_match("w1@", "w1@host"));
    }
}
