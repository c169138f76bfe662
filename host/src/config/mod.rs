//! What the operator decided: `taskhost.toml`, flags and Celery's environment variables,
//! resolved into a worker's settings and each plugin's grants, all checked before anything
//! connects or loads.
//!
//! - [`file`]: the file as written (strict: unknown keys are errors), and its defaults.
//! - [`grants`]: what each plugin may use: HTTP origins, config values, limits.
//! - [`origin`]: an HTTP origin, as granted and as requested.
//! - [`resolve`]: a worker's settings from flags, environment and file.
//! - [`rate`]: Celery's rate-limit notation.
//! - [`schedule`]: periodic tasks, and when their ticks fall.
//! - [`threads`]: the process's thread counts from the environment.
//! - [`tracing`]: whether and where traces go (`OTEL_*` over `[tracing]`).

pub mod compat;
pub mod file;
pub mod fleet;
pub mod grants;
pub mod origin;
pub mod rate;
pub mod resolve;
pub mod schedule;
pub mod threads;
pub mod tracing;

pub use file::{
    ComponentCaps, ConfigError, DEFAULT_MEMORY_MB, DEFAULT_RESULT_MB, DEFAULT_STACK_KB,
    DEFAULT_TABLE_ELEMENTS, DEFAULT_TIME_LIMIT_S, FileConfig, TaskSection,
};
pub use fleet::FleetTrust;
pub use grants::{GrantTable, Grants, Limits, NameRefusal};
pub use origin::Origin;
pub use rate::Rate;
pub use resolve::{Autoscale, Compiler, LimitFlags, TaskOverrides, WorkerConfig, WorkerFlags};
pub use tracing::{Sampling, TracingConfig};
