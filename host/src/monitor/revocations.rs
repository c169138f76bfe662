//! Revoked task ids, and the running tasks a `terminate` can stop. Kept in memory for the
//! per-task check (no Redis round trip per task), and in Redis's revoked set so a worker started
//! after the revoke honours it too. Both keep at most [`MAX_REVOKED`] ids (as Celery does), and
//! the set is read whole only at start: later reads take what was recorded since.

use crate::clock::now_ms;
use crate::lock;
use crate::redis::control::MAX_REVOKED;
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
    /// The latest "remembered until" read from Redis: the next read starts there.
    read_until: Mutex<i64>,
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
        remember(
            &mut lock(&self.revoked),
            ids.iter().map(|id| (id.clone(), until)),
        );
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

    /// Loads the revokes recorded in Redis since the last load (all of them the first time),
    /// and forgets expired ones.
    pub async fn refresh(&self, conn: &mut Connection) -> Result<(), RedisError> {
        let now = now_ms();
        let from = *lock(&self.read_until);
        let recorded = crate::redis::control::revoked(conn, now, from).await?;
        if let Some(latest) = recorded.iter().map(|(_, until)| *until).max() {
            let mut read_until = lock(&self.read_until);
            *read_until = next_read_from(*read_until, latest, now);
        }
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, until| *until > now);
        remember(&mut revoked, recorded);
        Ok(())
    }
}

/// How far a revoke's "remembered until" may fall behind this worker's reckoning and still be
/// read by the next refresh: the other workers' clocks may run this much slow.
const CLOCK_MARGIN_MS: i64 = 10 * 60 * 1000;

/// Where the next refresh starts reading, after one that read up to `latest`: never past
/// what a revoke recorded now would carry ([`REVOKE_EXPIRES`] from `now`), less the margin,
/// so an entry a fast clock or a Redis writer put far ahead cannot hide the revokes after it.
fn next_read_from(from: i64, latest: i64, now: i64) -> i64 {
    let expires = i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
    let ceiling = now.saturating_add(expires).saturating_sub(CLOCK_MARGIN_MS);
    from.max(latest.min(ceiling))
}

/// Adds `ids` (with when each is forgotten) to `revoked`, then drops those forgotten soonest
/// past [`MAX_REVOKED`].
fn remember(revoked: &mut HashMap<String, i64>, ids: impl IntoIterator<Item = (String, i64)>) {
    revoked.extend(ids);
    if revoked.len() > MAX_REVOKED {
        let mut by_age: Vec<(i64, String)> = revoked
            .iter()
            .map(|(id, until)| (*until, id.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, id) in by_age.iter().take(revoked.len() - MAX_REVOKED) {
            revoked.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_far_ahead_does_not_hide_the_revokes_recorded_after_it() {
        let expires = i64::try_from(REVOKE_EXPIRES.as_millis()).unwrap_or(i64::MAX);
        let now = 1_000_000_000;
        let year_ahead = now + 365 * 86_400_000;
        let from = next_read_from(now, year_ahead, now);
        // A revoke recorded a minute later by a clock five minutes slow is still read.
        let later = now + 60_000 - 5 * 60_000 + expires;
        assert!(later >= from, "{later} < {from}");
        // And reading does move on with what was read.
        assert_eq!(next_read_from(now, now + 1_000, now), now + 1_000);
    }

    #[test]
    fn the_revoked_ids_kept_are_bounded_dropping_those_forgotten_soonest() {
        let mut revoked = HashMap::new();
        remember(
            &mut revoked,
            (0..MAX_REVOKED).map(|n| (format!("old-{n}"), 1)),
        );
        remember(&mut revoked, (0..10).map(|n| (format!("new-{n}"), 2)));
        assert_eq!(revoked.len(), MAX_REVOKED);
        assert!((0..10).all(|n| revoked.contains_key(&format!("new-{n}"))));
    }
}
