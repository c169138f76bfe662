//! The host side of `taskhost:plugin/host`: what a running task may ask of the worker.

use super::TaskState;
use super::bindings::taskhost::plugin::{host, types};

impl types::Host for TaskState {}

impl host::Host for TaskState {
    async fn log(&mut self, level: host::Level, message: String, fields: Vec<(String, String)>) {
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let line = if fields.is_empty() {
            message
        } else {
            format!("{message} {fields}")
        };
        let Some(line) = self.log_budget.take(&line) else {
            return;
        };
        let scope = &self.scope;
        macro_rules! emit {
            ($level:ident) => {
                tracing::$level!(
                    target: "taskhost::plugin",
                    plugin = %scope.plugin, task = %scope.task_name, task_id = %scope.task_id,
                    "{line}"
                )
            };
        }
        match level {
            host::Level::Trace => emit!(trace),
            host::Level::Debug => emit!(debug),
            host::Level::Info => emit!(info),
            host::Level::Warn => emit!(warn),
            host::Level::Error => emit!(error),
        }
    }

    async fn update_state(&mut self, state: String, meta: String) -> Result<(), String> {
        let cap = self.scope.grants.limits.result_bytes;
        if meta.len() > cap {
            return Err(format!(
                "meta is {} bytes, over the {cap}-byte result limit",
                meta.len()
            ));
        }
        let meta: serde_json::Value =
            serde_json::from_str(&meta).map_err(|e| format!("meta is not JSON: {e}"))?;
        if state.is_empty() {
            return Err("state must not be empty".into());
        }
        match &self.scope.progress {
            Some(progress) => progress
                .update(state, meta)
                .await
                .map_err(|e| e.to_string()),
            None => {
                tracing::info!(
                    plugin = %self.scope.plugin, task_id = %self.scope.task_id, %state, %meta,
                    "task progress"
                );
                Ok(())
            }
        }
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.scope.grants.config.get(&key).cloned()
    }

    async fn send(&mut self, signature: String) -> Result<String, String> {
        let cap = self.scope.grants.limits.result_bytes;
        if signature.len() > cap {
            return Err(format!(
                "the signature is {} bytes, over the {cap}-byte result limit",
                signature.len()
            ));
        }
        let signature: serde_json::Value = serde_json::from_str(&signature)
            .map_err(|e| format!("the signature is not JSON: {e}"))?;
        match &self.scope.outbox {
            Some(outbox) => outbox.send(signature).await.map_err(|e| e.to_string()),
            None => Err("sending tasks needs a worker and its broker (not `taskhost exec`)".into()),
        }
    }
}
