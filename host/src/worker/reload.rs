//! Config reloads while the worker runs: a changed `taskhost.toml` replaces the grants and
//! the schedule for what starts from then on; a change the running worker cannot take
//! (`[tasks]`, task-name grants, HTTP for a plugin linked without it, memory or table limits
//! above what the sandbox was sized for) is refused with the reason, and the old config stays.

use super::Shared;
use crate::config::{FileConfig, GrantTable};
use std::path::PathBuf;
use std::sync::Arc;

/// What the running worker was started with, that a reload cannot change.
struct Fixed {
    max_memory: usize,
    max_table: u32,
    task_overrides: crate::config::TaskOverrides,
    grants: Arc<arc_swap::ArcSwap<GrantTable>>,
    plugins: Arc<crate::plugins::live::Live>,
    dev_sources: Vec<(String, PathBuf)>,
}

impl Fixed {
    /// Why the new `table` and `tasks` need a restart, if they do.
    fn needs_restart(&self, table: &GrantTable, tasks: &TaskSections) -> Option<String> {
        if *tasks != *self.task_overrides {
            return Some("a change of [tasks] (retries, rate and time limits of tasks)".into());
        }
        if table.max_memory_bytes() > self.max_memory {
            let mib = self.max_memory >> 20;
            return Some(format!(
                "a memory limit above the {mib} MiB this worker started with"
            ));
        }
        if table.max_table_elements() > self.max_table {
            let max = self.max_table;
            return Some(format!(
                "a table limit above the {max} elements this worker started with"
            ));
        }
        if !table.same_task_names(&self.grants.load()) {
            return Some(
                "a change of the task names granted to plugins ([plugins.NAME] tasks)".into(),
            );
        }
        let registry = self.plugins.registry();
        let newly = registry
            .plugins()
            .find(|p| !p.http && !table.for_plugin(&p.name).allow_http.is_empty());
        newly.map(|p| {
            format!(
                "granting HTTP to plugin {} (loaded without an HTTP grant, it was linked unable to send)",
                p.name
            )
        })
    }
}

type TaskSections = std::collections::HashMap<String, crate::config::TaskSection>;

/// Re-reads the config file when it changes: a valid one replaces the grants (and the
/// schedule) for what starts from then on; an invalid one, or one the running worker cannot
/// take, is refused with the reason, and the old one stays.
pub(super) fn config_reloader(
    shared: &Arc<Shared>,
    path: Option<PathBuf>,
) -> impl Fn() + Send + 'static {
    let schedule = shared
        .config
        .schedule
        .is_some()
        .then(|| shared.schedule.clone());
    let fixed = Fixed {
        max_memory: shared.sandbox.max_memory_bytes(),
        max_table: shared.sandbox.max_table_elements(),
        task_overrides: shared.config.task_overrides.clone(),
        grants: shared.grants.clone(),
        plugins: shared.plugins.clone(),
        dev_sources: shared.config.dev_sources.clone(),
    };
    let limit_flags = shared.config.limit_flags;
    move || {
        let Some(path) = &path else { return };
        let loaded = FileConfig::load(Some(path))
            .and_then(|(file, _)| {
                let file = limit_flags.over(file);
                let table = fixed.dev_sources.iter().fold(
                    file.grants(&|var| std::env::var(var).ok())?,
                    |table, (name, dir)| table.with_dev_sources(name, dir),
                );
                Ok((table, file.schedule()?, file.task_overrides()?))
            })
            .map_err(|e| e.to_string())
            .and_then(
                |(table, entries, tasks)| match fixed.needs_restart(&table, &tasks) {
                    Some(change) => Err(format!("{change} needs a restart")),
                    None => Ok((table, entries)),
                },
            );
        match loaded {
            Ok((table, entries)) => {
                fixed.grants.store(Arc::new(table));
                if let Some(schedule) = &schedule {
                    schedule.send_replace(Arc::new(entries));
                }
                tracing::info!(file = %path.display(), "config reloaded: new grants apply to tasks starting now; the schedule is the file's");
            }
            Err(why) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: {why}"
            ),
        }
    }
}
