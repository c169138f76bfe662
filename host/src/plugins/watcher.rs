//! Watches the plugin directory (and the config file) and reloads what changed.
//!
//! File-system events are debounced per file: a file is reloaded once it has seen no event for
//! [`QUIET`], so a rename into place, an in-place overwrite and a slow chunked write each cause
//! one load of the finished file. A writer that pauses longer than that gets its half-written
//! file refused (the loaded version keeps serving) and the file is tried again on its next
//! change. Loading runs in the reload task, compiling on a blocking thread: the workers'
//! fetch → run loop never waits for it.

use super::live::Live;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a file must be left alone before it is loaded.
pub const QUIET: Duration = Duration::from_millis(100);

/// A running watcher; dropping it stops the file-system watch.
pub struct Watcher {
    _watcher: RecommendedWatcher,
}

/// Starts watching `live`'s directory, and `config` if given (calling `on_config` when it
/// changes), until `stop` turns true.
///
/// # Errors
/// When the directory (or the config file's directory) cannot be watched.
pub fn watch(
    live: Arc<Live>,
    config: Option<PathBuf>,
    on_config: impl Fn() + Send + 'static,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Watcher> {
    let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        if relevant {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    watcher
        .watch(live.dir(), RecursiveMode::NonRecursive)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot watch plugin directory {}: {e}",
                live.dir().display()
            )
        })?;
    let config_name = match &config {
        Some(path) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if parent != live.dir() {
                watcher
                    .watch(parent, RecursiveMode::NonRecursive)
                    .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", parent.display()))?;
            }
            path.file_name().map(|n| n.to_os_string())
        }
        None => None,
    };
    tokio::spawn(debounce(live, rx, config_name, on_config, stop));
    Ok(Watcher { _watcher: watcher })
}

async fn debounce(
    live: Arc<Live>,
    mut events: mpsc::UnboundedReceiver<PathBuf>,
    config_name: Option<std::ffi::OsString>,
    on_config: impl Fn(),
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let next_due = pending.values().min().copied();
        tokio::select! {
            event = events.recv() => match event {
                Some(path) => {
                    pending.insert(path, Instant::now() + QUIET);
                }
                None => return,
            },
            () = sleep_until(next_due) => {
                let now = Instant::now();
                let due: Vec<PathBuf> = pending
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for path in due {
                    pending.remove(&path);
                    let is_config = config_name.is_some() && path.file_name() == config_name.as_deref();
                    if is_config {
                        on_config();
                    } else if path.parent() == Some(live.dir()) {
                        live.reload(&path).await;
                    }
                }
            }
            () = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
