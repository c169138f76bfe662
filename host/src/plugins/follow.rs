//! Fleet deploys, a worker's side: keeping the plugin directory in line with what `taskhost
//! deploy` published (for `worker --fleet`), and reporting the versions this worker runs (for
//! `taskhost deployments`).
//!
//! A fleet worker syncs at start (so a worker joining later gets the current versions), on
//! every deploy notice, and every [`RESYNC`] in case a notice was missed: it checks the deploy
//! against `[fleet]` (a name it may install; with `trusted_keys`, a record signed by one of
//! them and not older than the last it installed for that name; a blob within the size cap),
//! fetches the blob, checks its SHA-256, and writes it into its plugin directory under a hidden
//! name then renames it into place — from there the directory watcher hot-reloads it like any
//! other change. A refused deploy is logged once, with the reason, and the running version
//! stays. The newest record installed per name is kept in `.fleet-installed.json` in the
//! directory, so a restart does not forget it.

use super::cache::hex;
use super::check_name;
use super::live::Live;
use crate::config::FleetTrust;
use crate::lock;
use crate::redis::fleet::{self, REPORT_TTL};
use crate::redis::{Client, Connection};
use crate::shutdown::Stopping;
use crate::signing::DeployRecord;
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The file, in the plugin directory, that keeps the newest signed record installed per name.
const INSTALLED_FILE: &str = ".fleet-installed.json";

/// What a fleet worker accepts, and what it installed.
struct Policy {
    /// `[fleet]` as last loaded: a config reload replaces it.
    trust: Arc<ArcSwap<FleetTrust>>,
    dir: PathBuf,
    /// Plugin name → time of the newest signed record installed (ms since the epoch).
    installed: Mutex<BTreeMap<String, i64>>,
    /// Refusals already logged (name, digest, reason): each is said once.
    said: Mutex<HashSet<String>>,
}

impl Policy {
    fn new(trust: Arc<ArcSwap<FleetTrust>>, dir: &Path) -> Self {
        let installed = std::fs::read(dir.join(INSTALLED_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            trust,
            dir: dir.to_path_buf(),
            installed: Mutex::new(installed),
            said: Mutex::new(HashSet::new()),
        }
    }

    fn newest(&self, name: &str) -> Option<i64> {
        lock(&self.installed).get(name).copied()
    }

    fn remember(&self, record: &DeployRecord) {
        let text = {
            let mut installed = lock(&self.installed);
            installed.insert(record.name.clone(), record.time_ms);
            serde_json::to_vec(&*installed).unwrap_or_default()
        };
        if let Err(e) = std::fs::write(self.dir.join(INSTALLED_FILE), text) {
            tracing::warn!("cannot record the installed deploy in {INSTALLED_FILE}: {e}");
        }
    }

    fn refuse(&self, name: &str, digest: &str, reason: &str) {
        if lock(&self.said).insert(format!("{name} {digest} {reason}")) {
            tracing::error!(
                plugin = name,
                sha256 = digest.get(..12).unwrap_or(digest),
                "fleet deploy refused, the running version stays: {reason}"
            );
        }
    }
}

/// How often a fleet worker re-checks the deployed versions without a notice.
pub const RESYNC: Duration = Duration::from_secs(30);

/// Reports what `live` runs under `node` after every change and every third of the report's
/// lifetime, until `stop`; then removes the report.
pub async fn report_running(
    mut conn: Connection,
    node: String,
    live: Arc<Live>,
    mut stop: Stopping,
) {
    let mut changes = live.subscribe();
    loop {
        let registry = live.registry();
        let running = registry.plugins().map(|p| (&*p.name, p.version.as_str()));
        if let Err(e) = fleet::report_running(&mut conn, &node, running).await {
            tracing::debug!("cannot report running plugin versions: {e}");
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(REPORT_TTL / 3) => {}
            () = crate::shutdown::stopped(&mut stop) => {
                if let Err(e) = fleet::remove_report(&mut conn, &node).await {
                    tracing::debug!("cannot remove the report of running plugins: {e}");
                }
                return;
            }
        }
    }
}

/// Keeps `dir` in line with the fleet's deployed versions that `trust` accepts, until `stop`
/// (for `--fleet`).
pub async fn follow(
    client: Client,
    mut conn: Connection,
    dir: PathBuf,
    trust: Arc<ArcSwap<FleetTrust>>,
    mut stop: Stopping,
) {
    if trust.load().trusted_keys.is_empty() {
        tracing::warn!(
            "fleet: no [fleet] trusted_keys, so anyone who can write to Redis can deploy code \
             to this worker; sign deploys (taskhost keygen, taskhost deploy --sign-key) and \
             trust the key"
        );
    }
    let policy = Policy::new(trust, &dir);
    let policy = &policy;
    loop {
        // Subscribe before syncing, so no notice published in between is missed.
        let mut notices = match fleet::subscribe(&client).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot subscribe to fleet deploy notices (retrying): {e}");
                None
            }
        };
        sync_all(&mut conn, policy).await;
        let mut resync = tokio::time::interval(RESYNC);
        resync.tick().await;
        let Some(notices) = notices.as_mut() else {
            tokio::select! {
                _ = resync.tick() => continue,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        };
        loop {
            tokio::select! {
                notice = notices.next() => match notice {
                    Some(payload) => match fleet::notice_name(&payload) {
                        Some(name) => sync_one(&mut conn, policy, &name).await,
                        None => tracing::warn!(
                            payload = %String::from_utf8_lossy(&payload),
                            "ignoring a malformed deploy notice"
                        ),
                    },
                    None => {
                        tracing::warn!("fleet deploy subscription lost; resubscribing");
                        break;
                    }
                },
                _ = resync.tick() => sync_all(&mut conn, policy).await,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

async fn sync_all(conn: &mut Connection, policy: &Policy) {
    match fleet::deployed(conn).await {
        Ok(deployed) => {
            for (name, digest) in deployed {
                sync_to(conn, policy, &name, &digest).await;
            }
        }
        Err(e) => tracing::warn!("cannot read the fleet's deployed plugins: {e}"),
    }
}

async fn sync_one(conn: &mut Connection, policy: &Policy, name: &str) {
    match fleet::deployed_digest(conn, name).await {
        Ok(Some(digest)) => sync_to(conn, policy, name, &digest).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(plugin = name, "cannot read the deployed version: {e}"),
    }
}

/// Makes `<dir>/<name>.wasm` the blob `digest`, unless it already is or `policy` refuses it.
async fn sync_to(conn: &mut Connection, policy: &Policy, name: &str, digest: &str) {
    if check_name(name).is_err() {
        return policy.refuse(name, digest, "the name is not a usable file name");
    }
    let trust = policy.trust.load_full();
    if !trust.allows_name(name) {
        return policy.refuse(name, digest, "the name is not among [fleet] names");
    }
    let path = policy.dir.join(format!("{name}.wasm"));
    if let Ok(local) = std::fs::read(&path)
        && hex(&Sha256::digest(&local)) == digest
    {
        return;
    }
    let record = if trust.trusted_keys.is_empty() {
        None
    } else {
        let stored = match fleet::record(conn, name).await {
            Ok(stored) => stored,
            Err(e) => return tracing::warn!(plugin = name, "cannot read the deploy record: {e}"),
        };
        let trusted = &trust.trusted_keys;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let oldest = trust.max_record_age.map(|age| {
            let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
            (now.saturating_sub(age), now)
        });
        let (newest, entry) = (policy.newest(name), (name, digest));
        match DeployRecord::verify(stored.as_deref(), entry, trusted, newest, oldest) {
            Ok(record) => Some(record),
            Err(e) => return policy.refuse(name, digest, &e.to_string()),
        }
    };
    let Some(blob) = fetch(conn, policy, name, digest).await else {
        return;
    };
    if write_into(&policy.dir, &path, name, digest, &blob)
        && let Some(record) = &record
    {
        policy.remember(record);
    }
}

/// The blob `digest`, if it is stored, within the size cap, and matches its digest.
async fn fetch(
    conn: &mut Connection,
    policy: &Policy,
    name: &str,
    digest: &str,
) -> Option<Vec<u8>> {
    let cap = policy.trust.load().max_blob_bytes;
    match fleet::blob_len(conn, digest).await {
        Ok(len) if len > cap => {
            let reason = format!("the blob is {len} bytes, over [fleet] max_blob_mb ({cap} bytes)");
            policy.refuse(name, digest, &reason);
            return None;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(plugin = name, "cannot read the deployed plugin's size: {e}");
            return None;
        }
    }
    let blob = match fleet::blob(conn, digest).await {
        Ok(Some(blob)) => blob,
        Ok(None) => {
            policy.refuse(name, digest, "the deployed blob is missing from Redis");
            return None;
        }
        Err(e) => {
            tracing::warn!(plugin = name, "cannot fetch the deployed plugin: {e}");
            return None;
        }
    };
    if hex(&Sha256::digest(&blob)) != digest {
        policy.refuse(name, digest, "the deployed blob does not match its digest");
        return None;
    }
    Some(blob)
}

/// Writes `blob` under a hidden name, then renames it to `path`: the watcher never sees half
/// of it.
fn write_into(dir: &Path, path: &Path, name: &str, digest: &str, blob: &[u8]) -> bool {
    let tmp = dir.join(format!(".{name}.wasm.deploy-{}", std::process::id()));
    match std::fs::write(&tmp, blob).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => {
            tracing::info!(
                plugin = name,
                sha256 = digest.get(..12).unwrap_or(digest),
                "fleet deploy written to the plugin directory"
            );
            true
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(
                plugin = name,
                "cannot write the deployed plugin into {}: {e}",
                dir.display()
            );
            false
        }
    }
}
