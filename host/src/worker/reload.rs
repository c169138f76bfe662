//! Config reloads while the worker runs: a changed `taskhost.toml` replaces the grants and
//! the schedule for what starts from then on; a change the running worker cannot take
//! (`[tasks]`, task-name grants, HTTP for a plugin linked without it, memory or table limits
//! above what the sandbox was sized for) is refused with the reason, and the old config stays.

use super::Shared;
use crate::config::{FileConfig, GrantTable};
use std::path::PathBuf;
use std::sync::Arc;

/// Whether `table` grants HTTP to a loaded plugin linked without it.
fn newly_granted_http(table: &GrantTable, registry: &crate::plugins::Registry) -> bool {
    registry
        .plugins()
        .any(|p| !p.http && !table.for_plugin(&p.name).allow_http.is_empty())
}

/// Re-reads the config file when it changes: a valid one replaces the grants for the tasks
/// that start from then on; an invalid one is refused with the reason, and the old one stays.
pub(super) fn config_reloader(
    shared: &Arc<Shared>,
    path: Option<PathBuf>,
) -> impl Fn() + Send + 'static {
    let grants = shared.grants.clone();
    let schedule = shared
        .config
        .schedule
        .is_some()
        .then(|| shared.schedule.clone());
    let max_memory = shared.sandbox.max_memory_bytes();
    let max_table = shared.sandbox.max_table_elements();
    let task_overrides = shared.config.task_overrides.clone();
    let plugins = shared.plugins.clone();
    move || {
        let Some(path) = &path else { return };
        let loaded = FileConfig::load(Some(path)).and_then(|(file, _)| {
            let table = file.grants(&|var| std::env::var(var).ok())?;
            Ok((table, file.schedule()?, file.task_overrides()?))
        });
        let loaded = match loaded {
            Ok((_, _, tasks)) if tasks != *task_overrides => {
                return tracing::error!(
                    file = %path.display(),
                    "config change refused, the previous config stays: a change of [tasks] \
                     (retries, rate and time limits of tasks) needs a restart"
                );
            }
            other => other.map(|(table, schedule, _)| (table, schedule)),
        };
        match loaded {
            Ok((table, _)) if table.max_memory_bytes() > max_memory => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: a memory limit above the \
                 {} MiB this worker started with needs a restart",
                max_memory >> 20
            ),
            Ok((table, _)) if newly_granted_http(&table, &plugins.registry()) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: granting HTTP to a plugin \
                 loaded without an HTTP grant needs a restart (it was linked unable to send)"
            ),
            Ok((table, _)) if !table.same_task_names(&grants.load()) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: a change of the task names \
                 granted to plugins ([plugins.NAME] tasks) needs a restart"
            ),
            Ok((table, _)) if table.max_table_elements() > max_table => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: a table limit above the \
                 {max_table} elements this worker started with needs a restart"
            ),
            Ok((table, entries)) => {
                grants.store(Arc::new(table));
                if let Some(schedule) = &schedule {
                    schedule.send_replace(Arc::new(entries));
                }
                tracing::info!(file = %path.display(), "config reloaded: new grants apply to tasks starting now; the schedule is the file's");
            }
            Err(e) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: {e}"
            ),
        }
    }
}
