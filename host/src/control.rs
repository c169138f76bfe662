//! Celery's remote control, as `celery control` and `app.control` use it: broadcast commands
//! on the `/<db>.celery.pidbox` channel, replies pushed to the caller's reply list.
//!
//! Served here: `revoke` (with `terminate`) and `ping`. Revoked task ids are kept in Redis
//! (`taskhost:revoked`, scored by when they are forgotten) so a worker started after the revoke
//! honours it too, and in memory for the per-task check, which costs no Redis round trip.

use crate::broker::BrokerError;
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The broadcast channel of the database `client` points at.
pub fn channel(client: &redis::Client) -> String {
    format!(
        "/{}.celery.pidbox",
        client.get_connection_info().redis_settings().db()
    )
}

/// What a command does besides replying: write REVOKED results.
pub trait Effects: Send + Sync {
    fn revoked(
        &self,
        task_id: String,
        reason: &'static str,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// Subscribes to the remote-control channel.
pub async fn subscribe(client: &redis::Client) -> Result<redis::aio::PubSub, BrokerError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel(client)).await?;
    Ok(pubsub)
}

/// Serves remote-control commands for `node` until `stop`, on `subscribed` first (subscribe
/// before the worker says it is ready, so no command sent after that is missed), then on new
/// subscriptions if it is lost.
pub async fn serve(
    client: redis::Client,
    subscribed: redis::aio::PubSub,
    mut conn: ConnectionManager,
    node: String,
    revocations: std::sync::Arc<Revocations>,
    effects: std::sync::Arc<dyn Effects>,
    mut stop: Stopping,
) {
    let mut first = Some(subscribed);
    loop {
        if let Err(e) = revocations.refresh(&mut conn).await {
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
                    handle(&payload, &node, &mut conn, &revocations, effects.as_ref()).await;
                }
                _ = refresh.tick() => {
                    if let Err(e) = revocations.refresh(&mut conn).await {
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
    ticket: Option<String>,
    reply_to: Option<String>,
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
    Some(Command {
        method: body.get("method")?.as_str()?.to_owned(),
        arguments: body.get("arguments").cloned().unwrap_or(Value::Null),
        destination: body.get("destination").and_then(Value::as_array).map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        }),
        ticket: body
            .get("ticket")
            .and_then(Value::as_str)
            .map(str::to_owned),
        reply_to: body
            .pointer("/reply_to/routing_key")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

async fn handle(
    payload: &[u8],
    node: &str,
    conn: &mut ConnectionManager,
    revocations: &Revocations,
    effects: &dyn Effects,
) {
    let Some(command) = decode(payload) else {
        tracing::debug!("ignoring an undecodable remote-control message");
        return;
    };
    if let Some(destination) = &command.destination
        && !destination.is_empty()
        && !destination.iter().any(|d| d == node)
    {
        return;
    }
    let reply = match command.method.as_str() {
        "ping" => Some(json!({"ok": "pong"})),
        "revoke" => Some(revoke(&command.arguments, conn, revocations, effects).await),
        _ => None,
    };
    if let (Some(reply), Some(ticket), Some(routing_key)) =
        (reply, &command.ticket, &command.reply_to)
        && let Err(e) = send_reply(conn, node, ticket, routing_key, reply).await
    {
        tracing::warn!(method = %command.method, "cannot reply to a remote-control command: {e}");
    }
}

async fn revoke(
    arguments: &Value,
    conn: &mut ConnectionManager,
    revocations: &Revocations,
    effects: &dyn Effects,
) -> Value {
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
        effects.revoked(id.clone(), "revoked").await;
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

async fn send_reply(
    conn: &mut ConnectionManager,
    node: &str,
    ticket: &str,
    routing_key: &str,
    reply: Value,
) -> Result<(), BrokerError> {
    let body = json!({ node: reply }).to_string();
    let envelope = json!({
        "body": BASE64.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"ticket": ticket, "clock": 1},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "reply.celery.pidbox", "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    });
    let key = format!("{routing_key}.reply.celery.pidbox");
    let () = conn.lpush(&key, envelope.to_string()).await?;
    // Replies nobody collects must not pile up (Flower's have grown without bound).
    let () = conn.expire(&key, 300).await?;
    Ok(())
}
