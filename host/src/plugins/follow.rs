//! Fleet deploys, a worker's side: keeping the plugin directory in line with what `taskhost
//! deploy` published (for `worker --fleet`), and reporting the versions this worker runs (for
//! `taskhost deployments`).
//!
//! A fleet worker syncs at start (so a worker joining later gets the current versions), on
//! every deploy notice, and every [`RESYNC`] in case a notice was missed: it fetches the blob,
//! checks its SHA-256, and writes it into its plugin directory under a hidden name then renames
//! it into place — from there the directory watcher hot-reloads it like any other change.

use super::cache::hex;
use super::check_name;
use super::live::Live;
use crate::redis::fleet::{self, REPORT_TTL};
use crate::redis::{Client, Connection};
use crate::shutdown::Stopping;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// Keeps `dir` in line with the fleet's deployed versions until `stop` (for `--fleet`).
pub async fn follow(client: Client, mut conn: Connection, dir: PathBuf, mut stop: Stopping) {
    loop {
        // Subscribe before syncing, so no notice published in between is missed.
        let mut notices = match fleet::subscribe(&client).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot subscribe to fleet deploy notices (retrying): {e}");
                None
            }
        };
        sync_all(&mut conn, &dir).await;
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
                        Some(name) => sync_one(&mut conn, &dir, &name).await,
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
                _ = resync.tick() => sync_all(&mut conn, &dir).await,
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

async fn sync_all(conn: &mut Connection, dir: &Path) {
    match fleet::deployed(conn).await {
        Ok(deployed) => {
            for (name, digest) in deployed {
                sync_to(conn, dir, &name, &digest).await;
            }
        }
        Err(e) => tracing::warn!("cannot read the fleet's deployed plugins: {e}"),
    }
}

async fn sync_one(conn: &mut Connection, dir: &Path, name: &str) {
    match fleet::deployed_digest(conn, name).await {
        Ok(Some(digest)) => sync_to(conn, dir, name, &digest).await,
        Ok(None) => {}
        Err(e) => tracing::warn!(plugin = name, "cannot read the deployed version: {e}"),
    }
}

/// Makes `<dir>/<name>.wasm` the blob `digest`, unless it already is.
async fn sync_to(conn: &mut Connection, dir: &Path, name: &str, digest: &str) {
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
    let blob = match fleet::blob(conn, digest).await {
        Ok(Some(blob)) => blob,
        Ok(None) => {
            tracing::error!(
                plugin = name,
                sha256 = digest,
                "deployed plugin blob is missing from Redis"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(plugin = name, "cannot fetch the deployed plugin: {e}");
            return;
        }
    };
    if hex(&Sha256::digest(&blob)) != digest {
        tracing::error!(
            plugin = name,
            sha256 = digest,
            "deployed plugin blob does not match its digest; ignored"
        );
        return;
    }
    write_into(dir, &path, name, digest, &blob);
}

/// Writes `blob` under a hidden name, then renames it to `path`: the watcher never sees half
/// of it.
fn write_into(dir: &Path, path: &Path, name: &str, digest: &str, blob: &[u8]) {
    let tmp = dir.join(format!(".{name}.wasm.deploy-{}", std::process::id()));
    match std::fs::write(&tmp, blob).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => tracing::info!(
            plugin = name,
            sha256 = digest.get(..12).unwrap_or(digest),
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
