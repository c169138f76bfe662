//! The dead-letter list: the format of its entries, and the operator's commands on it (list,
//! show, requeue, purge).
//!
//! Entries are JSON documents (newest first) with the reason, the task id and name where known,
//! the queue, the worker, the time, and the raw message (`message`, or `message_base64` for
//! bytes that are not UTF-8). Requeueing pushes the raw message back onto its queue (its
//! priority bucket when the message says) and removes the entry, in one step. (The recovery
//! script writes entries of the same shape for messages that kept killing their workers.)

use super::keys::{DEAD, DEAD_DROPPED, queue_key, queue_of};
use super::{Connection, RedisError, scripts};
use base64::Engine as _;
use redis::AsyncCommands;
use serde_json::{Value, json};

/// Where a dead-lettered message comes from and why, for its entry.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub reason: &'a str,
    pub task_id: Option<&'a str>,
    pub task: Option<&'a str>,
    /// The list it was fetched from.
    pub source: &'a str,
    pub worker: &'a str,
}

/// The entry for the raw message `raw`.
pub fn entry(raw: &[u8], origin: &Origin<'_>) -> String {
    let mut entry = json!({
        "reason": origin.reason,
        "task_id": origin.task_id,
        "task": origin.task,
        "queue": queue_of(origin.source),
        "worker": origin.worker,
        "time": crate::protocol::time::format_time(crate::clock::now()),
    });
    let message = match std::str::from_utf8(raw) {
        Ok(text) => json!({"message": text}),
        Err(_) => json!({"message_base64": base64::engine::general_purpose::STANDARD.encode(raw)}),
    };
    if let (Some(entry), Value::Object(message)) = (entry.as_object_mut(), message) {
        entry.extend(message);
    }
    entry.to_string()
}

/// Why a message was not pushed onto `key`: the key holds another type.
pub fn unpushed_reason(key: &str) -> String {
    format!("cannot push onto {key:?}: the key holds another type than a queue list (WRONGTYPE)")
}

/// The entry for a message that was never pushed because its queue key holds another type
/// ([`unpushed_reason`]): named by the task it carries, in the queue it was for.
pub fn unpushed_entry(message: &super::settle::Outgoing, worker: &str) -> String {
    let sent = crate::protocol::TaskMessage::decode(&message.raw).ok();
    let reason = unpushed_reason(&message.key);
    let origin = Origin {
        reason: &reason,
        task_id: sent.as_ref().map(|m| m.id.as_str()),
        task: sent.as_ref().map(|m| m.task.as_str()),
        source: &message.key,
        worker,
    };
    entry(&message.raw, &origin)
}

/// One entry, with its position (0 = newest).
#[derive(Debug, Clone)]
pub struct Entry {
    pub index: usize,
    /// The entry as stored.
    pub raw: String,
    /// The entry parsed (Null if it is not JSON).
    pub doc: Value,
}

impl Entry {
    fn field(&self, name: &str) -> &str {
        self.doc.get(name).and_then(Value::as_str).unwrap_or("-")
    }

    /// One line: index, time, task, id, queue, reason.
    pub fn summary(&self) -> String {
        format!(
            "{:>4}  {}  {}  {}  queue={}  {}",
            self.index,
            self.field("time"),
            self.field("task"),
            self.field("task_id"),
            self.field("queue"),
            self.field("reason")
        )
    }

    /// The raw message it holds.
    pub fn message(&self) -> Option<Vec<u8>> {
        if let Some(text) = self.doc.get("message").and_then(Value::as_str) {
            return Some(text.as_bytes().to_vec());
        }
        let encoded = self.doc.get("message_base64").and_then(Value::as_str)?;
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
    }

    /// The list the message goes back to: its queue, in the priority bucket the message
    /// names if it can be read.
    pub fn target(&self) -> Option<String> {
        let queue = self.doc.get("queue").and_then(Value::as_str)?;
        let priority = self
            .message()
            .and_then(|m| serde_json::from_slice::<Value>(&m).ok())
            .and_then(|m| m.pointer("/properties/priority").and_then(Value::as_u64))
            .map_or(0, |p| u8::try_from(p.min(9)).unwrap_or(0));
        Some(queue_key(queue, priority))
    }
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("no dead-letter entry {0} (see `taskhost dead list`)")]
    NoEntry(usize),
    #[error("entry {0} holds no message that can be requeued (no queue or no message)")]
    NotRequeueable(usize),
    #[error("entry {0} changed while it was being requeued; list again")]
    Changed(usize),
}

impl From<redis::RedisError> for DeadLetterError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e.into())
    }
}

/// Drops the oldest entries past `max` (`[worker] dead_letter_max`), counting them in
/// `taskhost:dead-dropped`; returns how many were dropped now.
pub async fn trim(conn: &mut Connection, max: u64) -> Result<u64, RedisError> {
    let dropped: u64 = scripts::trim_dead()
        .key(DEAD)
        .key(DEAD_DROPPED)
        .arg(max)
        .invoke_async(conn)
        .await?;
    Ok(dropped)
}

/// How many entries were dropped over the cap, ever.
pub async fn dropped(conn: &mut Connection) -> Result<u64, RedisError> {
    let dropped: Option<u64> = conn.get(DEAD_DROPPED).await?;
    Ok(dropped.unwrap_or(0))
}

/// The entries, newest first, at most `limit`.
pub async fn list(conn: &mut Connection, limit: usize) -> Result<Vec<Entry>, DeadLetterError> {
    let stop = isize::try_from(limit)
        .unwrap_or(isize::MAX)
        .saturating_sub(1);
    let raw: Vec<String> = conn.lrange(DEAD, 0, stop).await?;
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(index, raw)| read_entry(index, raw))
        .collect())
}

/// How many entries there are.
pub async fn count(conn: &mut Connection) -> Result<usize, DeadLetterError> {
    Ok(conn.llen(DEAD).await?)
}

/// The entry at `index`.
pub async fn show(conn: &mut Connection, index: usize) -> Result<Entry, DeadLetterError> {
    let at = isize::try_from(index).unwrap_or(isize::MAX);
    let raw: Option<String> = conn.lindex(DEAD, at).await?;
    raw.map(|raw| read_entry(index, raw))
        .ok_or(DeadLetterError::NoEntry(index))
}

fn read_entry(index: usize, raw: String) -> Entry {
    let doc = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Entry { index, raw, doc }
}

/// Pushes the message of entry `index` back onto its queue and removes the entry; returns the
/// list it went to.
pub async fn requeue(conn: &mut Connection, index: usize) -> Result<String, DeadLetterError> {
    let entry = show(conn, index).await?;
    let (Some(message), Some(target)) = (entry.message(), entry.target()) else {
        return Err(DeadLetterError::NotRequeueable(index));
    };
    let moved: i64 = scripts::requeue_dead()
        .key(DEAD)
        .key(&target)
        .arg(&entry.raw)
        .arg(&message)
        .invoke_async(conn)
        .await?;
    if moved == 0 {
        return Err(DeadLetterError::Changed(index));
    }
    Ok(target)
}

/// Deletes every entry; returns how many there were.
pub async fn purge(conn: &mut Connection) -> Result<usize, DeadLetterError> {
    let (count, _): (usize, i64) = redis::pipe()
        .atomic()
        .llen(DEAD)
        .del(DEAD)
        .query_async(conn)
        .await?;
    Ok(count)
}
