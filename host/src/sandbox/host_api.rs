//! The host side of `taskhost:plugin/host`: what a running task may ask of the worker.

use super::TaskState;
use super::bindings::taskhost::plugin::{host, types};
use crate::protocol::is_hosts_state;

/// The longest progress state name, in bytes (Celery's own are at most 8).
pub const MAX_STATE_BYTES: usize = 64;

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
        let Some(line) = crate::lock(&self.log_budget)
            .take(&line)
            .map(std::borrow::Cow::into_owned)
        else {
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
        check_progress_state(&state)?;
        let meta: serde_json::Value =
            serde_json::from_str(&meta).map_err(|e| format!("meta is not JSON: {e}"))?;
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

/// A progress state a plugin may write: named, short, and none of the states whose meaning is
/// the worker's to give (a forged SUCCESS would end a waiter's `.get()` with the plugin's value).
fn check_progress_state(state: &str) -> Result<(), String> {
    if state.is_empty() {
        return Err("state must not be empty".into());
    }
    if state.len() > MAX_STATE_BYTES {
        return Err(format!(
            "state is {} bytes, over the {MAX_STATE_BYTES}-byte limit",
            state.len()
        ));
    }
    if is_hosts_state(state) {
        return Err(format!(
            "state {state} is the worker's to store: progress may use any other name (e.g. PROGRESS)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_progress_state;

    #[test]
    fn progress_may_not_write_a_ready_or_worker_state() {
        for state in [
            "SUCCESS", "FAILURE", "REVOKED", "RETRY", "REJECTED", "IGNORED",
        ] {
            let refused = check_progress_state(state).expect_err(state);
            assert!(refused.contains("worker's to store"), "{refused}");
        }
    }

    #[test]
    fn progress_may_write_its_own_states() {
        for state in ["PROGRESS", "STARTED", "downloading"] {
            assert_eq!(check_progress_state(state), Ok(()), "{state}");
        }
    }

    #[test]
    fn a_progress_state_name_is_bounded() {
        assert!(check_progress_state("").is_err());
        assert!(check_progress_state(&"X".repeat(65)).is_err());
    }
}
