//! The crucible plugin: the code-evaluation service's Celery tasks, as a taskhost plugin.
//!
//! - `tasks.evaluate_code(eval_id, code, language)`: POST the code to the executor service, PUT
//!   the executor's answer to the storage service, return `{"eval_id", "status", ...answer}`.
//!   An unreachable service or a 5xx asks for a retry with exponential backoff; a 4xx fails with
//!   the service's message.
//! - `tasks.cleanup_old_evaluations(max_age_hours=24)`: ask storage to delete old evaluations,
//!   return how many it deleted.
//! - `tasks.health_check()`: `{"status": "healthy", "hostname", "timestamp"}`.
//!
//! The service URLs are the plugin's config values `executor_service_url` and
//! `storage_service_url` (the operator maps them from `EXECUTOR_SERVICE_URL` and
//! `STORAGE_SERVICE_URL`); the host only lets HTTP through to the origins it granted.

use serde_json::{Map, Value, json};
use std::time::Duration;
use taskhost_sdk::http::{HttpError, Request};
use taskhost_sdk::{Failure, Kind, Result, tasks};

tasks! {
    /// Runs `code` in the executor service and stores the outcome.
    #[task(name = "tasks.evaluate_code", queue = "evaluations", max_retries = 3, retry_backoff = 1.0, retry_backoff_max = 60.0, retry_jitter = true)]
    fn evaluate_code(eval_id: Value, code: String, language: String) -> Result<Value> {
        let eval_id = id_text(&eval_id)?;
        let executor = service_url("executor_service_url")?;
        let storage = service_url("storage_service_url")?;
        let answer = call(
            "POST",
            &format!("{executor}/execute"),
            Some(json!({"eval_id": eval_id, "code": code, "language": language})),
            "executor",
        )?;
        call(
            "PUT",
            &format!("{storage}/evaluations/{}", path_segment(&eval_id)),
            Some(answer.clone()),
            "storage",
        )?;
        let mut out = Map::new();
        out.insert("eval_id".into(), Value::String(eval_id));
        out.insert("status".into(), Value::String("completed".into()));
        if let Value::Object(fields) = answer {
            out.extend(fields);
        } else {
            out.insert("output".into(), answer);
        }
        Ok(Value::Object(out))
    }

    /// Deletes evaluations older than `max_age_hours` (default 24); returns how many.
    #[task(name = "tasks.cleanup_old_evaluations", queue = "maintenance", max_retries = 3, retry_backoff = 1.0)]
    fn cleanup_old_evaluations(max_age_hours: Option<u32>) -> Result<u64> {
        let hours = max_age_hours.unwrap_or(24);
        let storage = service_url("storage_service_url")?;
        let answer = call(
            "DELETE",
            &format!("{storage}/evaluations?older_than_hours={hours}"),
            None,
            "storage",
        )?;
        deleted_count(&answer).ok_or_else(|| {
            Failure::error("ValueError", format!("storage answered without a deleted count: {answer}"))
        })
    }

    /// Reports this worker as healthy.
    #[task(name = "tasks.health_check")]
    fn health_check() -> Result<Value> {
        Ok(json!({
            "status": "healthy",
            "hostname": taskhost_sdk::task().hostname,
            "timestamp": now_rfc3339(),
        }))
    }
}

/// Requests wait this long for a connection and for the first byte.
const TIMEOUT: Duration = Duration::from_secs(30);

fn service_url(key: &str) -> Result<String> {
    let url = taskhost_sdk::config(key)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Failure::error(
                "ConfigurationError",
                format!("config value {key:?} is not set for this plugin (see taskhost.toml)"),
            )
        })?;
    Ok(url.trim_end_matches('/').to_owned())
}

fn id_text(eval_id: &Value) -> Result<String> {
    match eval_id {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(Failure::error(
            "TypeError",
            format!("eval_id must be a non-empty string or a number, got {other}"),
        )),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn deleted_count(answer: &Value) -> Option<u64> {
    match answer {
        Value::Number(n) => n.as_u64(),
        Value::Object(map) => ["deleted", "deleted_count", "count"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_u64)),
        _ => None,
    }
}

/// One HTTP call; the answer's JSON (null for an empty body). Transport errors and 5xx ask for
/// a retry, 4xx fail with the service's message, a denied origin fails as `CapabilityDenied`.
/// A body goes out with `Content-Length`.
fn call(method: &str, url: &str, body: Option<Value>, service: &str) -> Result<Value> {
    let mut request = Request::new(method, url).timeout(TIMEOUT);
    if let Some(body) = &body {
        request = request.json(body)?;
    }
    let response = request.send().map_err(|error| match error {
        HttpError::Denied(_) | HttpError::Invalid(_) => Failure::from(error),
        HttpError::Timeout(_) | HttpError::Connection(_) => {
            Failure::retry(Kind::ConnectionError, format!("{service} {url}: {error}"))
        }
    })?;
    let (status, text) = (response.status, response.text());
    if status >= 500 {
        return Err(Failure::retry(
            "ServiceUnavailable",
            format!(
                "{service} {method} {url} answered {status}: {}",
                service_message(&text)
            ),
        ));
    }
    if !(200..300).contains(&status) {
        return Err(Failure::error(
            "HTTPError",
            format!(
                "{service} {method} {url} answered {status}: {}",
                service_message(&text)
            ),
        ));
    }
    response.json().map_err(|e| {
        Failure::error(
            Kind::ValueError,
            format!("{service} answered with invalid JSON: {e}"),
        )
    })
}

/// The message in a service's error answer: FastAPI's `detail`, or `error`/`message`, or the text.
fn service_message(text: &str) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text) {
        for key in ["detail", "error", "message"] {
            match map.get(key) {
                Some(Value::String(s)) => return s.clone(),
                Some(other) => return other.to_string(),
                None => {}
            }
        }
    }
    let text = text.trim();
    if text.is_empty() {
        "(empty answer)".to_owned()
    } else {
        text.to_owned()
    }
}

/// The wall clock as RFC 3339 UTC with microseconds, as Python's `isoformat()` prints it.
fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}
