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
    /// one was sent already, or the tick is more than [`TICK_AHEAD`] past Redis's clock.
    pub async fn send_tick(
        &self,
        name: &str,
        tick_ms: i64,
        queue: &str,
        message: &[u8],
    ) -> Result<Tick, RedisError> {
        let (sent, redis_now_ms): (i64, i64) = scripts::schedule_tick()
            .key(SCHEDULE_LAST)
            .key(queue_key(queue, 0))
            .arg(name)
            .arg(tick_ms)
            .arg(message)
            .arg(u64::try_from(TICK_AHEAD.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.connection())
            .await?;
        Ok(match sent {
            1 => Tick::Sent,
            0 => Tick::SentBefore,
            _ => Tick::Ahead { redis_now_ms },
        })
    }
}

/// How far ahead of Redis's clock a schedule tick may be: a later one comes from a worker whose
/// clock runs fast, and is refused without being stored.
pub const TICK_AHEAD: std::time::Duration = std::time::Duration::from_secs(60);

/// What became of a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Sent,
    /// It, or a later one, was sent before.
    SentBefore,
    /// Beyond [`TICK_AHEAD`] of Redis's clock (`redis_now_ms`): refused.
    Ahead {
        redis_now_ms: i64,
    },
}
