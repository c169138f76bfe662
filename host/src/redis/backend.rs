//! The result backend: task states stored as Celery's Redis backend stores them
//! (`celery-task-meta-<id>`, with `result_expires`, published on the same channel for
//! waiters), and waiting for a result as `AsyncResult.get()` does.

use super::keys::result_key;
use super::{Client, Connection, RedisError, Subscription, scripts};
use crate::protocol::is_ready;
use redis::Script;
use serde_json::Value;
use std::time::Duration;

/// Why waiting for a result failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("no result for task {task_id} within {timeout:?}")]
    Timeout { task_id: String, timeout: Duration },
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("the result of task {task_id} is not valid JSON: {reason}")]
    BadResult { task_id: String, reason: String },
}

/// What storing a state did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Written,
    /// A SUCCESS was stored, and is kept: the task ran to its end.
    KeptSuccess,
    /// Another state the write keeps (a REVOKED; any ready state for progress) is kept.
    KeptOther,
}

/// Which stored states a write keeps rather than replaces.
#[derive(Debug, Clone, Copy)]
enum Keeps {
    /// SUCCESS and REVOKED: for a task's own outcome.
    Final,
    /// Every ready state: for what is not the outcome.
    Ready,
}

impl Keeps {
    fn as_arg(self) -> &'static str {
        match self {
            Keeps::Final => "final",
            Keeps::Ready => "ready",
        }
    }
}

/// A connection to the result backend.
#[derive(Clone)]
pub struct Backend {
    client: Client,
    conn: Connection,
    expires: u64,
    store: Script,
}

impl Backend {
    /// Connects; results are kept `expires` seconds (0: forever).
    pub async fn connect(url: &str, expires: u64) -> Result<Self, RedisError> {
        let (client, conn) = super::connect(url).await?;
        Ok(Self {
            client,
            conn,
            expires,
            store: scripts::store_results(),
        })
    }

    /// Stores `document` as the task's state and publishes it, unless a final state (SUCCESS
    /// or REVOKED) is stored, which is kept.
    pub async fn store(&self, task_id: &str, document: &str) -> Result<Stored, RedisError> {
        self.store_keeping(&[(task_id, document)], Keeps::Final)
            .await
            .map(|stored| stored.first().copied().unwrap_or(Stored::Written))
    }

    /// Stores each `(task id, document)` of `states` as [`Backend::store`] does, in one step.
    pub async fn store_all(&self, states: &[(&str, &str)]) -> Result<Vec<Stored>, RedisError> {
        self.store_keeping(states, Keeps::Final).await
    }

    /// Stores `document` unless the task already has a ready state (which is kept): for what
    /// is not the task's outcome (progress, a revoke heard from afar). Returns whether it was
    /// stored.
    pub async fn store_unless_ready(
        &self,
        task_id: &str,
        document: &str,
    ) -> Result<bool, RedisError> {
        let stored = self
            .store_keeping(&[(task_id, document)], Keeps::Ready)
            .await?;
        Ok(stored.first() == Some(&Stored::Written))
    }

    async fn store_keeping(
        &self,
        states: &[(&str, &str)],
        keeps: Keeps,
    ) -> Result<Vec<Stored>, RedisError> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.store.prepare_invoke();
        for (id, _) in states {
            invocation.key(result_key(id));
        }
        invocation.arg(self.expires).arg(keeps.as_arg());
        for (_, doc) in states {
            invocation.arg(*doc);
        }
        let codes: Vec<i64> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(codes
            .into_iter()
            .map(|code| match code {
                1 => Stored::Written,
                0 => Stored::KeptSuccess,
                _ => Stored::KeptOther,
            })
            .collect())
    }

    /// A handle on the backend's shared connection, for the other writers of its keys and
    /// the worker's checks of the server.
    pub fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// How long results are kept, in seconds (0: forever).
    pub(super) fn expires(&self) -> u64 {
        self.expires
    }

    /// Runs a pipeline of commands on the backend.
    pub async fn run(&self, pipe: &redis::Pipeline) -> Result<(), RedisError> {
        pipe.exec_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Waits until `replicas` replicas hold every write made so far through this backend, or
    /// `timeout` passes (`WAIT`); how many did.
    pub async fn replicated(&self, replicas: u32, timeout: Duration) -> Result<u32, RedisError> {
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let held: u32 = redis::cmd("WAIT")
            .arg(replicas)
            .arg(millis)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(held)
    }

    /// Starts listening for a task's result; subscribe before sending the task, so the result
    /// cannot be missed.
    pub async fn subscribe(&self, task_id: &str) -> Result<Waiter, RedisError> {
        let subscription = Subscription::open(&self.client, &result_key(task_id)).await?;
        Ok(Waiter {
            subscription,
            conn: self.conn.clone(),
            task_id: task_id.to_owned(),
        })
    }
}

/// A subscription to one task's result.
pub struct Waiter {
    subscription: Subscription,
    conn: Connection,
    task_id: String,
}

impl Waiter {
    /// Waits until the task is in a ready state and returns its stored document.
    pub async fn wait(mut self, timeout: Duration) -> Result<Value, WaitError> {
        let key = result_key(&self.task_id);
        let deadline = tokio::time::Instant::now() + timeout;
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn)
            .await
            .map_err(RedisError::from)?;
        if let Some(doc) = stored.map(|s| self.parse(&s)).transpose()?
            && ready(&doc)
        {
            return Ok(doc);
        }
        loop {
            let next = tokio::time::timeout_at(deadline, self.subscription.next()).await;
            let Ok(Some(payload)) = next else {
                return Err(WaitError::Timeout {
                    task_id: self.task_id.clone(),
                    timeout,
                });
            };
            let doc =
                serde_json::from_slice::<Value>(&payload).map_err(|e| WaitError::BadResult {
                    task_id: self.task_id.clone(),
                    reason: e.to_string(),
                })?;
            if ready(&doc) {
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

fn ready(doc: &Value) -> bool {
    doc.get("status")
        .and_then(Value::as_str)
        .is_some_and(is_ready)
}
