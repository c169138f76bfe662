//! A task message: Celery's protocol v2 in kombu's JSON envelope, decoded as a worker receives
//! it, re-encoded for a retry, and encoded as a producer sends it. See
//! `celery-protocol/SPEC.md` sections 1, 4 and 10 for the observed formats.

use super::embed::Embed;
use super::pyrepr;
use super::result::Meta;
use super::time::{format_time, parse_time};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

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
    /// The task's place in its group (a chord part's score in the chord's join).
    pub group_index: Option<u64>,
    pub ignore_result: bool,
    pub priority: u8,
    /// What follows the task: callbacks, errbacks, the rest of its chain, its chord.
    pub embed: Embed,
    /// A worker already sent `task-received` for this delivery: it is back from a
    /// postponement (see [`TaskMessage::postponed_message`]).
    pub announced: bool,
    envelope: Map<String, Value>,
}

/// The property a postponed message carries once its `task-received` was sent (kombu and
/// Celery ignore properties they do not know).
const ANNOUNCED: &str = "taskhost_received";

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
        let properties = envelope.get("properties").and_then(Value::as_object);
        let (args, kwargs, embed) = body(&envelope, properties)?;
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
        let announced = properties
            .and_then(|p| p.get(ANNOUNCED))
            .and_then(Value::as_bool)
            .unwrap_or(false);
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
            group_index: headers.get("group_index").and_then(Value::as_u64),
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
            embed,
            announced,
            envelope,
        })
    }

    /// What identifies this task in its result document: its id, parent and group.
    pub fn meta(&self) -> Meta<'_> {
        Meta {
            task_id: &self.id,
            parent_id: self.parent_id.as_deref(),
            group: self.group.as_deref(),
            children: &[],
        }
    }

    /// The positional arguments as the producer printed them (`argsrepr`), else as Python
    /// would print their tuple.
    pub fn args_repr(&self) -> String {
        self.header_text("argsrepr")
            .unwrap_or_else(|| pyrepr::args_repr(&tree_or_text(&self.args)))
    }

    /// The keyword arguments as the producer printed them (`kwargsrepr`), else as Python would.
    pub fn kwargs_repr(&self) -> String {
        self.header_text("kwargsrepr")
            .unwrap_or_else(|| pyrepr::python_repr(&tree_or_text(&self.kwargs)))
    }

    fn header_text(&self, key: &str) -> Option<String> {
        self.envelope
            .get("headers")
            .and_then(|h| h.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The message to hold in the delayed set while the task waits (its eta, a rate limit):
    /// the same delivery, marked as announced so its `task-received` is not sent again.
    /// `raw` is the message as fetched, returned as it is when already marked.
    pub fn postponed_message(&self, raw: &[u8]) -> Vec<u8> {
        if self.announced {
            return raw.to_vec();
        }
        let mut envelope = self.envelope.clone();
        if let Some(Value::Object(properties)) = envelope.get_mut("properties") {
            properties.insert(ANNOUNCED.into(), Value::Bool(true));
        } else {
            envelope.insert("properties".into(), json!({ ANNOUNCED: true }));
        }
        Value::Object(envelope).to_string().into_bytes()
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
            // A new delivery: announced again when a worker receives it.
            properties.remove(ANNOUNCED);
            properties.insert(
                "delivery_tag".into(),
                json!(uuid::Uuid::new_v4().to_string()),
            );
        }
        Value::Object(envelope).to_string().into_bytes()
    }
}

/// The positional and keyword arguments of the body (`[args, kwargs, embed]`), checked and
/// split, not parsed into a tree; and the embed, read.
fn body(
    envelope: &Map<String, Value>,
    properties: Option<&Map<String, Value>>,
) -> Result<(Box<RawValue>, Box<RawValue>, Embed), DecodeError> {
    let content_type = envelope
        .get("content-type")
        .and_then(Value::as_str)
        .unwrap_or("application/json");
    if content_type != "application/json" {
        return Err(DecodeError::ContentType(content_type.to_owned()));
    }
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
    match parts.as_slice() {
        [args, kwargs, rest @ ..] if rest.len() <= 1 => {
            if !args.get().starts_with('[') || !kwargs.get().starts_with('{') {
                return Err(DecodeError::BodyShape(truncate(
                    &format!("[{}, {}, ...]", args.get(), kwargs.get()),
                    80,
                )));
            }
            // Most messages embed nothing: skip building a tree for four nulls.
            let embed = match rest.first() {
                Some(raw) if raw.get().contains("\"task\"") => Embed::parse(&parse(raw)),
                _ => Embed::default(),
            };
            Ok(((*args).to_owned(), (*kwargs).to_owned(), embed))
        }
        _ => {
            let text = String::from_utf8_lossy(&body_bytes);
            Err(DecodeError::BodyShape(truncate(&text, 80)))
        }
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

/// What a producer asks for when it sends a task.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewTask {
    pub id: String,
    pub task: String,
    pub args: Value,
    pub kwargs: Value,
    pub queue: String,
    pub priority: u8,
    pub eta: Option<OffsetDateTime>,
    pub expires: Option<OffsetDateTime>,
    /// Times the task was retried before (0 for a first send).
    pub retries: u32,
    /// The workflow's first task (the task itself when none).
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    pub group: Option<String>,
    pub group_index: Option<u64>,
    /// Callbacks, errbacks, the rest of a chain, a chord body.
    pub embed: Embed,
    /// (soft, hard) seconds.
    pub time_limit: (Option<f64>, Option<f64>),
    pub ignore_result: bool,
}

impl NewTask {
    /// The protocol-v2 envelope a Celery 5.7 producer on machine `hostname` would push for
    /// this call.
    pub fn encode(&self, hostname: &str) -> Vec<u8> {
        let body = json!([self.args, self.kwargs, self.embed.to_json()]);
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
                "group": self.group,
                "group_index": self.group_index,
                "retries": self.retries,
                "timelimit": [self.time_limit.1, self.time_limit.0],
                "root_id": self.root_id.as_deref().unwrap_or(&self.id),
                "parent_id": self.parent_id,
                "argsrepr": pyrepr::args_repr(&self.args),
                "kwargsrepr": pyrepr::python_repr(&self.kwargs),
                "origin": format!("gen{}@{hostname}", std::process::id()),
                "ignore_result": self.ignore_result,
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

/// The tree of a JSON text already known to be valid (`Null` if, against that, it is not).
pub fn parse(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

/// The tree of a JSON text for a reply that shows it (inspect, events); a text nested deeper
/// than a tree is built for (serde_json's 128 levels) is shown as its JSON text instead.
pub fn tree_or_text(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or_else(|_| Value::String(raw.get().to_owned()))
}

/// Cuts `text` to at most `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
