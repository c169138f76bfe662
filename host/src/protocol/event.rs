//! Celery's monitoring events as Flower and `celery events` read them: each event's type and
//! fields, and the envelope a batch of them travels in. The values of the moment (clock,
//! time, load) come in as arguments; `monitor::events` owns when events are sent.

use super::envelope::transient_envelope;
use super::message::{TaskMessage, parse};
use super::pyrepr::{exception_repr, python_repr};
use super::result::{Exception, RevokeReason};
use super::time::format_time;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// How often a worker heartbeat is sent (Celery's `freq`); monitors take a worker for gone
/// after two missed beats.
pub const HEARTBEAT_FREQ: std::time::Duration = std::time::Duration::from_secs(2);

/// What happened to a task.
#[derive(Debug, Clone, Copy)]
pub enum TaskEvent<'a> {
    Received(&'a TaskMessage),
    Started,
    Succeeded {
        result: &'a RawValue,
        runtime: f64,
    },
    Failed(&'a Exception),
    Retried(&'a Exception),
    Revoked(RevokeReason),
    /// A message that could not be run (undecodable, unregistered, or rejected by its
    /// plugin): `task-rejected` when its plugin rejected it, `task-failed` otherwise.
    Refused {
        exception: &'a Exception,
        rejected: bool,
    },
}

impl TaskEvent<'_> {
    /// The event's type, as Celery names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Received(_) => "task-received",
            Self::Started => "task-started",
            Self::Succeeded { .. } => "task-succeeded",
            Self::Failed(_)
            | Self::Refused {
                rejected: false, ..
            } => "task-failed",
            Self::Retried(_) => "task-retried",
            Self::Revoked(_) => "task-revoked",
            Self::Refused { rejected: true, .. } => "task-rejected",
        }
    }

    /// Adds the fields particular to this event.
    fn fields(&self, e: &mut Map<String, Value>) {
        match self {
            Self::Received(message) => {
                e.insert("name".into(), message.task.clone().into());
                e.insert("args".into(), message.args_repr().into());
                e.insert("kwargs".into(), message.kwargs_repr().into());
                e.insert("root_id".into(), message.root_id.clone().into());
                e.insert("parent_id".into(), message.parent_id.clone().into());
                e.insert("retries".into(), message.retries.into());
                e.insert("eta".into(), message.eta.map(format_time).into());
                e.insert("expires".into(), message.expires.map(format_time).into());
            }
            Self::Started => {}
            Self::Succeeded { result, runtime } => {
                e.insert("result".into(), python_repr(&parse(result)).into());
                e.insert("runtime".into(), (*runtime).into());
            }
            Self::Failed(exception) | Self::Retried(exception) => exception_fields(e, exception),
            Self::Revoked(reason) => {
                e.insert(
                    "terminated".into(),
                    (*reason == RevokeReason::Terminated).into(),
                );
                e.insert("signum".into(), Value::Null);
                e.insert("expired".into(), (*reason == RevokeReason::Expired).into());
            }
            Self::Refused { exception, .. } => {
                exception_fields(e, exception);
                e.insert("requeue".into(), false.into());
            }
        }
    }
}

fn exception_fields(e: &mut Map<String, Value>, exception: &Exception) {
    e.insert(
        "exception".into(),
        exception_repr(&exception.kind, &exception.message).into(),
    );
    e.insert(
        "traceback".into(),
        exception.traceback.clone().unwrap_or_default().into(),
    );
}

/// A worker's own events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    Online,
    Heartbeat,
    Offline,
}

impl WorkerEvent {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Online => "worker-online",
            Self::Heartbeat => "worker-heartbeat",
            Self::Offline => "worker-offline",
        }
    }
}

/// Who sends an event, and when: the fields every event carries.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub hostname: &'a str,
    pub pid: u32,
    /// The sender's Lamport clock, advanced for this event.
    pub clock: u64,
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
}

impl Stamp<'_> {
    fn common(&self, kind: &str) -> Map<String, Value> {
        let mut event = Map::with_capacity(12);
        event.insert("hostname".into(), self.hostname.into());
        event.insert("utcoffset".into(), 0.0.into());
        event.insert("pid".into(), self.pid.into());
        event.insert("clock".into(), self.clock.into());
        event.insert("timestamp".into(), self.timestamp.into());
        event.insert("type".into(), kind.into());
        event
    }

    /// The event `event` of task `uuid`.
    pub fn task(&self, uuid: &str, event: &TaskEvent<'_>) -> Value {
        let mut fields = self.common(event.kind());
        fields.insert("uuid".into(), uuid.into());
        event.fields(&mut fields);
        Value::Object(fields)
    }

    /// A worker event with the worker's `active` and `processed` counts and `loadavg`.
    pub fn worker(
        &self,
        event: WorkerEvent,
        active: u64,
        processed: u64,
        loadavg: &[f64],
    ) -> Value {
        let mut fields = self.common(event.kind());
        fields.insert("freq".into(), HEARTBEAT_FREQ.as_secs_f64().into());
        fields.insert("active".into(), active.into());
        fields.insert("processed".into(), processed.into());
        fields.insert("loadavg".into(), loadavg.into());
        fields.insert("sw_ident".into(), "taskhost".into());
        fields.insert("sw_ver".into(), env!("CARGO_PKG_VERSION").into());
        fields.insert("sw_sys".into(), std::env::consts::OS.into());
        Value::Object(fields)
    }
}

/// The routing key of a worker event (`worker.heartbeat`), or of a batch of task events.
pub fn routing_key(event: Option<WorkerEvent>) -> String {
    match event {
        Some(event) => event.kind().replace('-', "."),
        None => "task.multi".into(),
    }
}

/// An event (or a `task.multi` list of them) in kombu's envelope, as `hostname` sends it.
pub fn event_message(hostname: &str, routing_key: &str, body: &Value) -> String {
    transient_envelope(
        &body.to_string(),
        json!({"hostname": hostname}),
        "celeryev",
        routing_key,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_events_say_why() {
        let stamp = Stamp {
            hostname: "w@h",
            pid: 1,
            clock: 3,
            timestamp: 1.5,
        };
        let event = stamp.task("id", &TaskEvent::Revoked(RevokeReason::Expired));
        assert_eq!(event["type"], "task-revoked");
        assert_eq!(
            (event["expired"].as_bool(), event["terminated"].as_bool()),
            (Some(true), Some(false))
        );
        assert_eq!(
            (event["uuid"].as_str(), event["clock"].as_u64()),
            (Some("id"), Some(3))
        );
        let rejected = Exception::new("Reject", "no");
        let refused = TaskEvent::Refused {
            exception: &rejected,
            rejected: true,
        };
        assert_eq!(refused.kind(), "task-rejected");
        assert_eq!(
            routing_key(Some(WorkerEvent::Heartbeat)),
            "worker.heartbeat"
        );
        assert_eq!(routing_key(None), "task.multi");
    }
}
