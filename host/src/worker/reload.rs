//! Config reloads while the worker runs: a changed `taskhost.toml` replaces the grants
//! (`[plugins]`, `[limits]`), the schedule and the fleet's trust (`[fleet]`: a key removed
//! from `trusted_keys` installs nothing from then on) for what starts from then on; a change
//! the running worker cannot take (`[worker]`, `[tasks]`, task-name grants, HTTP for a plugin
//! linked without it, memory or table limits above what the sandbox was sized for) is refused
//! with the reason, and the old config stays, every section of it.

use super::Shared;
use crate::config::{FileConfig, FleetTrust, GrantTable};
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
    worker_section: crate::config::file::WorkerSection,
}

impl Fixed {
    /// Why the new `table` and `tasks` need a restart, if they do.
    fn needs_restart(
        &self,
        worker: &crate::config::file::WorkerSection,
        table: &GrantTable,
        tasks: &TaskSections,
    ) -> Option<String> {
        if *worker != self.worker_section {
            return Some("a change of [worker] (connections, concurrency, queues, limits)".into());
        }
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
    fleet_trust: Arc<arc_swap::ArcSwap<FleetTrust>>,
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
        worker_section: shared.config.worker_section.clone(),
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
                let tasks = file.task_overrides()?;
                Ok((
                    file.worker.clone(),
                    table,
                    file.schedule()?,
                    tasks,
                    file.fleet_trust()?,
                ))
            })
            .map_err(|e| e.to_string())
            .and_then(|(worker, table, entries, tasks, trust)| {
                match fixed.needs_restart(&worker, &table, &tasks) {
                    Some(change) => Err(format!("{change} needs a restart")),
                    None => Ok((table, entries, trust)),
                }
            });
        match loaded {
            Ok((table, entries, trust)) => {
                fixed.grants.store(Arc::new(table));
                if let Some(schedule) = &schedule {
                    schedule.send_replace(Arc::new(entries));
                }
                fleet_trust.store(Arc::new(trust));
                tracing::info!(
                    file = %path.display(),
                    "config reloaded: [plugins] and [limits] apply to tasks starting now, the \
                     schedule and [fleet] are the file's; [worker] and [tasks] are unchanged"
                );
            }
            Err(why) => tracing::error!(
                file = %path.display(),
                "config change refused, the previous config stays: {why}"
            ),
        }
    }
}
