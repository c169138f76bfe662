//! Fleet-wide deploys through Redis: a plugin published once reaches every subscribed worker.
//!
//! `taskhost deploy` stores the plugin as a content-addressed blob, makes it the current
//! version of its name, remembers the previous ones, and publishes a notice. A worker started
//! with `--fleet` syncs at start (so a worker joining later gets the current versions), on
//! every notice, and every [`RESYNC`] in case a notice was missed: it fetches the blob, checks
//! its SHA-256, and writes it into its plugin directory under a hidden name then renames it into
//! place — from there the directory watcher hot-reloads it like any other change.
//!
//! Every worker also reports the plugin versions it runs, for `taskhost deployments`.
//!
//! Keys: `taskhost:plugin-blob:<sha256>` (STRING), `taskhost:deployed` (HASH name → sha256),
//! `taskhost:deploy-history:<name>` (LIST of sha256, newest first, [`HISTORY`] kept),
//! `taskhost:running:<node>` (HASH plugin → version, expiring unless refreshed); channel
//! `/<db>.taskhost:deploy` (Pub/Sub ignores database numbers, so the name carries it, as
//! kombu's channels do).

use crate::broker::BrokerError;
use crate::plugins::cache::hex;
use crate::plugins::live::Live;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Client, Script};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Current version of each deployed plugin name.
pub const DEPLOYED_KEY: &str = "taskhost:deployed";
/// Versions kept per name for rollbacks.
pub const HISTORY: isize = 20;
/// How often a fleet worker re-checks the deployed versions without a notice.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How long a worker's report of what it runs lives without a refresh.
const REPORT_TTL: i64 = 60;

fn blob_key(digest: &str) -> String {
    format!("taskhost:plugin-blob:{digest}")
}

fn history_key(name: &str) -> String {
    format!("taskhost:deploy-history:{name}")
}

fn running_key(node: &str) -> String {
    format!("taskhost:running:{node}")
}

/// The deploy notice channel of the database `client` points at.
pub fn channel(client: &Client) -> String {
    format!(
        "/{}.taskhost:deploy",
        client.get_connection_info().redis_settings().db()
    )
}

/// Why a deploy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("plugin name {0:?} is not a valid file stem (letters, digits, '-', '_', '.')")]
    BadName(String),
    #[error("{name} has no earlier deployed version to roll back to")]
    NothingToRollBack { name: String },
}

impl From<redis::RedisError> for DeployError {
    fn from(e: redis::RedisError) -> Self {
        Self::Broker(e.into())
    }
}

/// Checks a plugin name can be a file stem in every worker's directory.
pub fn check_name(name: &str) -> Result<(), DeployError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DeployError::BadName(name.to_owned()))
    }
}

/// Publishes `bytes` as the current version of plugin `name`; returns its SHA-256.
pub async fn publish(
    conn: &mut ConnectionManager,
    channel: &str,
    name: &str,
    bytes: &[u8],
) -> Result<String, DeployError> {
    check_name(name)?;
    let digest = hex(&Sha256::digest(bytes));
    let head: Option<String> = conn.lindex(history_key(name), 0).await?;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("SET")
        .arg(blob_key(&digest))
        .arg(bytes)
        .ignore()
        .hset(DEPLOYED_KEY, name, &digest)
        .ignore();
    if head.as_deref() != Some(digest.as_str()) {
        pipe.lpush(history_key(name), &digest)
            .ignore()
            .ltrim(history_key(name), 0, HISTORY - 1)
            .ignore();
    }
    pipe.publish(channel, notice(name, &digest, "deploy"))
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(digest)
}

const ROLLBACK: &str = r"
local h = redis.call('LRANGE', KEYS[1], 0, 1)
if #h < 2 then return {} end
redis.call('LPOP', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], h[2])
return h
";

/// Makes the previous version of `name` current again; returns (from, to) digests.
pub async fn rollback(
    conn: &mut ConnectionManager,
    channel: &str,
    name: &str,
) -> Result<(String, String), DeployError> {
    check_name(name)?;
    let moved: Vec<String> = Script::new(ROLLBACK)
        .key(history_key(name))
        .key(DEPLOYED_KEY)
        .arg(name)
        .invoke_async(conn)
        .await?;
    let [from, to] =
        <[String; 2]>::try_from(moved).map_err(|_| DeployError::NothingToRollBack {
            name: name.to_owned(),
        })?;
    conn.publish::<_, _, ()>(channel, notice(name, &to, "rollback"))
        .await?;
    Ok((from, to))
}

fn notice(name: &str, digest: &str, action: &str) -> String {
    json!({"name": name, "sha256": digest, "action": action}).to_string()
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
pub async fn deployments(conn: &mut ConnectionManager) -> Result<Deployments, DeployError> {
    let mut out = Deployments::default();
    let deployed: BTreeMap<String, String> = conn.hgetall(DEPLOYED_KEY).await?;
    for (name, digest) in deployed {
        let kept: usize = conn.llen(history_key(&name)).await?;
        out.deployed.insert(name, (digest, kept));
    }
    let mut keys: Vec<String> = Vec::new();
    {
        let mut scan = conn.scan_match::<_, String>("taskhost:running:*").await?;
        while let Some(key) = scan.next().await {
            keys.push(key?);
        }
    }
    for key in keys {
        let running: BTreeMap<String, String> = conn.hgetall(&key).await?;
        let node = key.trim_start_matches("taskhost:running:").to_owned();
        out.workers.insert(node, running);
    }
    Ok(out)
}

/// Reports what `live` runs under `node` after every change and every `REPORT_TTL / 3`, until
/// `stop`.
pub async fn report_running(
    mut conn: ConnectionManager,
    node: String,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = live.subscribe();
    let key = running_key(&node);
    loop {
        let registry = live.registry();
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        for plugin in registry.plugins() {
            pipe.hset(&key, &*plugin.name, &plugin.version).ignore();
        }
        pipe.hset(&key, "-", "-")
            .ignore()
            .expire(&key, REPORT_TTL)
            .ignore();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!("cannot report running plugin versions: {e}");
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(u64::try_from(REPORT_TTL / 3).unwrap_or(20))) => {}
            () = crate::shutdown::stopped(&mut stop) => {
                let _: Result<(), _> = conn.del(&key).await;
                return;
            }
        }
    }
}

/// Keeps `dir` in line with the fleet's deployed versions until `stop` (for `--fleet`).
pub async fn follow(
    client: Client,
    mut conn: ConnectionManager,
    dir: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let channel = channel(&client);
    loop {
        // Subscribe before syncing, so no notice published in between is missed.
        let pubsub = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = match pubsub.await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!("cannot subscribe to fleet deploy notices (retrying): {e}");
                None
            }
        };
        sync_all(&mut conn, &dir).await;
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        let Some(pubsub) = pubsub.as_mut() else {
            tokio::select! {
                _ = resync.tick() => continue,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        };
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        let payload: String = message.get_payload().unwrap_or_default();
                        let name = serde_json::from_str::<serde_json::Value>(&payload)
                            .ok()
                            .and_then(|v| v["name"].as_str().map(str::to_owned));
                        match name {
                            Some(name) => sync_one(&mut conn, &dir, &name).await,
                            None => tracing::warn!(%payload, "ignoring a malformed deploy notice"),
                        }
                    }
                    None => {
                        tracing::warn!("fleet deploy subscription lost; resubscribing");
                        break;
                    }
                },
                _ = resync.tick() => sync_all(&mut conn, &dir).await,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

async fn sync_all(conn: &mut ConnectionManager, dir: &Path) {
    let deployed: Result<BTreeMap<String, String>, _> = conn.hgetall(DEPLOYED_KEY).await;
    match deployed {
        Ok(deployed) => {
            for (name, digest) in deployed {
                sync_to(conn, dir, &name, &digest).await;
            }
        }
        Err(e) => tracing::warn!("cannot read the fleet's deployed plugins: {e}"),
    }
}

async fn sync_one(conn: &mut ConnectionManager, dir: &Path, name: &str) {
    let digest: Result<Option<String>, _> = conn.hget(DEPLOYED_KEY, name).await;
    match digest {
        Ok(Some(digest)) => sync_to(conn, dir, name, &digest).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(plugin = name, "cannot read the deployed version: {e}"),
    }
}

/// Makes `<dir>/<name>.wasm` the blob `digest`, unless it already is.
async fn sync_to(conn: &mut ConnectionManager, dir: &Path, name: &str, digest: &str) {
    if check_name(name).is_err() {
        tracing::warn!(
            plugin = name,
            "ignoring a deployed plugin with an unusable name"
        );
        return;
    }
    let path = dir.join(format!("{name}.wasm"));
    if let Ok(local) = std::fs::read(&path)
        && hex(&Sha256::digest(&local)) == digest
    {
        return;
    }
    let blob: Option<Vec<u8>> = match conn.get(blob_key(digest)).await {
        Ok(blob) => blob,
        Err(e) => {
            tracing::warn!(plugin = name, "cannot fetch the deployed plugin: {e}");
            return;
        }
    };
    let Some(blob) = blob else {
        tracing::error!(
            plugin = name,
            sha256 = digest,
            "deployed plugin blob is missing from Redis"
        );
        return;
    };
    if hex(&Sha256::digest(&blob)) != digest {
        tracing::error!(
            plugin = name,
            sha256 = digest,
            "deployed plugin blob does not match its digest; ignored"
        );
        return;
    }
    let tmp = dir.join(format!(".{name}.wasm.deploy-{}", std::process::id()));
    let written = std::fs::write(&tmp, &blob).and_then(|()| std::fs::rename(&tmp, &path));
    match written {
        Ok(()) => tracing::info!(
            plugin = name,
            sha256 = &digest[..12],
            "fleet deploy written to the plugin directory"
        ),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(
                plugin = name,
                "cannot write the deployed plugin into {}: {e}",
                dir.display()
            );
        }
    }
}
