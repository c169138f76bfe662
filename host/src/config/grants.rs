//! What each plugin is granted, resolved from `taskhost.toml`: the task names it may serve,
//! outbound HTTP origins, config values (with `${VAR}` taken from the environment), and
//! resource limits. A plugin with no section gets the defaults: the task names under its own
//! name (`demo.*` for `demo.wasm`), no network, no config, the `[limits]` values.

use super::file::{
    ConfigError, DEFAULT_MEMORY_MB, DEFAULT_RESULT_MB, DEFAULT_TABLE_ELEMENTS,
    DEFAULT_TIME_LIMIT_S, FileConfig, LimitsSection,
};
use super::origin::Origin;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

impl FileConfig {
    /// Resolves every plugin section into grants, expanding `${VAR}` from `env`.
    pub fn grants(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<GrantTable, ConfigError> {
        let defaults = Limits::resolve("[limits]", &self.limits, &Limits::default())?;
        let mut plugins = HashMap::new();
        for (name, section) in &self.plugins {
            let place = format!("[plugins.{name}]");
            let worker_wide = [
                ("stack_kb", section.limits.stack_kb.is_some()),
                (
                    "component_core_instances",
                    section.limits.component_core_instances.is_some(),
                ),
                (
                    "component_memories",
                    section.limits.component_memories.is_some(),
                ),
                (
                    "component_tables",
                    section.limits.component_tables.is_some(),
                ),
            ];
            if let Some((key, _)) = worker_wide.iter().find(|(_, set)| *set) {
                return Err(ConfigError::Invalid {
                    place,
                    message: format!("{key} applies to the whole worker: set it in [limits]"),
                });
            }
            let mut allow_http = Vec::new();
            for value in &section.allow_http {
                let place = format!("{place} allow_http");
                let expanded = expand_env(value, &place, env)?;
                allow_http.push(Origin::parse(&expanded).map_err(|reason| {
                    ConfigError::BadOrigin {
                        place: place.clone(),
                        value: expanded.clone(),
                        reason,
                    }
                })?);
            }
            let mut config = HashMap::new();
            for (key, value) in &section.config {
                let place = format!("{place} config.{key}");
                config.insert(key.clone(), expand_env(value, &place, env)?);
            }
            let limits = Limits::resolve(&place, &section.limits, &defaults)?;
            if let Some(tasks) = &section.tasks {
                check_task_patterns(&format!("{place} tasks"), tasks)?;
            }
            if let Some(queues) = &section.send_queues {
                check_queue_names(&format!("{place} send_queues"), queues)?;
            }
            plugins.insert(
                name.clone(),
                Arc::new(Grants {
                    allow_http,
                    config,
                    allow_send: section.allow_send.clone(),
                    send_queues: section.send_queues.clone(),
                    allow_private_network: section.allow_private_network,
                    tasks: section.tasks.clone(),
                    limits,
                    dev_sources: None,
                }),
            );
        }
        check_one_owner_per_name(&plugins)?;
        Ok(GrantTable {
            default: Arc::new(Grants {
                limits: defaults,
                ..Grants::default()
            }),
            plugins,
        })
    }
}

/// Checks `[plugins.NAME] send_queues`: each an exact queue name, never `*` or a pattern, and
/// never one of the worker's own keys.
fn check_queue_names(place: &str, queues: &[String]) -> Result<(), ConfigError> {
    for queue in queues {
        let wrong = if queue.is_empty() || queue.len() > 200 {
            Some("a queue name of 1 to 200 bytes")
        } else if queue.contains('*') {
            Some("exact queue names (no patterns: a pattern would let a plugin name any key)")
        } else if queue.starts_with("taskhost:") || queue.chars().any(char::is_control) {
            Some("a queue name (not a taskhost: key, no control characters)")
        } else {
            None
        };
        if let Some(expected) = wrong {
            return Err(ConfigError::Invalid {
                place: place.to_owned(),
                message: format!("{queue:?}: expected {expected}"),
            });
        }
    }
    Ok(())
}

/// Checks `[plugins.NAME] tasks`: each an exact name, `prefix.*`, or `*`.
fn check_task_patterns(place: &str, patterns: &[String]) -> Result<(), ConfigError> {
    for pattern in patterns {
        let star = pattern.find('*');
        let valid = !pattern.is_empty()
            && star.is_none_or(|at| at == pattern.len() - 1)
            && !pattern.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid {
            return Err(ConfigError::Invalid {
                place: place.to_owned(),
                message: format!(
                    "{pattern:?} is not a task name pattern: an exact name, `prefix.*` or `*`"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses task-name grants of two plugins that could both cover one name: every name has
/// one owner, whatever the plugin files are called or the order they load in.
fn check_one_owner_per_name(plugins: &HashMap<String, Arc<Grants>>) -> Result<(), ConfigError> {
    let mut granted: Vec<(&str, &str)> = plugins
        .iter()
        .flat_map(|(name, g)| {
            g.tasks
                .iter()
                .flatten()
                .map(move |pattern| (name.as_str(), pattern.as_str()))
        })
        .collect();
    granted.sort_unstable();
    for (i, (a, p)) in granted.iter().enumerate() {
        for (b, q) in &granted[i + 1..] {
            if a != b && patterns_overlap(p, q) {
                return Err(ConfigError::Invalid {
                    place: format!("[plugins.{a}] tasks"),
                    message: format!(
                        "{p:?} and [plugins.{b}]'s {q:?} can both cover one task name: each \
                         name must have one owner"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Whether some task name matches both patterns.
fn patterns_overlap(p: &str, q: &str) -> bool {
    match (p.strip_suffix('*'), q.strip_suffix('*')) {
        (Some(a), Some(b)) => a.starts_with(b) || b.starts_with(a),
        (Some(prefix), None) => q.starts_with(prefix),
        (None, Some(prefix)) => p.starts_with(prefix),
        (None, None) => p == q,
    }
}

/// Whether task `name` matches `pattern`: exact, `prefix.*`, or `*`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in `value`.
fn expand_env(
    value: &str,
    place: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| ConfigError::BadReference {
            place: place.to_owned(),
            value: value.to_owned(),
        })?;
        let reference = &after[..end];
        let (var, default) = match reference.split_once(":-") {
            Some((var, default)) => (var, Some(default)),
            None => (reference, None),
        };
        match (env(var).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(ConfigError::MissingEnv {
                    place: place.to_owned(),
                    var: var.to_owned(),
                });
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Resource limits of one plugin's instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory_bytes: usize,
    pub table_elements: u32,
    pub time_limit: Option<Duration>,
    pub soft_time_limit: Option<Duration>,
    pub result_bytes: usize,
    /// None: as many as the worker runs at once.
    pub max_instances: Option<u32>,
    /// Tasks one instance serves before it is discarded: 1, a fresh instance for every task
    /// (like Celery's `worker_max_tasks_per_child`, per instance).
    pub reuse_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: mib(DEFAULT_MEMORY_MB),
            table_elements: DEFAULT_TABLE_ELEMENTS,
            time_limit: Some(Duration::from_secs(DEFAULT_TIME_LIMIT_S)),
            soft_time_limit: None,
            result_bytes: mib(DEFAULT_RESULT_MB),
            max_instances: None,
            reuse_instances: 1,
        }
    }
}

fn mib(n: u64) -> usize {
    usize::try_from(n.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
}

impl Limits {
    fn resolve(place: &str, section: &LimitsSection, base: &Limits) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            place: place.to_owned(),
            message,
        };
        let seconds = |key: &str, v: Option<f64>, fallback: Option<Duration>| match v {
            None => Ok(fallback),
            Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => Err(invalid(format!(
                "{key} must be a positive number of seconds, got {s}"
            ))),
        };
        let positive = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(invalid(format!("{key} must be at least 1"))),
            other => Ok(other),
        };
        Ok(Self {
            memory_bytes: positive("memory_mb", section.memory_mb)?.map_or(base.memory_bytes, mib),
            table_elements: match section.table_elements {
                Some(0) => return Err(invalid("table_elements must be at least 1".into())),
                Some(n) => n,
                None => base.table_elements,
            },
            time_limit: seconds("time_limit", section.time_limit, base.time_limit)?,
            soft_time_limit: seconds(
                "soft_time_limit",
                section.soft_time_limit,
                base.soft_time_limit,
            )?,
            result_bytes: positive("result_mb", section.result_mb)?.map_or(base.result_bytes, mib),
            max_instances: match section.max_instances {
                Some(0) => return Err(invalid("max_instances must be at least 1".into())),
                Some(n) => Some(n),
                None => base.max_instances,
            },
            reuse_instances: match section.reuse_instances {
                Some(0) => {
                    return Err(invalid(
                        "reuse_instances must be at least 1 (1: a fresh instance for every task)"
                            .into(),
                    ));
                }
                Some(n) => n,
                None => base.reuse_instances,
            },
        })
    }
}

/// What a plugin may use.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    pub allow_http: Vec<Origin>,
    pub config: HashMap<String, String>,
    /// Task names the plugin may send besides its own (`allow_send`).
    pub allow_send: Vec<String>,
    /// Queues what the plugin sends may go to (`send_queues`); none: the queues the worker
    /// consumes.
    pub send_queues: Option<Vec<String>>,
    /// A granted host name may resolve to a private address (`allow_private_network`).
    pub allow_private_network: bool,
    /// Task names the plugin may serve (`tasks`); none: its own name's (see
    /// [`GrantTable::may_serve`]).
    pub tasks: Option<Vec<String>>,
    pub limits: Limits,
    /// A plugin project's directory, read-only at [`DEV_SOURCES`] in the guest: set by
    /// `taskhost dev --watch` for the Python plugin it builds from that project, never by a
    /// config file, so a dev build reads its sources live instead of being rebuilt.
    pub dev_sources: Option<PathBuf>,
}

/// Where a dev build finds its project's sources (see [`Grants::dev_sources`]).
pub const DEV_SOURCES: &str = "/taskhost-dev/sources";

impl Grants {
    /// Whether an HTTP request to `origin` is allowed.
    pub fn allows(&self, origin: &Origin) -> bool {
        self.allow_http.contains(origin)
    }

    /// Whether the plugin may send task `name` besides its own: `allow_send` names it, or a
    /// `prefix.*` (or `*`) pattern there covers it.
    pub fn may_send(&self, name: &str) -> bool {
        self.allow_send.iter().any(|p| name_matches(p, name))
    }
}

/// Why a plugin may not serve a task name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefusal {
    #[error("task {task:?} is granted to plugin {owner:?} ([plugins.{owner}] tasks)")]
    OwnedBy { task: String, owner: String },
    #[error(
        "plugin {plugin:?} may not serve task {task:?}: it may serve {granted}; the operator \
         grants task names in [plugins.{plugin}] tasks = [...]"
    )]
    NotGranted {
        task: String,
        plugin: String,
        granted: String,
    },
}

/// Every plugin's grants, by plugin name.
#[derive(Debug, Default, Clone)]
pub struct GrantTable {
    default: Arc<Grants>,
    plugins: HashMap<String, Arc<Grants>>,
}

impl GrantTable {
    /// The grants of plugins without a section of their own.
    pub fn defaults(&self) -> Arc<Grants> {
        self.default.clone()
    }

    /// This table with `plugin` (its own grants, or the defaults) reading `sources` live.
    #[must_use]
    pub fn with_dev_sources(mut self, plugin: &str, sources: &Path) -> Self {
        let mut grants = (*self.for_plugin(plugin)).clone();
        grants.dev_sources = Some(sources.to_path_buf());
        self.plugins.insert(plugin.to_owned(), Arc::new(grants));
        self
    }

    /// The grants of the plugin named `name` (the defaults if it has no section).
    pub fn for_plugin(&self, name: &str) -> Arc<Grants> {
        self.plugins
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }

    /// The largest memory limit any plugin has: what the sandbox must be able to hold.
    pub fn max_memory_bytes(&self) -> usize {
        self.plugins
            .values()
            .chain(std::iter::once(&self.default))
            .map(|g| g.limits.memory_bytes)
            .max()
            .unwrap_or_else(|| Limits::default().memory_bytes)
    }

    /// The largest table any plugin may grow.
    pub fn max_table_elements(&self) -> u32 {
        self.plugins
            .values()
            .chain(std::iter::once(&self.default))
            .map(|g| g.limits.table_elements)
            .max()
            .unwrap_or(DEFAULT_TABLE_ELEMENTS)
    }

    /// Whether plugin `plugin` may serve task `task`. A name an explicit `tasks` grant covers
    /// belongs to that plugin alone; any other name to the plugin it starts with (`demo.add`
    /// to `demo`), unless that plugin's own grant is explicit and leaves it out. So which
    /// plugin serves a name never depends on file names or load order.
    pub fn may_serve(&self, plugin: &str, task: &str) -> Result<(), NameRefusal> {
        let owner = self.plugins.iter().find(|(_, g)| {
            g.tasks
                .iter()
                .flatten()
                .any(|pattern| name_matches(pattern, task))
        });
        if let Some((owner, _)) = owner {
            if owner == plugin {
                return Ok(());
            }
            return Err(NameRefusal::OwnedBy {
                task: task.to_owned(),
                owner: owner.clone(),
            });
        }
        let grants = self.for_plugin(plugin);
        let granted = match &grants.tasks {
            Some(patterns) => format!("{patterns:?}"),
            None if task
                .strip_prefix(plugin)
                .is_some_and(|rest| rest.starts_with('.')) =>
            {
                return Ok(());
            }
            None => format!("only the names starting {plugin:?} and a dot (the default)"),
        };
        Err(NameRefusal::NotGranted {
            task: task.to_owned(),
            plugin: plugin.to_owned(),
            granted,
        })
    }

    /// Whether `other` grants every plugin the same task names (a change needs a restart).
    pub fn same_task_names(&self, other: &GrantTable) -> bool {
        let names = |t: &GrantTable| -> Vec<(String, Option<Vec<String>>)> {
            let mut v: Vec<_> = t
                .plugins
                .iter()
                .map(|(n, g)| (n.clone(), g.tasks.clone()))
                .filter(|(_, tasks)| tasks.is_some())
                .collect();
            v.sort();
            v
        };
        names(self) == names(other)
    }

    /// Names with a section, for warning about sections no plugin uses (not the projects
    /// `taskhost dev` builds, which it loads as soon as they are built).
    pub fn configured(&self) -> impl Iterator<Item = &str> {
        self.plugins
            .iter()
            .filter(|(_, g)| g.dev_sources.is_none())
            .map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_send_names_tasks_exactly_or_by_prefix() {
        let grants = Grants {
            allow_send: vec!["tasks.health_check".into(), "reports.*".into()],
            ..Grants::default()
        };
        assert!(grants.may_send("tasks.health_check"));
        assert!(grants.may_send("reports.daily"));
        assert!(!grants.may_send("tasks.evaluate_code"));
        assert!(!Grants::default().may_send("anything"));
    }

    fn table(toml: &str) -> Result<GrantTable, ConfigError> {
        FileConfig::parse(toml).and_then(|c| c.grants(&|_| None))
    }

    #[test]
    fn a_plugin_serves_its_own_names_by_default() {
        let grants = table("").expect("empty config");
        assert_eq!(grants.may_serve("demo", "demo.add"), Ok(()));
        let refused = grants
            .may_serve("evil", "demo.add")
            .expect_err("not evil's");
        assert!(
            refused.to_string().contains("[plugins.evil] tasks"),
            "{refused}"
        );
        assert!(grants.may_serve("demo", "demonic.add").is_err());
    }

    #[test]
    fn an_explicit_grant_owns_its_names_against_every_other_plugin() {
        let grants =
            table("[plugins.crucible]\ntasks = [\"tasks.*\", \"demo.add\"]\n").expect("config");
        assert_eq!(grants.may_serve("crucible", "tasks.health_check"), Ok(()));
        assert_eq!(grants.may_serve("crucible", "demo.add"), Ok(()));
        assert_eq!(
            grants.may_serve("demo", "demo.add"),
            Err(NameRefusal::OwnedBy {
                task: "demo.add".into(),
                owner: "crucible".into()
            })
        );
        assert_eq!(grants.may_serve("demo", "demo.echo"), Ok(()));
        assert!(
            grants.may_serve("crucible", "crucible.x").is_err(),
            "explicit replaces default"
        );
    }

    #[test]
    fn overlapping_task_grants_are_refused() {
        for (a, b) in [
            ("\"*\"", "\"x.y\""),
            ("\"a.*\"", "\"a.b.*\""),
            ("\"a.b\"", "\"a.b\""),
        ] {
            let toml = format!("[plugins.one]\ntasks = [{a}]\n[plugins.two]\ntasks = [{b}]\n");
            let e = table(&toml).expect_err("overlap");
            assert!(e.to_string().contains("one owner"), "{e}");
        }
        table("[plugins.one]\ntasks = [\"a.*\"]\n[plugins.two]\ntasks = [\"b.*\"]\n")
            .expect("disjoint grants");
        let e = table("[plugins.one]\ntasks = [\"a*b\"]\n").expect_err("bad pattern");
        assert!(e.to_string().contains("not a task name pattern"), "{e}");
    }

    fn env(var: &str) -> Option<String> {
        (var == "EXECUTOR_SERVICE_URL").then(|| "http://Exec.local:8001/api".to_owned())
    }

    #[test]
    fn resolves_grants_with_env_and_defaults() {
        let config = FileConfig::parse(
            r#"
            [limits]
            memory_mb = 64
            [plugins.crucible]
            allow_http = ["${EXECUTOR_SERVICE_URL}", "${STORAGE_SERVICE_URL:-https://store}"]
            time_limit = 30
            config = { executor = "${EXECUTOR_SERVICE_URL}" }
            "#,
        )
        .expect("parses");
        let grants = config.grants(&env).expect("resolves");
        let crucible = grants.for_plugin("crucible");
        assert_eq!(crucible.allow_http[0].to_string(), "http://exec.local:8001");
        assert_eq!(crucible.allow_http[1].to_string(), "https://store:443");
        assert_eq!(crucible.config["executor"], "http://Exec.local:8001/api");
        assert_eq!(crucible.limits.memory_bytes, 64 << 20);
        assert_eq!(crucible.limits.time_limit, Some(Duration::from_secs(30)));
        let other = grants.for_plugin("demo");
        assert!(other.allow_http.is_empty() && other.config.is_empty());
        assert_eq!(other.limits.memory_bytes, 64 << 20);
    }

    #[test]
    fn reuse_instances_defaults_to_a_fresh_instance_and_zero_is_refused() {
        let config = FileConfig::parse(
            "[limits]\nreuse_instances = 50\n[plugins.demo]\nreuse_instances = 1000\n[plugins.crucible]\n",
        )
        .expect("parses");
        let grants = config.grants(&env).expect("resolves");
        assert_eq!(grants.for_plugin("demo").limits.reuse_instances, 1000);
        assert_eq!(grants.for_plugin("crucible").limits.reuse_instances, 50);
        assert_eq!(Limits::default().reuse_instances, 1);
        let zero = FileConfig::parse("[plugins.demo]\nreuse_instances = 0\n").expect("parses");
        let error = zero.grants(&env).expect_err("0 is refused").to_string();
        assert!(
            error.contains("reuse_instances must be at least 1"),
            "{error}"
        );
    }
}
