//! The operator's configuration file, `taskhost.toml`: worker settings and what each plugin is
//! granted. Parsed strictly (unknown keys are errors) and fully validated, `${VAR}` references
//! resolved, before anything connects or loads.
//!
//! ```toml
//! [worker]
//! concurrency = 4
//! queues = ["celery"]
//!
//! [limits]            # every plugin's defaults
//! memory_mb = 128
//!
//! [plugins.crucible]  # the plugin file crucible.wasm
//! allow_http = ["${EXECUTOR_SERVICE_URL}", "${STORAGE_SERVICE_URL:-http://127.0.0.1:8002}"]
//! config = { executor_service_url = "${EXECUTOR_SERVICE_URL}" }
//! ```
//!
//! A plugin is named by its file's stem, which the operator controls; a plugin cannot pick the
//! name it is granted under. A plugin with no section gets no network and the default limits.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the configuration went wrong, naming the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{place}: environment variable {var} is not set (write ${{{var}:-default}} for a default)"
    )]
    MissingEnv { place: String, var: String },
    #[error("{place}: unterminated ${{...}} in {value:?}")]
    BadReference { place: String, value: String },
    #[error("{place}: {value:?} is not an http(s) URL with a host: {reason}")]
    BadOrigin {
        place: String,
        value: String,
        reason: String,
    },
    #[error("{place}: {message}")]
    Invalid { place: String, message: String },
}

/// `taskhost.toml`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSection>,
    /// Overrides of tasks' declared defaults, by task name: `[tasks."tasks.evaluate_code"]`.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskSection>,
}

/// `[tasks."NAME"]`: how the task `NAME` is retried, over what its plugin declares.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub max_retries: Option<u32>,
    /// Base of the exponential backoff, seconds.
    pub retry_backoff: Option<f64>,
    /// Ceiling of the backoff, seconds.
    pub retry_backoff_max: Option<f64>,
    /// Whether to randomise the backoff.
    pub retry_jitter: Option<bool>,
    /// Error kinds that retry the task instead of failing it.
    pub autoretry_for: Option<Vec<String>>,
    /// Starts allowed per worker, as Celery's `rate_limit`: `10/s`, `30/m`, `100/h`.
    pub rate_limit: Option<String>,
}

/// `[worker]`: defaults for the `worker` command's flags (flags and Celery's environment
/// variables override them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub broker_url: Option<String>,
    pub result_backend: Option<String>,
    pub concurrency: Option<usize>,
    /// Unstarted messages held per slot (Celery's `worker_prefetch_multiplier`).
    pub prefetch_multiplier: Option<usize>,
    pub queues: Option<Vec<String>>,
    pub plugins: Option<PathBuf>,
    pub hostname: Option<String>,
    /// Seconds a result is kept (Celery's `result_expires`); 0 keeps it forever.
    pub result_expires: Option<u64>,
    /// Seconds without a heartbeat after which a worker is taken for dead.
    pub heartbeat_lapse: Option<f64>,
    /// Returns from dead workers after which a message is dead-lettered.
    pub max_redeliveries: Option<u32>,
    /// Precompile cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Follow fleet deploys (`taskhost deploy`) published through the broker.
    pub fleet: Option<bool>,
    /// Send Celery's monitoring events from the start (as `-E`).
    pub task_events: Option<bool>,
    /// Address of the /metrics and /healthz endpoint, e.g. `127.0.0.1:9808`.
    pub metrics_addr: Option<String>,
}

/// `[limits]` and the limit keys of a `[plugins.NAME]` section. Unset keys of a plugin take the
/// `[limits]` value, unset `[limits]` keys the defaults (see [`Limits::default`]).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Linear memory per instance, MiB.
    pub memory_mb: Option<u64>,
    /// Table elements per table of an instance.
    pub table_elements: Option<u32>,
    /// Hard time limit, seconds: the run is interrupted.
    pub time_limit: Option<f64>,
    /// Soft time limit, seconds: the task is told its deadline.
    pub soft_time_limit: Option<f64>,
    /// Largest result a task may return, MiB.
    pub result_mb: Option<u64>,
    /// Instances of this plugin that may run at once; more wait their turn.
    pub max_instances: Option<u32>,
    /// WebAssembly stack, KiB. Worker-wide: only in `[limits]`.
    pub stack_kb: Option<u64>,
}

/// `[plugins.NAME]`: what one plugin is granted.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// Origins (`scheme://host:port`, a path is ignored) the plugin may send HTTP requests to.
    #[serde(default)]
    pub allow_http: Vec<String>,
    /// Values the plugin reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(flatten)]
    pub limits: LimitsSection,
}

/// The default memory limit of an instance, MiB.
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// The default table size limit, elements.
pub const DEFAULT_TABLE_ELEMENTS: u32 = 20_000;
/// The default hard time limit, seconds: a backstop, so a stuck plugin cannot hold a slot
/// forever (Celery has none by default; set `time_limit` to lift or tighten it).
pub const DEFAULT_TIME_LIMIT_S: u64 = 3600;
/// The default result size limit, MiB.
pub const DEFAULT_RESULT_MB: u64 = 16;
/// The default WebAssembly stack, KiB (wasmtime's default).
pub const DEFAULT_STACK_KB: u64 = 512;

impl FileConfig {
    /// Reads `path`, or `./taskhost.toml` if no path is given and that file exists, or the
    /// empty configuration. Returns the path actually read.
    pub fn load(path: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let implicit = PathBuf::from("taskhost.toml");
                if !implicit.is_file() {
                    return Ok((Self::default(), None));
                }
                implicit
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.clone(),
            message,
        })?;
        Ok((config, Some(path)))
    }

    /// Parses the text of a config file.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// The `[tasks."NAME"]` sections, checked.
    pub fn task_overrides(
        &self,
    ) -> Result<std::collections::HashMap<String, TaskSection>, ConfigError> {
        for (name, task) in &self.tasks {
            for (key, value) in [
                ("retry_backoff", task.retry_backoff),
                ("retry_backoff_max", task.retry_backoff_max),
            ] {
                if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(ConfigError::Invalid {
                        place: format!("[tasks.{name:?}]"),
                        message: format!("{key} must be a number of seconds, 0 or more"),
                    });
                }
            }
        }
        Ok(self.tasks.clone().into_iter().collect())
    }

    /// The WebAssembly stack every instance gets, bytes.
    pub fn stack_bytes(&self) -> Result<usize, ConfigError> {
        match self.limits.stack_kb {
            Some(kb) if !(64..=65_536).contains(&kb) => Err(ConfigError::Invalid {
                place: "[limits]".into(),
                message: format!("stack_kb must be between 64 and 65536, got {kb}"),
            }),
            kb => Ok(usize::try_from(kb.unwrap_or(DEFAULT_STACK_KB) * 1024).unwrap_or(usize::MAX)),
        }
    }

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

/// An HTTP origin a plugin may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// Parses the origin of a URL; a path and query are ignored.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        Self::of(&uri)
    }

    /// The origin of a request URI.
    pub fn of(uri: &http::Uri) -> Result<Self, String> {
        let scheme = uri.scheme_str().ok_or("no scheme")?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            other => return Err(format!("scheme {other:?} is not http or https")),
        };
        let host = uri.host().ok_or("no host")?.to_ascii_lowercase();
        Ok(Self {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
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
    pub limits: Limits,
}

impl Grants {
    /// Whether an HTTP request to `origin` is allowed.
    pub fn allows(&self, origin: &Origin) -> bool {
        self.allow_http.contains(origin)
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
    fn refuses_bad_config_with_the_place() {
        let err = FileConfig::parse("[plugins.x]\nallow_htp = []").expect_err("unknown key");
        assert!(err.contains("allow_htp"), "{err}");
        let config = FileConfig::parse("[plugins.x]\nallow_http = [\"${NOPE}\"]").expect("parses");
        let err = config.grants(&env).expect_err("missing env").to_string();
        assert!(err.contains("NOPE") && err.contains("[plugins.x]"), "{err}");
        let config = FileConfig::parse("[plugins.x]\nallow_http = [\"ftp://h\"]").expect("parses");
        assert!(config.grants(&env).is_err());
        let config = FileConfig::parse("[plugins.x]\ntime_limit = -1").expect("parses");
        assert!(config.grants(&env).is_err());
    }
}
