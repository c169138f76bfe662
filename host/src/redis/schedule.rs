//! The fleet's shared schedule state: the last tick each `[schedule]` entry sent, and sending
//! a tick once across every worker's scheduler (`scripts/schedule_tick-2.lua`).

use super::keys::{SCHEDULE_LAST, queue_key};
use super::{Broker, RedisError, scripts};
use std::collections::HashMap;

impl Broker {
    /// Each entry's last tick sent, ms since the epoch.
    pub async fn schedule_last_runs(&self) -> Result<HashMap<String, i64>, RedisError> {
        let runs: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(SCHEDULE_LAST)
            .query_async(&mut self.connection())
            .await?;
        Ok(runs)
    }

    /// Sends `message` to `queue` as entry `name`'s tick `tick_ms`, unless that tick or a later
    /// one was sent already. True if this call sent it.
    pub async fn send_tick(
        &self,
        name: &str,
        tick_ms: i64,
        queue: &str,
        message: &[u8],
    ) -> Result<bool, RedisError> {
        let sent: i64 = scripts::schedule_tick()
            .key(SCHEDULE_LAST)
            .key(queue_key(queue, 0))
            .arg(name)
            .arg(tick_ms)
            .arg(message)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(sent == 1)
    }
}
