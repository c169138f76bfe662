//! Revoked task ids, and the running tasks a `terminate` can stop. Kept in memory for the
//! per-task check (no Redis round trip per task), and in Redis's revoked set so a worker started
//! after the revoke honours it too.

use crate::lock;
use crate::protocol::time::now_ms;
use crate::redis::{Connection, RedisError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a revoke is remembered (Celery's `REVOKE_EXPIRES`: 3 hours).
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(3 * 3600);

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

    /// The ids of revoked tasks still remembered, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.revoked).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Revokes `ids` here and in Redis (a failure there is logged: this worker still honours
    /// them); with `terminate`, stops those running. Returns how many it stopped.
    pub async fn revoke(&self, conn: &mut Connection, ids: &[String], terminate: bool) -> usize {
        let until =
            now_ms().saturating_add(i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX));
        {
            let mut revoked = lock(&self.revoked);
            for id in ids {
                revoked.insert(id.clone(), until);
            }
        }
        if let Err(e) = crate::redis::control::record_revoked(conn, ids, until).await {
            tracing::warn!("cannot record revoked tasks in Redis: {e}");
        }
        if !terminate {
            return 0;
        }
        let mut running = lock(&self.running);
        ids.iter()
            .filter_map(|id| running.remove(id))
            .map(|stop| stop.send(()).is_ok())
            .filter(|sent| *sent)
            .count()
    }

    /// Loads the revokes still remembered in Redis, and forgets expired ones.
    pub async fn refresh(&self, conn: &mut Connection) -> Result<(), RedisError> {
        let now = now_ms();
        let current = crate::redis::control::revoked(conn, now).await?;
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, until| *until > now);
        revoked.extend(current);
        Ok(())
    }
}
