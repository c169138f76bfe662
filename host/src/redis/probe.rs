//! Asking a Redis what `taskhost check` needs to know without changing what anyone reads:
//! whether its ACL user may run a command on a key or channel (run as a write that changes
//! nothing, or a subscription dropped at once), whether it keeps an AOF, and its clock.

use super::{Client, Connection, RedisError, Subscription};
use std::time::Duration;

/// How long one answer is waited for.
const ANSWER: Duration = Duration::from_secs(10);

/// One thing the worker does on a Redis, in a form that changes nothing.
pub enum Probe {
    Command(::redis::Cmd),
    Channel(String),
}

impl Probe {
    /// `name args…`, which must change nothing (a `LREM` of a value no list holds, say).
    pub fn command(name: &str, args: &[&str]) -> Self {
        let mut cmd = ::redis::cmd(name);
        for arg in args {
            cmd.arg(*arg);
        }
        Self::Command(cmd)
    }

    /// A subscription to `channel`, dropped once made.
    pub fn channel(channel: String) -> Self {
        Self::Channel(channel)
    }
}

/// Runs `probes`; what Redis refused the connection's ACL user, each named as the worker
/// names a refusal (command, keys, user). Any other error (a key of another type, a script
/// not loaded) means the command was allowed: ACLs are checked first.
pub async fn refusals(conn: &mut Connection, client: &Client, probes: &[Probe]) -> Vec<String> {
    let mut refused = Vec::new();
    for probe in probes {
        let answer = match probe {
            Probe::Command(cmd) => {
                match tokio::time::timeout(ANSWER, cmd.query_async::<::redis::Value>(conn)).await {
                    Ok(answer) => answer.map(drop).map_err(RedisError::from),
                    Err(_) => {
                        refused.push(format!("Redis did not answer within {ANSWER:?}"));
                        break;
                    }
                }
            }
            Probe::Channel(channel) => Subscription::open(client, channel).await.map(drop),
        };
        if let Err(e) = answer {
            if let Some(refusal) = e.refusal() {
                refused.push(refusal.to_owned());
            } else if e.to_string().contains("NOPERM") {
                refused.push(e.to_string());
            }
        }
    }
    refused
}

/// Whether the Redis keeps an append-only file (`INFO persistence`'s `aof_enabled`).
pub async fn aof_enabled(conn: &mut Connection) -> Result<bool, RedisError> {
    let info: String = ::redis::cmd("INFO")
        .arg("persistence")
        .query_async(conn)
        .await?;
    Ok(info.lines().any(|l| l.trim() == "aof_enabled:1"))
}

/// The Redis's clock (`TIME`), in milliseconds since the epoch.
pub async fn time_ms(conn: &mut Connection) -> Result<i64, RedisError> {
    let (s, us): (i64, i64) = ::redis::cmd("TIME").query_async(conn).await?;
    Ok(s * 1000 + us / 1000)
}
