//! The live registry of a plugin directory: the current [`Registry`] snapshot, replaced
//! atomically when a file is added, changed or removed. A task resolves its plugin once, from
//! the snapshot of that instant, and runs to the end on that version whatever is swapped in
//! meanwhile.

use super::{
    LoadError, Plugin, Registry, cache::Cache, is_plugin_file, load, plugin_files, plugin_name,
};
use crate::config::GrantTable;
use crate::lock;
use crate::sandbox::Sandbox;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new plugin, or a new version replacing the loaded one.
    Loaded,
    /// The file holds the version already loaded.
    Unchanged,
    /// The file is gone; its plugin is unregistered.
    Removed,
    /// The file was refused; what was loaded before keeps serving.
    Refused,
    /// Nothing to do (not a plugin file, or a file that was never loaded is gone).
    Nothing,
}

struct Refusal {
    reason: String,
    /// Refused because another plugin serves one of its tasks: worth another try when a
    /// plugin is removed.
    duplicate: bool,
}

/// The plugins of one directory, kept current.
pub struct Live {
    registry: ArcSwap<Registry>,
    refused: Mutex<BTreeMap<PathBuf, Refusal>>,
    sandbox: Arc<Sandbox>,
    cache: Option<Cache>,
    dir: PathBuf,
    grants: Arc<ArcSwap<GrantTable>>,
    /// One reload at a time, so each swap starts from the snapshot the previous one made.
    reloading: tokio::sync::Mutex<()>,
    /// Bumped after every change, for whoever reports what this worker runs.
    changes: tokio::sync::watch::Sender<u64>,
    /// Files loaded or swapped in, and files refused, since the start.
    loaded: AtomicU64,
    refusals: AtomicU64,
}

impl Live {
    /// Loads every plugin file of `dir`. Which plugin may serve a task name is the operator's
    /// grant ([`GrantTable::may_serve`]), not the load order; where two plugins' default names
    /// overlap (`a.*` and `a.b.*`), the more specific name keeps what both claim, whichever
    /// loaded first (see [`Live::with_specific`]).
    ///
    /// [`GrantTable::may_serve`]: crate::config::GrantTable::may_serve
    ///
    /// # Errors
    /// Only when the directory cannot be read; a bad file is refused and logged.
    pub async fn open(
        sandbox: Arc<Sandbox>,
        cache: Option<Cache>,
        dir: &Path,
        grants: Arc<ArcSwap<GrantTable>>,
    ) -> anyhow::Result<Self> {
        let files = plugin_files(dir)
            .map_err(|e| anyhow::anyhow!("cannot read plugin directory {}: {e}", dir.display()))?;
        let live = Self {
            registry: ArcSwap::from_pointee(Registry::default()),
            refused: Mutex::new(BTreeMap::new()),
            sandbox,
            cache,
            dir: dir.to_path_buf(),
            grants,
            reloading: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
            loaded: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        };
        {
            let _guard = live.reloading.lock().await;
            for path in files {
                live.reload_locked(&path).await;
            }
        }
        let grants = live.grants.load();
        let registry = live.registry();
        for name in grants.configured() {
            if registry.plugin(name).is_none() {
                tracing::warn!(
                    plugin = name,
                    "taskhost.toml has a section for a plugin that is not loaded"
                );
            }
        }
        Ok(live)
    }

    /// (files loaded or swapped in, files refused) since the start.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.loaded.load(Ordering::Relaxed),
            self.refusals.load(Ordering::Relaxed),
        )
    }

    /// The current snapshot.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files refused at their last attempt, with the reasons.
    pub fn refused(&self) -> Vec<(PathBuf, String)> {
        lock(&self.refused)
            .iter()
            .map(|(p, r)| (p.clone(), r.reason.clone()))
            .collect()
    }

    /// Notified after every change of the registry.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Reloads what changed since the directory was last read without an event saying so:
    /// new files (not already refused), and loaded plugins whose file changed or is gone.
    pub async fn rescan(&self) {
        let mut paths: Vec<PathBuf> = plugin_files(&self.dir).unwrap_or_default();
        {
            let refused = lock(&self.refused);
            paths.retain(|p| !refused.contains_key(p));
        }
        paths.extend(self.registry().plugins().map(|p| p.path.clone()));
        paths.sort();
        paths.dedup();
        for path in paths {
            self.reload(&path).await;
        }
    }

    /// Brings the plugin of `path` up to date with the file: loads a new or changed file
    /// (swapping it in only once it is fully loaded), unregisters a removed one.
    pub async fn reload(&self, path: &Path) -> Change {
        let _guard = self.reloading.lock().await;
        let change = self.reload_locked(path).await;
        if change == Change::Removed {
            // A plugin refused for claiming a task the removed one served may now load.
            let retry: Vec<PathBuf> = lock(&self.refused)
                .iter()
                .filter(|(_, r)| r.duplicate)
                .map(|(p, _)| p.clone())
                .collect();
            for path in retry {
                self.reload_locked(&path).await;
            }
        }
        change
    }

    async fn reload_locked(&self, path: &Path) -> Change {
        if !is_plugin_file(path) {
            return Change::Nothing;
        }
        let name = plugin_name(path);
        let current = self.registry().plugin(&name).cloned();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                lock(&self.refused).remove(path);
                return match current {
                    Some(plugin) if plugin.path == path => self.remove(&plugin),
                    _ => Change::Nothing,
                };
            }
            Err(e) => return self.refuse(path, &LoadError::Read(e), current.as_deref()),
        };
        let grants = self.grants.load_full();
        // A dev build's tasks are in its project's sources, not in the file: `taskhost dev`
        // touches the file when they change, and the same bytes load again.
        let live_sources = grants.for_plugin(&name).dev_sources.is_some();
        if let Some(plugin) = &current
            && !live_sources
        {
            use sha2::Digest;
            if plugin.digest == super::cache::hex(&sha2::Sha256::digest(&bytes)) {
                lock(&self.refused).remove(path);
                return Change::Unchanged;
            }
        }
        let plugin = match load(&self.sandbox, self.cache.as_ref(), path, bytes, &grants).await {
            Ok(plugin) => Arc::new(plugin),
            Err(e) => return self.refuse(path, &e, current.as_deref()),
        };
        // The operator owns the names: a plugin serves only those granted to it.
        let granted = plugin
            .tasks
            .iter()
            .try_for_each(|task| grants.may_serve(&plugin.name, &task.name));
        if let Err(refusal) = granted {
            return self.refuse(path, &refusal.into(), current.as_deref());
        }
        let next = match self.with_specific(&plugin, &grants) {
            Ok(next) => next,
            Err(e) => return self.refuse(path, &e, current.as_deref()),
        };
        self.registry.store(Arc::new(next));
        self.changes.send_modify(|n| *n += 1);
        self.loaded.fetch_add(1, Ordering::Relaxed);
        lock(&self.refused).remove(path);
        let tasks = plugin
            .tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let source = match plugin.source {
            super::cache::Source::Cache => "cache",
            super::cache::Source::Compiled => "compiled",
        };
        match &current {
            Some(old) => tracing::info!(
                plugin = %plugin.name, from = %old.version, to = %plugin.version,
                wit = %plugin.wit_version, code = %source, %tasks, "plugin swapped"
            ),
            None => tracing::info!(
                plugin = %plugin.name, version = %plugin.version, wit = %plugin.wit_version,
                code = %source, %tasks, "plugin loaded"
            ),
        }
        Change::Loaded
    }

    /// The registry with `plugin` added. Where a loaded plugin serves one of its tasks only
    /// by a default grant less specific than the newcomer's (plugin `a` serving `a.b.x` as
    /// `a.*`, the newcomer being `a.b`), the newcomer keeps the name, whichever came first:
    /// the less specific plugin is unloaded and refused while it claims the name, and tried
    /// again when a plugin goes.
    fn with_specific(
        &self,
        plugin: &Arc<Plugin>,
        grants: &GrantTable,
    ) -> Result<Registry, LoadError> {
        let by_default = |name: &str| grants.for_plugin(name).tasks.is_none();
        let mut registry = self.registry();
        let mut unloaded: Vec<(Arc<Plugin>, String)> = Vec::new();
        loop {
            match registry.with(plugin.clone()) {
                Ok(next) => {
                    for (old, task) in unloaded {
                        let error = LoadError::Duplicate {
                            task,
                            other: plugin.name.to_string(),
                        };
                        self.refuse_loaded(&old, &error);
                    }
                    return Ok(next);
                }
                Err(LoadError::Duplicate { task, other })
                    if by_default(&other)
                        && by_default(&plugin.name)
                        && more_specific(&plugin.name, &other, &task) =>
                {
                    let Some(old) = registry.plugin(&other).cloned() else {
                        return Err(LoadError::Duplicate { task, other });
                    };
                    registry = Arc::new(registry.without(&other));
                    unloaded.push((old, task));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Records a loaded plugin the registry being stored no longer holds, with why.
    fn refuse_loaded(&self, plugin: &Plugin, error: &LoadError) {
        tracing::warn!(
            plugin = %plugin.name, version = %plugin.version,
            "plugin unloaded: {error} (a more specific plugin name keeps the names both claim \
             by default; give either a `tasks` grant to decide otherwise)"
        );
        self.refuse(&plugin.path, error, None);
    }

    fn remove(&self, plugin: &Plugin) -> Change {
        self.registry
            .store(Arc::new(self.registry().without(&plugin.name)));
        self.changes.send_modify(|n| *n += 1);
        tracing::info!(
            plugin = %plugin.name, version = %plugin.version,
            "plugin removed: its tasks are no longer served"
        );
        Change::Removed
    }

    fn refuse(&self, path: &Path, error: &LoadError, current: Option<&Plugin>) -> Change {
        let reason = error.to_string();
        self.refusals.fetch_add(1, Ordering::Relaxed);
        match current {
            Some(plugin) => tracing::error!(
                file = %path.display(), serving = %plugin.version,
                "plugin refused, the loaded version keeps serving: {reason}"
            ),
            None => tracing::error!(file = %path.display(), "plugin refused: {reason}"),
        }
        lock(&self.refused).insert(
            path.to_path_buf(),
            Refusal {
                reason,
                duplicate: matches!(error, LoadError::Duplicate { .. }),
            },
        );
        Change::Refused
    }
}

/// Whether plugin `newcomer`'s default names are more specific than plugin `other`'s for
/// `task`: `other` is a dotted prefix of `newcomer`, which is one of `task`.
fn more_specific(newcomer: &str, other: &str, task: &str) -> bool {
    let under = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    under(newcomer, other) && under(task, newcomer)
}

#[cfg(test)]
mod tests {
    use super::more_specific;

    #[test]
    fn the_longer_dotted_plugin_name_is_the_more_specific() {
        assert!(more_specific("a.b", "a", "a.b.x"));
        assert!(!more_specific("a", "a.b", "a.b.x"), "the shorter name");
        assert!(!more_specific("ab", "a", "ab.x"), "not a dotted prefix");
        assert!(
            !more_specific("a.b", "a", "a.c"),
            "the task is not under the newcomer"
        );
    }
}
