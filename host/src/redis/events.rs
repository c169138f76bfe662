//! Monitoring events through Redis: published on Pub/Sub, as Celery's dispatcher does (not
//! stored: with no subscriber they are gone).

use super::keys;
use super::{Client, Connection, RedisError};

/// Where one worker's events go: the database's event channels.
#[derive(Clone)]
pub struct EventChannels {
    conn: Connection,
    db: i64,
}

impl EventChannels {
    /// Events are best effort: an event Redis refuses (an ACL without the event channels) is
    /// logged by the sender and never stops the worker, so this connection does not report it.
    pub fn new(client: &Client, conn: Connection) -> Self {
        Self {
            conn: conn.quiet(),
            db: client.db(),
        }
    }

    /// Publishes `message` (an event in its envelope) with `routing_key`.
    pub async fn publish(&mut self, routing_key: &str, message: String) -> Result<(), RedisError> {
        redis::cmd("PUBLISH")
            .arg(keys::event_channel(self.db, routing_key))
            .arg(message)
            .query_async::<i64>(&mut self.conn)
            .await?;
        Ok(())
    }
}
