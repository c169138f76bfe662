//! Plugins: loading `.wasm` files into linked, ready-to-instantiate plugins, and the registry
//! that resolves a task name to the plugin serving it.
//!
//! A plugin is named by its file stem (`crucible.wasm` is `crucible`, the name its grants are
//! under) and identified by the hash of its bytes. Loading compiles on a blocking thread, links,
//! asks the plugin for its `tasks()`, and only then admits it; a file that fails any step is
//! refused with the reason and nothing of it is served.

use crate::config::GrantTable;
use crate::sandbox::{PluginPre, PrepareError, Sandbox, Scope, TaskDefaults};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a plugin file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error("its tasks() lists no task")]
    NoTasks,
    #[error("its tasks() lists an invalid task name {0:?}")]
    BadTaskName(String),
    #[error("task {task:?} is already served by plugin {other:?}; refusing this one")]
    Duplicate { task: String, other: String },
}

/// A loaded plugin.
pub struct Plugin {
    pub name: Arc<str>,
    pub path: PathBuf,
    /// First 12 hex digits of the SHA-256 of the file.
    pub version: String,
    /// The `taskhost:plugin` WIT version it was built against.
    pub wit_version: String,
    pub tasks: Vec<TaskSpec>,
    pub pre: PluginPre,
}

/// One task a plugin serves, with the defaults it declared.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub defaults: TaskDefaults,
}

/// A refused plugin file and why.
#[derive(Debug)]
pub struct Refused {
    pub path: PathBuf,
    pub error: LoadError,
}

/// Every plugin loaded from a directory, and which serves which task.
#[derive(Default)]
pub struct Registry {
    plugins: Vec<Arc<Plugin>>,
    tasks: HashMap<String, (Arc<Plugin>, TaskSpec)>,
    refused: Vec<Refused>,
}

impl Registry {
    /// Loads every `.wasm` file of `dir`, in name order (so which of two plugins claiming one
    /// task wins is deterministic: the first by file name).
    ///
    /// # Errors
    /// Only when the directory cannot be read; a bad plugin file is recorded in
    /// [`Registry::refused`] and logged.
    pub async fn load_dir(
        sandbox: &Arc<Sandbox>,
        dir: &Path,
        grants: &GrantTable,
    ) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| anyhow::anyhow!("cannot read plugin directory {}: {e}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| crate::sandbox::is_plugin_file(p) && p.is_file())
            .collect();
        paths.sort();
        let mut registry = Self::default();
        for path in paths {
            let result = match load_file(sandbox, &path, grants).await {
                Ok(plugin) => registry.admit(plugin),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                tracing::error!(file = %path.display(), "plugin refused: {error}");
                registry.refused.push(Refused { path, error });
            }
        }
        for name in grants.configured() {
            if !registry.plugins.iter().any(|p| &*p.name == name) {
                tracing::warn!(
                    plugin = name,
                    "taskhost.toml has a section for a plugin that is not loaded"
                );
            }
        }
        Ok(registry)
    }

    fn admit(&mut self, plugin: Plugin) -> Result<(), LoadError> {
        for task in &plugin.tasks {
            if let Some((other, _)) = self.tasks.get(&task.name) {
                return Err(LoadError::Duplicate {
                    task: task.name.clone(),
                    other: other.name.to_string(),
                });
            }
        }
        let plugin = Arc::new(plugin);
        tracing::info!(
            plugin = %plugin.name, version = %plugin.version, wit = %plugin.wit_version,
            tasks = %plugin.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","),
            "plugin loaded"
        );
        for task in &plugin.tasks {
            self.tasks
                .insert(task.name.clone(), (plugin.clone(), task.clone()));
        }
        self.plugins.push(plugin);
        Ok(())
    }

    /// The plugin serving `task`, and the task's declared defaults.
    pub fn resolve(&self, task: &str) -> Option<(&Arc<Plugin>, &TaskSpec)> {
        self.tasks.get(task).map(|(p, t)| (p, t))
    }

    /// Loaded plugins, in load order.
    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// Files that were refused, with the reasons.
    pub fn refused(&self) -> &[Refused] {
        &self.refused
    }

    /// Every task name served, sorted.
    pub fn task_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// Loads one plugin file: read, hash, compile and link (on a blocking thread), list its tasks.
pub async fn load_file(
    sandbox: &Arc<Sandbox>,
    path: &Path,
    grants: &GrantTable,
) -> Result<Plugin, LoadError> {
    let bytes = std::fs::read(path)?;
    let version = hex_prefix(&Sha256::digest(&bytes), 6);
    let name: Arc<str> = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .into();
    let compiler = sandbox.clone();
    let (pre, wit_version) = tokio::task::spawn_blocking(move || compiler.prepare(&bytes))
        .await
        .map_err(|e| PrepareError::Compile(format!("compiler thread failed: {e}")))??;
    let scope = Scope {
        plugin: name.clone(),
        task_name: "tasks()".into(),
        task_id: "-".into(),
        grants: grants.for_plugin(&name),
        progress: None,
    };
    let infos = sandbox.tasks(&pre, scope).await?;
    if infos.is_empty() {
        return Err(LoadError::NoTasks);
    }
    let mut tasks: Vec<TaskSpec> = Vec::with_capacity(infos.len());
    for info in infos {
        let valid = !info.name.is_empty()
            && info.name.len() <= 200
            && !info
                .name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            return Err(LoadError::BadTaskName(info.name));
        }
        if tasks.iter().any(|t| t.name == info.name) {
            return Err(LoadError::Duplicate {
                task: info.name,
                other: name.to_string(),
            });
        }
        tasks.push(TaskSpec {
            name: info.name,
            defaults: info.defaults,
        });
    }
    Ok(Plugin {
        name,
        path: path.to_path_buf(),
        version,
        wit_version,
        tasks,
        pre,
    })
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes.iter().take(n).map(|b| format!("{b:02x}")).collect()
}
