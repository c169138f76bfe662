//! Whether a Redis the worker uses may evict its keys when full. Read with `INFO` (which the
//! README's ACL recipe grants; `CONFIG` it does not) at start and again every [`EVERY`], and
//! said once per Redis and policy: a restart, a failover to another server (a new run id) or a
//! changed policy is said again.

use super::Connection;
use crate::shutdown::Stopping;
use std::time::Duration;

/// How often each Redis is read again.
pub const EVERY: Duration = Duration::from_secs(10);

/// What `INFO server memory` says about eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The server's run id: new after a restart or on another server.
    pub run_id: String,
    pub policy: String,
    /// Bytes; 0 is no limit.
    pub maxmemory: u64,
}

/// The fields of an `INFO` answer that say whether Redis evicts.
pub fn parse(info: &str) -> Option<Reading> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    Some(Reading {
        run_id: field("run_id")?,
        policy: field("maxmemory_policy")?,
        maxmemory: field("maxmemory")?.parse().ok()?,
    })
}

/// What `policy` would drop when Redis is full, or none for `noeviction`.
pub fn evicts(policy: &str) -> Option<&'static str> {
    if policy == "noeviction" {
        None
    } else if policy.starts_with("allkeys-") {
        Some("any key: queued tasks, results, chord counters, in-flight lists, without a trace")
    } else if policy.starts_with("volatile-") {
        Some(
            "every key with an expiry: task results before their producers read them, chord \
             counters (the chord then never fires), redelivery counts and remote-control replies",
        )
    } else {
        Some("keys the worker and its producers need")
    }
}

/// Reads `conn`'s Redis.
pub async fn read(conn: &mut Connection) -> Result<Option<Reading>, super::RedisError> {
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .arg("memory")
        .query_async(conn)
        .await?;
    Ok(parse(&info))
}

/// Reads each of `redises` (a name such as "broker", and a connection to it) now and every
/// [`EVERY`] until `stop`, warning once for each new server or policy that is not
/// `noeviction`, and once if `INFO` is refused. A server read under an earlier name in the
/// same round (the backend in another database of the broker's Redis) is not said twice.
pub async fn watch(redises: Vec<(&'static str, Connection)>, mut stop: Stopping) {
    let mut said: Vec<Option<String>> = vec![None; redises.len()];
    loop {
        let mut servers = Vec::new();
        for ((name, conn), said) in redises.iter().zip(&mut said) {
            let saying = match read(&mut conn.clone().quiet()).await {
                Ok(Some(reading)) if servers.contains(&reading.run_id) => None,
                Ok(Some(reading)) => {
                    servers.push(reading.run_id.clone());
                    warn_reading(name, &reading, said.as_deref())
                }
                Ok(None) => None,
                Err(e) if e.refusal().is_some() => warn_refused(name, &e, said.as_deref()),
                // Unreachable for now: the next round reads it again.
                Err(_) => None,
            };
            if saying.is_some() {
                *said = saying;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Warns about `reading` unless it is what was said last; what is now said.
fn warn_reading(name: &str, reading: &Reading, said: Option<&str>) -> Option<String> {
    let key = format!("{} {}", reading.run_id, reading.policy);
    if said == Some(key.as_str()) {
        return None;
    }
    match evicts(&reading.policy) {
        Some(what) => tracing::warn!(
            redis = name,
            policy = %reading.policy,
            maxmemory = reading.maxmemory,
            "the {name}'s Redis has maxmemory-policy {}: when full it evicts {what}; set \
             maxmemory-policy noeviction (Redis then refuses writes when full, and the worker \
             and producers see the error and retry)",
            reading.policy
        ),
        None => {
            tracing::info!(redis = name, policy = %reading.policy, "the {name}'s Redis does not evict")
        }
    }
    Some(key)
}

fn warn_refused(name: &str, e: &super::RedisError, said: Option<&str>) -> Option<String> {
    const KEY: &str = "refused";
    if said == Some(KEY) {
        return None;
    }
    tracing::warn!(
        redis = name,
        policy = "unknown",
        "cannot read the {name}'s Redis eviction policy ({e}): grant the worker's user +info, \
         and make sure maxmemory-policy is noeviction, or Redis may drop queued tasks and \
         results when full"
    );
    Some(KEY.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_for_run_id_policy_and_limit() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n\r\n# Memory\r\n\
                    maxmemory:268435456\r\nmaxmemory_human:256.00M\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(
            parse(info),
            Some(Reading {
                run_id: "abc123".into(),
                policy: "allkeys-lru".into(),
                maxmemory: 268_435_456,
            })
        );
    }

    #[test]
    fn only_noeviction_is_safe() {
        assert_eq!(evicts("noeviction"), None);
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "something-new",
        ] {
            assert!(evicts(policy).is_some(), "{policy}");
        }
    }
}
