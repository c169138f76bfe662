//! Celery's wire format on Redis (protocol v2 in kombu's JSON envelope), decoded and encoded.
//!
//! Pure: no I/O. Owns the envelope layout, the task message headers the worker honours, the
//! result document stored in the backend, and the Python exception mapping. See
//! `celery-protocol/SPEC.md` sections 1, 4, 7 and 10 for the observed formats.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Why a message could not be decoded into a task.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("envelope is not a JSON object")]
    NotAnObject,
    #[error("envelope has no {0:?} field of the right type")]
    Missing(&'static str),
    #[error("unsupported content-type {0:?}: taskhost accepts application/json")]
    ContentType(String),
    #[error("unsupported body encoding {0:?}")]
    BodyEncoding(String),
    #[error("body is not valid base64: {0}")]
    Base64(String),
    #[error("body is not valid JSON: {0}")]
    BodyJson(String),
    #[error("body must be [args, kwargs, embed], got {0}")]
    BodyShape(String),
    #[error("message has no task header: Celery protocol v1 is not supported")]
    ProtocolV1,
    #[error("header {field:?} is not a valid time: {value:?}")]
    Time { field: &'static str, value: String },
}

/// A message that could not be decoded, with whatever identifies its task.
#[derive(Debug)]
pub struct Undecodable {
    pub error: DecodeError,
    /// The task id, if the headers had one: the task then gets a FAILURE result.
    pub task_id: Option<String>,
    pub task_name: Option<String>,
}

/// A task message, decoded. Keeps the parsed envelope so it can be re-published (retry, delay)
/// with Celery's own fields intact.
#[derive(Debug, Clone)]
pub struct TaskMessage {
    pub id: String,
    pub task: String,
    /// The positional arguments, as the producer's JSON text (an array): handed to the plugin
    /// as they are, never parsed into a tree the host does not need.
    pub args: Box<RawValue>,
    /// The keyword arguments, as the producer's JSON text (an object).
    pub kwargs: Box<RawValue>,
    pub retries: u32,
    pub eta: Option<OffsetDateTime>,
    pub expires: Option<OffsetDateTime>,
    /// The producer's time limits: (soft, hard) seconds. (On the wire Celery's `timelimit`
    /// header is `[hard, soft]`: `[time_limit, soft_time_limit]` in `celery/app/amqp.py`.)
    pub time_limit: (Option<f64>, Option<f64>),
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub ignore_result: bool,
    pub priority: u8,
    envelope: Map<String, Value>,
}

impl TaskMessage {
    /// Decodes one raw message as popped from a queue list.
    pub fn decode(raw: &[u8]) -> Result<Self, Undecodable> {
        let envelope: Value = serde_json::from_slice(raw).map_err(|e| Undecodable {
            error: DecodeError::NotJson(e.to_string()),
            task_id: None,
            task_name: None,
        })?;
        let Value::Object(envelope) = envelope else {
            return Err(Undecodable {
                error: DecodeError::NotAnObject,
                task_id: None,
                task_name: None,
            });
        };
        let headers = envelope.get("headers").and_then(Value::as_object);
        let text = |key: &str| {
            headers
                .and_then(|h| h.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let task_id = text("id");
        let task_name = text("task");
        Self::decode_fields(envelope).map_err(|error| Undecodable {
            error,
            task_id,
            task_name,
        })
    }

    fn decode_fields(envelope: Map<String, Value>) -> Result<Self, DecodeError> {
        let headers = envelope
            .get("headers")
            .and_then(Value::as_object)
            .ok_or(DecodeError::Missing("headers"))?;
        let task = headers
            .get("task")
            .and_then(Value::as_str)
            .ok_or(DecodeError::ProtocolV1)?
            .to_owned();
        let id = headers
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or(DecodeError::Missing("headers.id"))?
            .to_owned();
        let content_type = envelope
            .get("content-type")
            .and_then(Value::as_str)
            .unwrap_or("application/json");
        if content_type != "application/json" {
            return Err(DecodeError::ContentType(content_type.to_owned()));
        }
        let properties = envelope.get("properties").and_then(Value::as_object);
        let body_text = envelope
            .get("body")
            .and_then(Value::as_str)
            .ok_or(DecodeError::Missing("body"))?;
        let body_bytes = match properties
            .and_then(|p| p.get("body_encoding"))
            .and_then(Value::as_str)
        {
            Some("base64") => BASE64
                .decode(body_text)
                .map_err(|e| DecodeError::Base64(e.to_string()))?,
            None | Some("utf-8") => body_text.as_bytes().to_vec(),
            Some(other) => return Err(DecodeError::BodyEncoding(other.to_owned())),
        };
        // Checked and split, not parsed into a tree: [args, kwargs, embed].
        let parts: Vec<&RawValue> = match serde_json::from_slice(&body_bytes) {
            Ok(parts) => parts,
            Err(_) => {
                let body: Value = serde_json::from_slice(&body_bytes)
                    .map_err(|e| DecodeError::BodyJson(e.to_string()))?;
                return Err(DecodeError::BodyShape(truncate(&body.to_string(), 80)));
            }
        };
        let (args, kwargs) = match parts.as_slice() {
            [args, kwargs] | [args, kwargs, _] => {
                if !args.get().starts_with('[') || !kwargs.get().starts_with('{') {
                    return Err(DecodeError::BodyShape(truncate(
                        &format!("[{}, {}, ...]", args.get(), kwargs.get()),
                        80,
                    )));
                }
                ((*args).to_owned(), (*kwargs).to_owned())
            }
            _ => {
                let text = String::from_utf8_lossy(&body_bytes);
                return Err(DecodeError::BodyShape(truncate(&text, 80)));
            }
        };
        let opt_text = |key: &str| headers.get(key).and_then(Value::as_str).map(str::to_owned);
        let time_limit = match headers.get("timelimit").and_then(Value::as_array) {
            Some(pair) => (
                pair.get(1).and_then(Value::as_f64),
                pair.first().and_then(Value::as_f64),
            ),
            None => (None, None),
        };
        let priority = properties
            .and_then(|p| p.get("priority"))
            .and_then(Value::as_u64)
            .map_or(0, |p| p.min(9) as u8);
        Ok(Self {
            eta: parse_time_header(headers, "eta")?,
            expires: parse_time_header(headers, "expires")?,
            retries: headers
                .get("retries")
                .and_then(Value::as_u64)
                .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            root_id: opt_text("root_id"),
            parent_id: opt_text("parent_id"),
            group: opt_text("group"),
            ignore_result: headers
                .get("ignore_result")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            id,
            task,
            args,
            kwargs,
            time_limit,
            priority,
            envelope,
        })
    }

    /// The document to store for this task in `state`, with its parent and group.
    pub fn result_document<R: Serialize + ?Sized>(
        &self,
        state: State,
        result: &R,
        traceback: Option<&str>,
    ) -> String {
        result_document(
            &self.id,
            state.as_str(),
            result,
            traceback,
            self.parent_id.as_deref(),
            self.group.as_deref(),
            OffsetDateTime::now_utc(),
        )
    }

    /// The queue the producer routed the message to (`delivery_info.routing_key`), if any.
    pub fn routing_key(&self) -> Option<&str> {
        self.envelope
            .get("properties")?
            .get("delivery_info")?
            .get("routing_key")?
            .as_str()
    }

    /// The positional arguments as the producer printed them (`argsrepr`), else as Python
    /// would print their tuple.
    pub fn args_repr(&self) -> String {
        self.header_text("argsrepr")
            .unwrap_or_else(|| crate::pyrepr::args_repr(&parse(&self.args)))
    }

    /// The keyword arguments as the producer printed them (`kwargsrepr`), else as Python would.
    pub fn kwargs_repr(&self) -> String {
        self.header_text("kwargsrepr")
            .unwrap_or_else(|| crate::pyrepr::python_repr(&parse(&self.kwargs)))
    }

    fn header_text(&self, key: &str) -> Option<String> {
        self.envelope
            .get("headers")
            .and_then(|h| h.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The message to publish for the next try, as Celery's `Task.retry` does: same id,
    /// `retries` + 1, `eta` when there is a countdown, `parent_id` = this task, new delivery tag.
    pub fn retry_message(&self, eta: Option<OffsetDateTime>) -> Vec<u8> {
        let mut envelope = self.envelope.clone();
        if let Some(Value::Object(headers)) = envelope.get_mut("headers") {
            headers.insert("retries".into(), json!(self.retries.saturating_add(1)));
            headers.insert(
                "eta".into(),
                eta.map_or(Value::Null, |t| json!(format_time(t))),
            );
            headers.insert("parent_id".into(), json!(self.id));
        }
        if let Some(Value::Object(properties)) = envelope.get_mut("properties") {
            properties.insert(
                "delivery_tag".into(),
                json!(uuid::Uuid::new_v4().to_string()),
            );
        }
        Value::Object(envelope).to_string().into_bytes()
    }
}

fn parse_time_header(
    headers: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<OffsetDateTime>, DecodeError> {
    match headers.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_time(s).map(Some).ok_or_else(|| DecodeError::Time {
            field,
            value: s.clone(),
        }),
        Some(other) => Err(DecodeError::Time {
            field,
            value: other.to_string(),
        }),
    }
}

/// Parses Celery's ISO-8601 times: RFC 3339 with an offset, or naive (taken as UTC, as Celery
/// sends them when `enable_utc` is on without a timezone).
pub fn parse_time(text: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t);
    }
    let naive = time::macros::format_description!(
        version = 2,
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(text, naive)
        .ok()
        .map(|t| t.assume_utc())
}

/// Formats a time as Python's `isoformat()` does for an aware UTC datetime.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// What a producer asks for when it sends a task.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub priority: u8,
    pub eta: Option<OffsetDateTime>,
    pub expires: Option<OffsetDateTime>,
}

impl NewTask {
    /// The protocol-v2 envelope a Celery 5.7 producer would push for this call.
    pub fn encode(&self) -> Vec<u8> {
        let body = json!([
            self.args,
            self.kwargs,
            {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
        ]);
        let host = crate::node::machine_hostname();
        let envelope = json!({
            "body": BASE64.encode(body.to_string()),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": self.task,
                "id": self.id,
                "shadow": null,
                "eta": self.eta.map(format_time),
                "expires": self.expires.map(format_time),
                "group": null,
                "group_index": null,
                "retries": 0,
                "timelimit": [null, null],
                "root_id": self.id,
                "parent_id": null,
                "argsrepr": crate::pyrepr::args_repr(&self.args),
                "kwargsrepr": crate::pyrepr::python_repr(&self.kwargs),
                "origin": format!("gen{}@{host}", std::process::id()),
                "ignore_result": false,
                "replaced_task_nesting": 0,
                "stamped_headers": null,
                "stamps": {},
            },
            "properties": {
                "correlation_id": self.id,
                "reply_to": uuid::Uuid::new_v4().to_string(),
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": self.priority,
                "body_encoding": "base64",
                "delivery_tag": uuid::Uuid::new_v4().to_string(),
            },
        });
        envelope.to_string().into_bytes()
    }
}

/// A task's state in the result backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Success,
    Failure,
    Retry,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Retry => "RETRY",
            State::Revoked => "REVOKED",
        }
    }
}

/// An exception as Celery stores it, so Python re-raises it on `AsyncResult.get()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exception {
    pub kind: String,
    pub message: String,
    pub traceback: Option<String>,
}

impl Exception {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            traceback: None,
        }
    }

    /// `{"exc_type", "exc_message": [message], "exc_module"}`: Python's builtin exception names
    /// map to `builtins`, Celery's to `celery.exceptions`; any other name is a module Python
    /// does not have, so Celery synthesises an exception class of that name.
    pub fn to_json(&self) -> Value {
        json!({
            "exc_type": self.kind,
            "exc_message": [self.message],
            "exc_module": exception_module(&self.kind),
        })
    }
}

const PYTHON_BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "ConnectionError",
    "Exception",
    "FileNotFoundError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "RuntimeError",
    "TimeoutError",
    "TypeError",
    "ValueError",
    "ZeroDivisionError",
];

const CELERY_EXCEPTIONS: &[&str] = &[
    "NotRegistered",
    "MaxRetriesExceededError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "SoftTimeLimitExceeded",
    "Reject",
    "WorkerLostError",
];

fn exception_module(kind: &str) -> &'static str {
    if PYTHON_BUILTIN_EXCEPTIONS.contains(&kind) {
        "builtins"
    } else if CELERY_EXCEPTIONS.contains(&kind) {
        "celery.exceptions"
    } else {
        "taskhost.exceptions"
    }
}

/// kombu's envelope of a transient message (delivery mode 1: events, remote-control replies):
/// `body` base64-encoded, sent to `exchange` with `routing_key`.
pub fn transient_envelope(body: &str, headers: Value, exchange: &str, routing_key: &str) -> String {
    json!({
        "body": BASE64.encode(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    })
    .to_string()
}

/// The tree of a JSON text already known to be valid (`Null` if, against that, it is not).
pub fn parse(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// The result document, field by field, so a result given as raw JSON text is written as it is.
#[derive(Serialize)]
struct ResultDocument<'a, R: Serialize + ?Sized> {
    status: &'a str,
    result: &'a R,
    traceback: Option<&'a str>,
    children: [(); 0],
    date_done: Option<String>,
    task_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<&'a str>,
}

/// The document stored at `celery-task-meta-<id>` and published on that channel. `status` is
/// a [`State`] or a custom progress state such as `PROGRESS`; only final states get a
/// `date_done`, as Celery stores them. `result` is anything that serialises to JSON: a value,
/// or a plugin's result as the raw text it returned.
pub fn result_document<R: Serialize + ?Sized>(
    task_id: &str,
    status: &str,
    result: &R,
    traceback: Option<&str>,
    parent_id: Option<&str>,
    group: Option<&str>,
    now: OffsetDateTime,
) -> String {
    let is_final = [State::Success, State::Failure, State::Revoked]
        .iter()
        .any(|s| s.as_str() == status);
    let doc = ResultDocument {
        status,
        result,
        traceback,
        children: [],
        date_done: is_final.then(|| format_time(now)),
        task_id,
        parent_id,
        group_id: group,
    };
    // Cannot fail: strings, options, and a value or valid raw JSON.
    serde_json::to_string(&doc).unwrap_or_default()
}

/// Cuts `text` to at most `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED_DELAY: &str = include_str!("../../tests/fixtures/task_message_delay.json");
    const CAPTURED_COUNTDOWN: &str =
        include_str!("../../tests/fixtures/task_message_countdown_expires.json");

    #[test]
    fn decodes_a_message_captured_from_celery() {
        let m = TaskMessage::decode(CAPTURED_DELAY.as_bytes()).expect("decodes");
        assert_eq!(m.task, "app.add");
        assert_eq!(parse(&m.args), json!([2, 3]));
        assert_eq!(parse(&m.kwargs), json!({}));
        assert_eq!(m.retries, 0);
        assert_eq!(m.eta, None);
        assert_eq!(m.routing_key(), Some("celery"));
        assert_eq!(m.root_id.as_deref(), Some(m.id.as_str()));
    }

    #[test]
    fn decodes_eta_and_expires() {
        let m = TaskMessage::decode(CAPTURED_COUNTDOWN.as_bytes()).expect("decodes");
        let (eta, expires) = (m.eta.expect("eta"), m.expires.expect("expires"));
        assert!(expires > eta);
    }

    #[test]
    fn round_trips_what_the_producer_encodes() {
        let new = NewTask {
            id: "abc".into(),
            task: "demo.add".into(),
            args: json!([1, {"k": [null, 1.5, "ü"]}]),
            kwargs: json!({"z": i64::MIN}),
            queue: "high".into(),
            priority: 3,
            eta: parse_time("2030-01-02T03:04:05.000006+00:00"),
            expires: None,
        };
        let m = TaskMessage::decode(&new.encode()).expect("decodes");
        assert_eq!((m.id.as_str(), m.task.as_str()), ("abc", "demo.add"));
        assert_eq!(parse(&m.args), new.args);
        assert_eq!(parse(&m.kwargs), new.kwargs);
        assert_eq!((m.priority, m.routing_key()), (3, Some("high")));
        assert_eq!(m.eta, new.eta);
        let retried = TaskMessage::decode(&m.retry_message(None)).expect("decodes");
        assert_eq!(
            (retried.retries, retried.parent_id.as_deref()),
            (1, Some("abc"))
        );
        assert_eq!(retried.id, "abc");
    }

    #[test]
    fn rejects_what_is_not_a_task_with_a_reason() {
        type Check = fn(&DecodeError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"\xff\xfe", |e| matches!(e, DecodeError::NotJson(_))),
            (b"[1,2]", |e| *e == DecodeError::NotAnObject),
            (br#"{"headers": {}}"#, |e| *e == DecodeError::ProtocolV1),
            (
                br#"{"headers": {"task": "t", "id": "i"}, "content-type": "application/x-python-serialize", "body": ""}"#,
                |e| matches!(e, DecodeError::ContentType(_)),
            ),
            (
                br#"{"headers": {"task": "t", "id": "i"}, "body": "!!", "properties": {"body_encoding": "base64"}}"#,
                |e| matches!(e, DecodeError::Base64(_)),
            ),
            (
                br#"{"headers": {"task": "t", "id": "i"}, "body": "{}"}"#,
                |e| matches!(e, DecodeError::BodyShape(_)),
            ),
            (
                br#"{"headers": {"task": "t", "id": "i", "eta": "soon"}, "body": "[[], {}]"}"#,
                |e| matches!(e, DecodeError::Time { field: "eta", .. }),
            ),
        ];
        for (raw, check) in cases {
            let err = TaskMessage::decode(raw).expect_err("must not decode");
            assert!(
                check(&err.error),
                "{:?} for {:?}",
                err.error,
                String::from_utf8_lossy(raw)
            );
        }
        let err = TaskMessage::decode(br#"{"headers": {"task": "t", "id": "i"}, "body": "{}"}"#)
            .expect_err("bad body");
        assert_eq!(err.task_id.as_deref(), Some("i"));
    }

    #[test]
    fn reads_celerys_timelimit_as_hard_then_soft() {
        let mut envelope: Value = serde_json::from_str(CAPTURED_DELAY).expect("json");
        envelope["headers"]["timelimit"] = json!([10, 2.5]);
        let m = TaskMessage::decode(envelope.to_string().as_bytes()).expect("decodes");
        assert_eq!(m.time_limit, (Some(2.5), Some(10.0)));
    }

    /// A deterministic generator of arbitrary JSON values, for the property tests below.
    fn arbitrary(rng: &mut fastrand::Rng, depth: u32) -> Value {
        let leaf = depth == 0 || rng.u8(..4) == 0;
        match if leaf { rng.u8(..6) } else { rng.u8(6..8) } {
            0 => Value::Null,
            1 => json!(rng.bool()),
            2 => json!(rng.i64(..)),
            3 => json!(rng.u64(..)),
            4 => {
                let f = f64::from_bits(rng.u64(..));
                if f.is_finite() {
                    json!(f)
                } else {
                    json!(rng.f64())
                }
            }
            5 => {
                let len = rng.usize(..12);
                let text: String = (0..len)
                    .map(|_| match rng.u8(..4) {
                        0 => rng.char('\u{0}'..='\u{7f}'),
                        1 => rng.char('\u{80}'..='\u{7ff}'),
                        2 => rng.char('\u{800}'..='\u{d7ff}'),
                        _ => rng.char('\u{10000}'..='\u{10ffff}'),
                    })
                    .collect();
                json!(text)
            }
            6 => Value::Array(
                (0..rng.usize(..5))
                    .map(|_| arbitrary(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.usize(..5))
                    .map(|i| (format!("k{i}-{}", rng.u16(..)), arbitrary(rng, depth - 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn any_arguments_and_results_survive_the_round_trip() {
        let mut rng = fastrand::Rng::with_seed(0x7a5c);
        for case in 0..3000 {
            let args = Value::Array(
                (0..rng.usize(..4))
                    .map(|_| arbitrary(&mut rng, 4))
                    .collect(),
            );
            let kwargs = match arbitrary(&mut rng, 3) {
                Value::Object(map) => Value::Object(map),
                other => json!({"value": other}),
            };
            let new = NewTask {
                id: format!("id-{case}"),
                task: "t".into(),
                args: args.clone(),
                kwargs: kwargs.clone(),
                queue: "celery".into(),
                priority: rng.u8(..10),
                eta: None,
                expires: None,
            };
            let m = TaskMessage::decode(&new.encode()).expect("decodes");
            // What the plugin receives is the JSON text of these values.
            let sent: Value = serde_json::from_str(m.args.get()).expect("args text");
            assert_eq!((&sent, &parse(&m.kwargs)), (&args, &kwargs), "case {case}");
            // What the plugin returns is stored as the result unchanged.
            let result = arbitrary(&mut rng, 4);
            let doc = result_document(
                "id",
                "SUCCESS",
                &result,
                None,
                None,
                None,
                OffsetDateTime::now_utc(),
            );
            let stored: Value = serde_json::from_str(&doc).expect("result document");
            assert_eq!(stored["result"], result, "case {case}");
        }
    }

    #[test]
    fn no_corruption_of_a_message_makes_the_decoder_panic() {
        let mut rng = fastrand::Rng::with_seed(0xdec0de);
        let seeds: Vec<Vec<u8>> = vec![
            CAPTURED_DELAY.as_bytes().to_vec(),
            CAPTURED_COUNTDOWN.as_bytes().to_vec(),
            NewTask {
                id: "x".into(),
                task: "demo.add".into(),
                args: json!([1, 2]),
                kwargs: json!({}),
                queue: "celery".into(),
                priority: 0,
                eta: None,
                expires: None,
            }
            .encode(),
        ];
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut bytes = seeds[rng.usize(..seeds.len())].clone();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..bytes.len().max(1));
                let last = bytes.len().saturating_sub(1);
                match rng.u8(..4) {
                    0 if !bytes.is_empty() => bytes[at.min(last)] = rng.u8(..),
                    1 => bytes.truncate(at),
                    2 => bytes.insert(at.min(bytes.len()), rng.u8(..)),
                    _ if !bytes.is_empty() => {
                        bytes.remove(at.min(last));
                    }
                    _ => {}
                }
            }
            match TaskMessage::decode(&bytes) {
                Ok(m) => {
                    decoded += 1;
                    assert!(
                        !m.id.is_empty()
                            && parse(&m.args).is_array()
                            && parse(&m.kwargs).is_object()
                    );
                }
                Err(e) => assert!(!e.error.to_string().is_empty()),
            }
        }
        // Some corruptions leave a valid message (a changed letter in a name, say).
        assert!(decoded > 0);
    }

    #[test]
    fn times_match_python_isoformat() {
        let t = parse_time("2026-11-25T08:08:06.003644+00:00").expect("parses");
        assert_eq!(format_time(t), "2026-11-25T08:08:06.003644+00:00");
        let naive = parse_time("2026-11-25T08:08:06").expect("naive parses");
        assert_eq!(format_time(naive), "2026-11-25T08:08:06.000000+00:00");
        let offset = parse_time("2026-11-25T10:08:06+02:00").expect("offset parses");
        assert_eq!(format_time(offset), "2026-11-25T08:08:06.000000+00:00");
    }

    #[test]
    fn exceptions_map_to_python_modules() {
        assert_eq!(
            Exception::new("ValueError", "x").to_json()["exc_module"],
            "builtins"
        );
        assert_eq!(
            Exception::new("NotRegistered", "x").to_json()["exc_module"],
            "celery.exceptions"
        );
        assert_eq!(
            Exception::new("HTTPError", "x").to_json()["exc_message"],
            json!(["x"])
        );
    }
}
