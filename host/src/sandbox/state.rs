//! The state of one store: everything one task run can reach (WASI with nothing granted but
//! captured stdio and, for a `taskhost dev` build, its project's sources read-only; HTTP through
//! the plugin's policy, the resource table, the limiter, the log budget), made anew for every
//! task, fresh or recycled.

use super::{Scope, http, limits, output};
use crate::config::grants::DEV_SOURCES;
use std::sync::Arc;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// The state of one store: everything one task run can reach.
pub struct TaskState {
    pub(super) wasi: WasiCtx,
    pub(super) http: WasiHttpCtx,
    pub(super) http_policy: http::HttpPolicy,
    pub(super) table: ResourceTable,
    pub(super) limiter: limits::Limiter,
    /// Shared with the HTTP policy, whose denials are log lines of the task too.
    pub(super) log_budget: Arc<std::sync::Mutex<limits::LogBudget>>,
    pub(super) stdout: output::Capture,
    pub(super) stderr: output::Capture,
    pub(super) scope: Scope,
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for TaskState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

impl TaskState {
    /// The state of a new store for `scope`: default deny (see the module's doc).
    pub(super) fn new(scope: Scope) -> Self {
        let stdout = output::Capture::default();
        let stderr = output::Capture::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        if let Some(sources) = &scope.grants.dev_sources
            && let Err(e) = wasi.preopened_dir(sources, DEV_SOURCES, FsPerms::ReadOnly)
        {
            // The dev build then serves the sources it was built with.
            tracing::warn!(
                plugin = %scope.plugin,
                sources = %sources.display(),
                "cannot open the plugin's sources: {e}"
            );
        }
        let wasi = wasi.build();
        let limiter = limits::Limiter::new(
            scope.grants.limits.memory_bytes,
            scope.grants.limits.table_elements,
        );
        let (log_budget, http_policy) = TaskState::per_task(&scope);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(limits::FIELD_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits::MAX_RESOURCES);
        TaskState {
            wasi,
            http,
            http_policy,
            table,
            limiter,
            log_budget,
            stdout,
            stderr,
            scope,
        }
    }

    /// What is counted per task, not per instance: the log budget and the HTTP policy (which
    /// shares it, and counts requests in flight).
    pub(super) fn per_task(
        scope: &Scope,
    ) -> (Arc<std::sync::Mutex<limits::LogBudget>>, http::HttpPolicy) {
        let log_budget = Arc::new(std::sync::Mutex::new(limits::LogBudget::default()));
        let policy = http::HttpPolicy::new(
            scope.plugin.clone(),
            scope.task_id.clone(),
            scope.grants.clone(),
            log_budget.clone(),
        );
        (log_budget, policy)
    }
}
