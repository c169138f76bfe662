//! The result backend: task states stored as Celery stores them (`celery-task-meta-<id>`, with
//! `result_expires`, published on the same channel for waiters), and waiting for a result as
//! `AsyncResult.get()` does.

use crate::broker::{self, BrokerError};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, Script};
use serde_json::Value;
use std::time::Duration;

/// Celery's default `result_expires`: one day.
pub const DEFAULT_EXPIRES: u64 = 86_400;

/// States after which a task's result no longer changes.
pub const READY_STATES: &[&str] = &["SUCCESS", "FAILURE", "REVOKED"];

/// Stores and publishes a state in one step; a stored SUCCESS is never overwritten (as Celery's
/// `_store_result` guards), so a task run twice cannot turn a success into a failure.
const STORE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and doc['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
";

/// The key (and channel) of a task's result.
pub fn meta_key(task_id: &str) -> String {
    format!("celery-task-meta-{task_id}")
}

/// Why waiting for a result failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("no result for task {task_id} within {timeout:?}")]
    Timeout { task_id: String, timeout: Duration },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the result of task {task_id} is not valid JSON: {reason}")]
    BadResult { task_id: String, reason: String },
}

/// A connection to the result backend.
#[derive(Clone)]
pub struct Backend {
    client: Client,
    conn: ConnectionManager,
    expires: u64,
    store: Script,
}

impl Backend {
    /// Connects; results are kept `expires` seconds (0: forever).
    pub async fn connect(url: &str, expires: u64) -> Result<Self, BrokerError> {
        let client = broker::client(url)?;
        let mut conn = broker::manager(&client, url).await?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| BrokerError::Connect {
                url: broker::redact(url),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            conn,
            expires,
            store: Script::new(STORE),
        })
    }

    /// Stores `document` as the task's state and publishes it. Returns false if a SUCCESS was
    /// already stored (and is kept).
    pub async fn store(&self, task_id: &str, document: &str) -> Result<bool, BrokerError> {
        let stored: i64 = self
            .store
            .key(meta_key(task_id))
            .arg(document)
            .arg(self.expires)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(stored == 1)
    }

    /// Adds to `pipe` the commands that store a SUCCESS document and publish it, unguarded: a
    /// success may replace a stored success (a task run twice), nothing else can be stored
    /// over one, since every other state goes through [`Backend::store`]. Cheaper than the
    /// guarded script, which costs Redis more than the commands it guards.
    pub fn add_success(&self, pipe: &mut redis::Pipeline, task_id: &str, document: &str) {
        let key = meta_key(task_id);
        if self.expires > 0 {
            pipe.cmd("SET")
                .arg(&key)
                .arg(document)
                .arg("EX")
                .arg(self.expires)
                .ignore();
        } else {
            pipe.cmd("SET").arg(&key).arg(document).ignore();
        }
        pipe.cmd("PUBLISH").arg(&key).arg(document).ignore();
    }

    /// Runs a pipeline of commands on the backend.
    pub async fn run(&self, pipe: &redis::Pipeline) -> Result<(), BrokerError> {
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Starts listening for a task's result; subscribe before sending the task, so the result
    /// cannot be missed.
    pub async fn subscribe(&self, task_id: &str) -> Result<Waiter, BrokerError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(meta_key(task_id)).await?;
        Ok(Waiter {
            pubsub,
            conn: self.conn.clone(),
            task_id: task_id.to_owned(),
        })
    }
}

/// A subscription to one task's result.
pub struct Waiter {
    pubsub: redis::aio::PubSub,
    conn: ConnectionManager,
    task_id: String,
}

impl Waiter {
    /// Waits until the task is in a ready state and returns its stored document.
    pub async fn wait(mut self, timeout: Duration) -> Result<Value, WaitError> {
        let key = meta_key(&self.task_id);
        let deadline = tokio::time::Instant::now() + timeout;
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn)
            .await
            .map_err(BrokerError::from)?;
        if let Some(doc) = stored.map(|s| self.parse(&s)).transpose()?
            && is_ready(&doc)
        {
            return Ok(doc);
        }
        let mut messages = self.pubsub.on_message();
        loop {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            let Ok(Some(message)) = next else {
                return Err(WaitError::Timeout {
                    task_id: self.task_id.clone(),
                    timeout,
                });
            };
            let payload: String = message.get_payload().map_err(BrokerError::from)?;
            let doc =
                serde_json::from_str::<Value>(&payload).map_err(|e| WaitError::BadResult {
                    task_id: self.task_id.clone(),
                    reason: e.to_string(),
                })?;
            if is_ready(&doc) {
                return Ok(doc);
            }
        }
    }

    fn parse(&self, text: &str) -> Result<Value, WaitError> {
        serde_json::from_str(text).map_err(|e| WaitError::BadResult {
            task_id: self.task_id.clone(),
            reason: e.to_string(),
        })
    }
}

fn is_ready(doc: &Value) -> bool {
    doc.get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| READY_STATES.contains(&s))
}
