//! Fleet deploys through Redis: plugin blobs stored by content, the current version of each
//! plugin name with its history (for rollbacks), a notice channel, and each worker's report of
//! the versions it runs. What a worker does with them is `plugins::follow`'s.

use super::keys::{self, DEPLOYED, RUNNING_PREFIX};
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
    keys::deploy_channel(super::db(client))
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

/// Publishes `bytes` (whose SHA-256 is `digest`) as the current version of plugin `name`.
pub async fn publish(
    conn: &mut Connection,
    channel: &str,
    name: &str,
    digest: &str,
    bytes: &[u8],
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
    if head.as_deref() != Some(digest) {
        pipe.lpush(&history, digest)
            .ignore()
            .ltrim(&history, 0, HISTORY - 1)
            .ignore();
    }
    pipe.publish(channel, notice(name, digest, "deploy"))
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Makes the previous version of `name` current again; returns (from, to) digests.
pub async fn rollback(
    conn: &mut Connection,
    channel: &str,
    name: &str,
) -> Result<(String, String), FleetError> {
    let moved: Vec<String> = scripts::rollback()
        .key(keys::deploy_history(name))
        .key(DEPLOYED)
        .arg(name)
        .invoke_async(conn)
        .await?;
    let [from, to] = <[String; 2]>::try_from(moved).map_err(|_| FleetError::NothingToRollBack {
        name: name.to_owned(),
    })?;
    conn.publish::<_, _, ()>(channel, notice(name, &to, "rollback"))
        .await?;
    Ok((from, to))
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
