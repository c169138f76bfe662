//! Plugins: loading `.wasm` files into linked, ready-to-instantiate plugins, the registry that
//! resolves a task name to the plugin serving it, and keeping that registry current as the
//! plugin directory changes.
//!
//! A plugin is named by its file stem (`crucible.wasm` is `crucible`, the name its grants are
//! under) and identified by the hash of its bytes plus the version it declares. Loading compiles
//! on a blocking thread (or takes the compiled code from the [`cache`]), links, asks the plugin
//! for its version and tasks, and only then admits it; a file that fails any step is refused
//! with the reason and the version already loaded, if any, keeps serving.
//!
//! - [`Registry`]: an immutable snapshot: which plugin serves which task.
//! - [`live`]: the current snapshot, swapped atomically on every change.
//! - [`watcher`]: turns file-system events on the directory into reloads.
//! - [`cache`]: the on-disk precompile cache.
//! - [`follow`]: keeping the directory in line with fleet deploys (`worker --fleet`), and
//!   reporting what runs.

pub mod cache;
pub mod follow;
pub mod live;
pub mod watcher;

use crate::config::{GrantTable, Rate};
use crate::sandbox::{PluginPre, PrepareError, Sandbox, Scope, TaskDefaults};
use cache::{Cache, Source};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
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
    #[error(transparent)]
    NotGranted(#[from] crate::config::NameRefusal),
}

/// A loaded plugin.
pub struct Plugin {
    pub name: Arc<str>,
    pub path: PathBuf,
    /// The version operators see: the plugin's declared version and the first 12 hex digits
    /// of the SHA-256 of its file, e.g. `0.1.0+3f2a9c01b2d4`.
    pub version: String,
    /// The full SHA-256 of the file.
    pub digest: String,
    /// The `taskhost:plugin` WIT version it was built against.
    pub wit_version: String,
    pub tasks: Vec<TaskSpec>,
    pub pre: PluginPre,
    /// Whether the compiled code came from the precompile cache.
    pub source: Source,
    /// Whether it was linked able to send HTTP (it had an HTTP grant when it loaded).
    pub http: bool,
}

/// One task a plugin serves, with the defaults it declared.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub defaults: TaskDefaults,
    /// Its declared `rate_limit`, parsed when the plugin loaded (an invalid one is logged
    /// then, and ignored).
    pub rate: Option<Rate>,
}

/// A snapshot of the loaded plugins and which serves which task. Changes make a new snapshot.
#[derive(Default, Clone)]
pub struct Registry {
    plugins: BTreeMap<Arc<str>, Arc<Plugin>>,
    tasks: HashMap<String, (Arc<Plugin>, TaskSpec)>,
}

impl Registry {
    /// This registry with `plugin` added, or replacing the plugin of the same name.
    ///
    /// # Errors
    /// [`LoadError::Duplicate`] when another plugin serves one of its tasks: the newcomer is
    /// refused, the plugin already serving keeps it.
    pub fn with(&self, plugin: Arc<Plugin>) -> Result<Self, LoadError> {
        for task in &plugin.tasks {
            if let Some((other, _)) = self.tasks.get(&task.name)
                && other.name != plugin.name
            {
                return Err(LoadError::Duplicate {
                    task: task.name.clone(),
                    other: other.name.to_string(),
                });
            }
        }
        let mut next = self.without(&plugin.name);
        for task in &plugin.tasks {
            next.tasks
                .insert(task.name.clone(), (plugin.clone(), task.clone()));
        }
        next.plugins.insert(plugin.name.clone(), plugin);
        Ok(next)
    }

    /// This registry without the plugin named `name`.
    pub fn without(&self, name: &str) -> Self {
        let mut next = self.clone();
        next.plugins.remove(name);
        next.tasks.retain(|_, (p, _)| &*p.name != name);
        next
    }

    /// The plugin serving `task`, and the task's declared defaults.
    pub fn resolve(&self, task: &str) -> Option<(&Arc<Plugin>, &TaskSpec)> {
        self.tasks.get(task).map(|(p, t)| (p, t))
    }

    /// The plugin named `name`.
    pub fn plugin(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// Loaded plugins, by name.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.values()
    }

    /// Every task name served, sorted.
    pub fn task_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// The tasks a plugin declared, checked: at least one, valid names, none twice.
fn task_specs(
    plugin: &str,
    infos: Vec<crate::sandbox::TaskInfo>,
) -> Result<Vec<TaskSpec>, LoadError> {
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
                other: plugin.to_owned(),
            });
        }
        let rate = declared_rate(plugin, &info);
        tasks.push(TaskSpec {
            name: info.name,
            defaults: info.defaults,
            rate,
        });
    }
    Ok(tasks)
}

/// A task's declared rate limit; an invalid one is logged and ignored (the operator's
/// `[tasks."NAME"] rate_limit` or remote control can still set one).
fn declared_rate(plugin: &str, info: &crate::sandbox::TaskInfo) -> Option<Rate> {
    let text = info.defaults.rate_limit.as_deref()?;
    Rate::parse(text)
        .inspect_err(|e| {
            tracing::warn!(plugin, task = %info.name, "ignoring the declared rate limit: {e}");
        })
        .ok()
}

/// Why a name cannot be a plugin's.
#[derive(Debug, thiserror::Error)]
#[error("plugin name {0:?} is not a valid file stem (letters, digits, '-', '_', '.')")]
pub struct BadName(pub String);

/// Checks a plugin name can be a file stem in every worker's directory.
pub fn check_name(name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BadName(name.to_owned()))
    }
}

/// The plugin name of a file: its stem.
pub fn plugin_name(path: &Path) -> Arc<str> {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .into()
}

/// Whether `path` names a plugin file: `*.wasm`, not hidden (a leading dot marks a file still
/// being written, e.g. `.demo.wasm.tmp` or `.demo.wasm`).
pub fn is_plugin_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    !hidden && path.extension().is_some_and(|e| e == "wasm")
}

/// The plugin files of `dir`, in name order.
pub fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| is_plugin_file(p) && p.is_file())
        .collect();
    paths.sort();
    Ok(paths)
}

/// Loads one plugin from `bytes` read from `path`: compile (or take from the cache) and link
/// on a blocking thread, then ask for its version and tasks.
/// Compiles `wasm`, saying so before and after: a large component (a Python or JavaScript
/// runtime) takes Cranelift many seconds on a small machine, and an operator watching a
/// starting worker should see why it is not ready yet.
fn compile_noted(
    sandbox: &Sandbox,
    wasm: &[u8],
    plugin: &str,
) -> Result<wasmtime::component::Component, PrepareError> {
    let started = std::time::Instant::now();
    let size_mb = format!("{:.1}", wasm.len() as f64 / 1e6);
    tracing::info!(
        plugin,
        size_mb,
        "compiling plugin: no precompiled code for it yet, and a large component takes a while"
    );
    let component = sandbox.compile(wasm)?;
    tracing::info!(
        plugin,
        ms = started.elapsed().as_millis(),
        "plugin compiled"
    );
    Ok(component)
}

pub async fn load(
    sandbox: &Arc<Sandbox>,
    cache: Option<&Cache>,
    path: &Path,
    bytes: Vec<u8>,
    grants: &GrantTable,
) -> Result<Plugin, LoadError> {
    let digest = cache::hex(&Sha256::digest(&bytes));
    let name = plugin_name(path);
    let (compiler, cache, key, plugin) = (
        sandbox.clone(),
        cache.cloned(),
        digest.clone(),
        name.clone(),
    );
    let plugin_grants = grants.for_plugin(&name);
    let http = !plugin_grants.allow_http.is_empty();
    let (pre, wit_version, source) = tokio::task::spawn_blocking(move || {
        let compile = |wasm: &[u8]| compile_noted(&compiler, wasm, &plugin);
        let (component, source) = match &cache {
            Some(cache) => cache.load_or_compile(&compiler, &bytes, &key, compile)?,
            None => (compile(&bytes)?, Source::Compiled),
        };
        let recyclable = crate::sandbox::recyclable(&bytes);
        let (pre, wit_version) = compiler.link(&component, http, recyclable)?;
        Ok::<_, PrepareError>((pre, wit_version, source))
    })
    .await
    .map_err(|e| PrepareError::Compile(format!("compiler thread failed: {e}")))??;
    let scope = Scope {
        plugin: name.clone(),
        task_name: "describe".into(),
        task_id: "-".into(),
        grants: plugin_grants,
        progress: None,
        outbox: None,
        trace: None,
    };
    let (declared, infos) = sandbox.describe(&pre, scope).await?;
    let tasks = task_specs(&name, infos)?;
    let declared: String = declared
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    Ok(Plugin {
        version: format!(
            "{}+{}",
            if declared.is_empty() { "0" } else { &declared },
            &digest[..12]
        ),
        name,
        path: path.to_path_buf(),
        digest,
        wit_version,
        tasks,
        pre,
        source,
        http,
    })
}
