//! The dead-letter list, for operators: list, show, requeue and purge its entries.
//!
//! Entries are JSON documents (newest first) with the reason, the task id and name where known,
//! the queue, the worker, the time, and the raw message (`message`, or `message_base64` for
//! bytes that are not UTF-8). Requeueing pushes the raw message back onto its queue (its
//! priority bucket when the message says) and removes the entry, in one transaction.

use crate::broker::{BrokerError, DEAD_LETTER_KEY, queue_key};
use base64::Engine as _;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde_json::Value;

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
    Broker(#[from] BrokerError),
    #[error("no dead-letter entry {0} (see `taskhost dead list`)")]
    NoEntry(usize),
    #[error("entry {0} holds no message that can be requeued (no queue or no message)")]
    NotRequeueable(usize),
    #[error("entry {0} changed while it was being requeued; list again")]
    Changed(usize),
}

impl From<redis::RedisError> for DeadLetterError {
    fn from(e: redis::RedisError) -> Self {
        Self::Broker(e.into())
    }
}

/// The entries, newest first, at most `limit`.
pub async fn list(
    conn: &mut ConnectionManager,
    limit: usize,
) -> Result<Vec<Entry>, DeadLetterError> {
    let stop = isize::try_from(limit)
        .unwrap_or(isize::MAX)
        .saturating_sub(1);
    let raw: Vec<String> = conn.lrange(DEAD_LETTER_KEY, 0, stop).await?;
    Ok(raw
        .into_iter()
        .enumerate()
        .map(|(index, raw)| entry(index, raw))
        .collect())
}

/// How many entries there are.
pub async fn count(conn: &mut ConnectionManager) -> Result<usize, DeadLetterError> {
    Ok(conn.llen(DEAD_LETTER_KEY).await?)
}

/// The entry at `index`.
pub async fn show(conn: &mut ConnectionManager, index: usize) -> Result<Entry, DeadLetterError> {
    let at = isize::try_from(index).unwrap_or(isize::MAX);
    let raw: Option<String> = conn.lindex(DEAD_LETTER_KEY, at).await?;
    raw.map(|raw| entry(index, raw))
        .ok_or(DeadLetterError::NoEntry(index))
}

fn entry(index: usize, raw: String) -> Entry {
    let doc = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Entry { index, raw, doc }
}

/// Pushes the message of entry `index` back onto its queue and removes the entry; returns the
/// list it went to.
pub async fn requeue(
    conn: &mut ConnectionManager,
    index: usize,
) -> Result<String, DeadLetterError> {
    let entry = show(conn, index).await?;
    let (Some(message), Some(target)) = (entry.message(), entry.target()) else {
        return Err(DeadLetterError::NotRequeueable(index));
    };
    // Remove exactly this entry and push its message in one step, so a message is never in
    // both places, nor in neither.
    let moved: i64 = redis::Script::new(
        r"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
",
    )
    .key(DEAD_LETTER_KEY)
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
pub async fn purge(conn: &mut ConnectionManager) -> Result<usize, DeadLetterError> {
    let (count, _): (usize, i64) = redis::pipe()
        .atomic()
        .llen(DEAD_LETTER_KEY)
        .del(DEAD_LETTER_KEY)
        .query_async(conn)
        .await?;
    Ok(count)
}
