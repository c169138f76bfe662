//! What each plugin is granted, resolved from `taskhost.toml`: outbound HTTP origins, config
//! values (with `${VAR}` taken from the environment), and resource limits. A plugin with no
//! section gets the defaults: no network, no config, the `[limits]` values.

use super::file::{
    ConfigError, DEFAULT_MEMORY_MB, DEFAULT_RESULT_MB, DEFAULT_TABLE_ELEMENTS,
    DEFAULT_TIME_LIMIT_S, FileConfig, LimitsSection,
};
use super::origin::Origin;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

impl FileConfig {
    /// Resolves every plugin section into grants, expanding `${VAR}` from `env`.
    pub fn grants(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<GrantTable, ConfigError> {
        let defaults = Limits::resolve("[limits]", &self.limits, &Limits::default())?;
        let mut plugins = HashMap::new();
        for (name, section) in &self.plugins {
            let place = format!("[plugins.{name}]");
            if section.limits.stack_kb.is_some() {
                return Err(ConfigError::Invalid {
                    place,
                    message: "stack_kb applies to the whole worker: set it in [limits]".into(),
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
            plugins.insert(
                name.clone(),
                Arc::new(Grants {
                    allow_http,
                    config,
                    allow_send: section.allow_send.clone(),
                    limits,
                }),
            );
        }
        Ok(GrantTable {
            default: Arc::new(Grants {
                limits: defaults,
                ..Grants::default()
            }),
            plugins,
        })
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
    pub limits: Limits,
}

impl Grants {
    /// Whether an HTTP request to `origin` is allowed.
    pub fn allows(&self, origin: &Origin) -> bool {
        self.allow_http.contains(origin)
    }

    /// Whether the plugin may send task `name` besides its own: `allow_send` names it, or a
    /// `prefix.*` (or `*`) pattern there covers it.
    pub fn may_send(&self, name: &str) -> bool {
        self.allow_send
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pattern == name,
            })
    }
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

    /// Names with a section, for warning about sections no plugin uses.
    pub fn configured(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
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
}
