//! Fleet deploys through Redis: plugin blobs stored by content, the current version of each
//! plugin name with its history (for rollbacks), a notice channel, and each worker's report of
//! the versions it runs. What a worker does with them is `plugins::follow`'s.

use super::keys::{self, DEPLOY_RECORDS, DEPLOYED, RUNNING_PREFIX};
use super::{Client, Connection, RedisError, Subscription, scripts};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// Versions kept per name for rollbacks.
pub const HISTORY: isize = 20;
/// How long a worker's report of what it runs lives without a refresh.
pub const REPORT_TTL: Duration = Duration::from_secs(60);
/// The field a report always has, so that a worker running no plugin still has a report
/// (Redis deletes an empty hash). Never shown as a plugin.
const REPORT_PRESENT: &str = "-";

/// Why a fleet operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("{name} has no earlier deployed version to roll back to")]
    NothingToRollBack { name: String },
}

impl From<redis::RedisError> for FleetError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e.into())
    }
}

/// The deploy notice channel of `client`'s database.
pub fn channel(client: &Client) -> String {
    keys::deploy_channel(client.db())
}

/// Subscribes to deploy notices.
pub async fn subscribe(client: &Client) -> Result<Subscription, RedisError> {
    Subscription::open(client, &channel(client)).await
}

/// The plugin name a deploy notice is about.
pub fn notice_name(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

fn notice(name: &str, digest: &str, action: &str) -> String {
    json!({"name": name, "sha256": digest, "action": action}).to_string()
}

/// Publishes `bytes` (whose SHA-256 is `digest`) as the current version of plugin `name`,
/// with its signed `record` (none: unsigned), and announces it. Blobs that fall out of the
/// history are deleted unless another name's history still holds them.
pub async fn publish(
    conn: &mut Connection,
    channel: &str,
    name: &str,
    digest: &str,
    bytes: &[u8],
    record: Option<&str>,
) -> Result<(), FleetError> {
    let history = keys::deploy_history(name);
    let head: Option<String> = conn.lindex(&history, 0).await?;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("SET")
        .arg(keys::plugin_blob(digest))
        .arg(bytes)
        .ignore()
        .hset(DEPLOYED, name, digest)
        .ignore();
    match record {
        Some(record) => pipe.hset(DEPLOY_RECORDS, name, record).ignore(),
        None => pipe.hdel(DEPLOY_RECORDS, name).ignore(),
    };
    if head.as_deref() != Some(digest) {
        // What the trim drops is read in the same transaction.
        pipe.lpush(&history, digest)
            .ignore()
            .lrange(&history, HISTORY, -1)
            .ltrim(&history, 0, HISTORY - 1)
            .ignore();
    }
    pipe.publish(channel, notice(name, digest, "deploy"))
        .ignore();
    let dropped: Vec<Vec<String>> = pipe.query_async(conn).await?;
    let dropped: Vec<String> = dropped.into_iter().flatten().collect();
    delete_unused_blobs(conn, &dropped).await
}

/// Deletes the blobs of `digests` that no deploy history holds any more.
async fn delete_unused_blobs(conn: &mut Connection, digests: &[String]) -> Result<(), FleetError> {
    if digests.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = conn.hkeys(DEPLOYED).await?;
    for digest in digests {
        let mut held = false;
        for name in &names {
            let at: Option<i64> = redis::cmd("LPOS")
                .arg(keys::deploy_history(name))
                .arg(digest)
                .query_async(conn)
                .await?;
            held |= at.is_some();
        }
        if !held {
            let () = conn.del(keys::plugin_blob(digest)).await?;
        }
    }
    Ok(())
}

/// Makes the previous version of `name` current again, unsigned; returns (from, to) digests.
/// The caller signs it ([`set_record`]) if it can, then [`announce`]s it.
pub async fn rollback(conn: &mut Connection, name: &str) -> Result<(String, String), FleetError> {
    let moved: Vec<String> = scripts::rollback()
        .key(keys::deploy_history(name))
        .key(DEPLOYED)
        .key(DEPLOY_RECORDS)
        .arg(name)
        .invoke_async(conn)
        .await?;
    <[String; 2]>::try_from(moved)
        .map(|[from, to]| (from, to))
        .map_err(|_| FleetError::NothingToRollBack {
            name: name.to_owned(),
        })
}

/// Stores the signed record of `name`'s deployed version.
pub async fn set_record(conn: &mut Connection, name: &str, record: &str) -> Result<(), RedisError> {
    let () = conn.hset(DEPLOY_RECORDS, name, record).await?;
    Ok(())
}

/// The signed record of `name`'s deployed version, if it is signed.
pub async fn record(conn: &mut Connection, name: &str) -> Result<Option<String>, RedisError> {
    Ok(conn.hget(DEPLOY_RECORDS, name).await?)
}

/// Tells fleet workers that `name` is now `digest` (`action`: deploy, rollback).
pub async fn announce(
    conn: &mut Connection,
    channel: &str,
    name: &str,
    digest: &str,
    action: &str,
) -> Result<(), RedisError> {
    let () = conn.publish(channel, notice(name, digest, action)).await?;
    Ok(())
}

/// What is deployed and what each worker runs.
#[derive(Debug, Default)]
pub struct Deployments {
    /// Plugin name → (current digest, versions kept for rollback).
    pub deployed: BTreeMap<String, (String, usize)>,
    /// Worker node → plugin → version.
    pub workers: BTreeMap<String, BTreeMap<String, String>>,
}

/// Reads the deployments table and the workers' reports.
pub async fn deployments(conn: &mut Connection) -> Result<Deployments, FleetError> {
    let mut out = Deployments::default();
    for (name, digest) in deployed(conn).await? {
        let kept: usize = conn.llen(keys::deploy_history(&name)).await?;
        out.deployed.insert(name, (digest, kept));
    }
    let mut reports: Vec<String> = Vec::new();
    {
        let mut scan = conn
            .scan_match::<_, String>(format!("{RUNNING_PREFIX}*"))
            .await?;
        while let Some(key) = scan.next().await {
            reports.push(key?);
        }
    }
    for key in reports {
        let mut running: BTreeMap<String, String> = conn.hgetall(&key).await?;
        running.remove(REPORT_PRESENT);
        let node = key.trim_start_matches(RUNNING_PREFIX).to_owned();
        out.workers.insert(node, running);
    }
    Ok(out)
}

/// Plugin name → SHA-256 of its deployed version.
pub async fn deployed(conn: &mut Connection) -> Result<BTreeMap<String, String>, RedisError> {
    Ok(conn.hgetall(DEPLOYED).await?)
}

/// The SHA-256 of `name`'s deployed version, if it is deployed.
pub async fn deployed_digest(
    conn: &mut Connection,
    name: &str,
) -> Result<Option<String>, RedisError> {
    Ok(conn.hget(DEPLOYED, name).await?)
}

/// The size in bytes of the deployed blob with SHA-256 `digest` (0 if it is not stored).
pub async fn blob_len(conn: &mut Connection, digest: &str) -> Result<usize, RedisError> {
    Ok(conn.strlen(keys::plugin_blob(digest)).await?)
}

/// The deployed blob with SHA-256 `digest`, if it is stored.
pub async fn blob(conn: &mut Connection, digest: &str) -> Result<Option<Vec<u8>>, RedisError> {
    Ok(conn.get(keys::plugin_blob(digest)).await?)
}

/// Replaces `node`'s report of the plugins it runs (name, version), expiring after
/// [`REPORT_TTL`] unless written again.
pub async fn report_running<'a>(
    conn: &mut Connection,
    node: &str,
    running: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), RedisError> {
    let key = format!("{RUNNING_PREFIX}{node}");
    let mut pipe = redis::pipe();
    pipe.atomic().del(&key).ignore();
    for (plugin, version) in running {
        pipe.hset(&key, plugin, version).ignore();
    }
    pipe.hset(&key, REPORT_PRESENT, REPORT_PRESENT)
        .ignore()
        .expire(&key, i64::try_from(REPORT_TTL.as_secs()).unwrap_or(60))
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Removes `node`'s report (when it stops).
pub async fn remove_report(conn: &mut Connection, node: &str) -> Result<(), RedisError> {
    let () = conn.del(format!("{RUNNING_PREFIX}{node}")).await?;
    Ok(())
}
