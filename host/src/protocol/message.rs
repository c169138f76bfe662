//! A task message: Celery's protocol v2 in kombu's JSON envelope, decoded as a worker receives
//! it, re-encoded for a retry, and encoded as a producer sends it. See
//! `celery-protocol/SPEC.md` sections 1, 4 and 10 for the observed formats.

use super::embed::Embed;
use super::pyrepr;
use super::result::Meta;
use super::time::{format_time, parse_time};
use super::trace::TraceContext;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use time::OffsetDateTime;

/// Why a message could not be decoded into a task.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("envelope is not a JSON object")]
    NotAnObject,
    #[error("envelope is malformed: {0}")]
    Malformed(String),
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

/// A task message, decoded. Re-publishing it (retry, delay) starts again from the raw message,
/// so that Celery's own fields stay intact without the host keeping a tree of them.
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
    /// The producer's `argsrepr` and `kwargsrepr` headers, when it sent them.
    reprs: (Option<String>, Option<String>),
    /// The trace the producer's span started (`traceparent`, `tracestate`), when well-formed.
    pub trace: Option<TraceContext>,
    /// The sender (`gen<pid>@<host>`), for the trace (`celery.hostname`); at most 255 bytes.
    pub origin: Option<String>,
}

/// The property a postponed message carries once its `task-received` was sent (kombu and
/// Celery ignore properties they do not know).
const ANNOUNCED: &str = "taskhost_received";

/// The longest `origin` header kept (a hostname's limit); a longer one is a producer's
/// mistake or an attack on the trace's size, and is dropped.
const MAX_ORIGIN: usize = 255;

/// The envelope's fields a worker reads, each as its JSON text: read in one pass over the
/// message without building a tree, then each taken as the type it should have. A field of
/// another type counts as absent, as it would to kombu's `dict.get`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow, rename = "content-type")]
    content_type: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Headers<'a> {
    #[serde(borrow)]
    task: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    eta: Option<&'a RawValue>,
    #[serde(borrow)]
    expires: Option<&'a RawValue>,
    #[serde(borrow)]
    retries: Option<&'a RawValue>,
    #[serde(borrow)]
    timelimit: Option<&'a RawValue>,
    #[serde(borrow)]
    root_id: Option<&'a RawValue>,
    #[serde(borrow)]
    parent_id: Option<&'a RawValue>,
    #[serde(borrow)]
    group: Option<&'a RawValue>,
    #[serde(borrow)]
    group_index: Option<&'a RawValue>,
    #[serde(borrow)]
    ignore_result: Option<&'a RawValue>,
    #[serde(borrow)]
    argsrepr: Option<&'a RawValue>,
    #[serde(borrow)]
    kwargsrepr: Option<&'a RawValue>,
    #[serde(borrow)]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow)]
    tracestate: Option<&'a RawValue>,
    #[serde(borrow)]
    origin: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Properties<'a> {
    #[serde(borrow)]
    priority: Option<&'a RawValue>,
    #[serde(borrow)]
    body_encoding: Option<&'a RawValue>,
    #[serde(borrow, rename = "taskhost_received")]
    announced: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the message unless it has escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// `raw` as a `T`, or `None` when it is absent, null or of another type.
fn field<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    // As an `Option`, a null (most optional headers) is read without building an error.
    raw.and_then(|raw| serde_json::from_str::<Option<T>>(raw.get()).ok().flatten())
}

impl TaskMessage {
    /// Decodes one raw message as popped from a queue list.
    pub fn decode(raw: &[u8]) -> Result<Self, Undecodable> {
        let undecodable = |error| Undecodable {
            error,
            task_id: None,
            task_name: None,
        };
        let envelope: Envelope = serde_json::from_slice(raw).map_err(|e| {
            undecodable(match serde_json::from_slice::<IgnoredAny>(raw) {
                Err(_) => DecodeError::NotJson(e.to_string()),
                Ok(_) if raw.trim_ascii_start().starts_with(b"{") => {
                    DecodeError::Malformed(e.to_string())
                }
                Ok(_) => DecodeError::NotAnObject,
            })
        })?;
        let headers: Option<Headers> = field(envelope.headers);
        let (task_id, task_name) = match &headers {
            Some(h) => (field(h.id), field(h.task)),
            None => (None, None),
        };
        Self::decode_fields(&envelope, headers).map_err(|error| Undecodable {
            error,
            task_id,
            task_name,
        })
    }

    fn decode_fields(envelope: &Envelope, headers: Option<Headers>) -> Result<Self, DecodeError> {
        let headers = headers.ok_or(DecodeError::Missing("headers"))?;
        let task = field(headers.task).ok_or(DecodeError::ProtocolV1)?;
        let id = field::<String>(headers.id)
            .filter(|id| !id.is_empty())
            .ok_or(DecodeError::Missing("headers.id"))?;
        let properties: Properties = field(envelope.properties).unwrap_or_default();
        let (args, kwargs, embed) = body(envelope, &properties)?;
        let time_limit = match field::<Vec<&RawValue>>(headers.timelimit) {
            Some(pair) => (field(pair.get(1).copied()), field(pair.first().copied())),
            None => (None, None),
        };
        Ok(Self {
            eta: time_header(headers.eta, "eta")?,
            expires: time_header(headers.expires, "expires")?,
            retries: field::<u64>(headers.retries)
                .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            root_id: field(headers.root_id),
            parent_id: field(headers.parent_id),
            group: field(headers.group),
            group_index: field(headers.group_index),
            ignore_result: field(headers.ignore_result).unwrap_or(false),
            id,
            task,
            args,
            kwargs,
            time_limit,
            priority: field::<u64>(properties.priority).map_or(0, |p| p.min(9) as u8),
            embed,
            announced: field(properties.announced).unwrap_or(false),
            reprs: (field(headers.argsrepr), field(headers.kwargsrepr)),
            trace: TraceContext::read(
                field::<Text>(headers.traceparent).as_ref().map(|t| &*t.0),
                field::<Text>(headers.tracestate).as_ref().map(|t| &*t.0),
            ),
            origin: field::<String>(headers.origin).filter(|o| o.len() <= MAX_ORIGIN),
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
        self.reprs
            .0
            .clone()
            .unwrap_or_else(|| pyrepr::args_repr(&tree_or_text(&self.args)))
    }

    /// The keyword arguments as the producer printed them (`kwargsrepr`), else as Python would.
    pub fn kwargs_repr(&self) -> String {
        self.reprs
            .1
            .clone()
            .unwrap_or_else(|| pyrepr::python_repr(&tree_or_text(&self.kwargs)))
    }

    /// The message to hold in the delayed set while the task waits (its eta, a rate limit):
    /// the same delivery (`raw`, the message as fetched), marked as announced so its
    /// `task-received` is not sent again; `raw` itself when already marked.
    pub fn postponed_message(&self, raw: &[u8]) -> Vec<u8> {
        if self.announced {
            return raw.to_vec();
        }
        let mut envelope = tree(raw);
        if let Some(Value::Object(properties)) = envelope.get_mut("properties") {
            properties.insert(ANNOUNCED.into(), Value::Bool(true));
        } else {
            envelope.insert("properties".into(), json!({ ANNOUNCED: true }));
        }
        Value::Object(envelope).to_string().into_bytes()
    }

    /// The message to publish for the next try of `raw` (this message as fetched), as Celery's
    /// `Task.retry` does: same id, `retries` + 1, `eta` when there is a countdown, `parent_id` =
    /// this task, new delivery tag.
    /// `trace`, when given, is the span that sends the retry (the next try's parent).
    pub fn retry_message(
        &self,
        raw: &[u8],
        eta: Option<OffsetDateTime>,
        trace: Option<&TraceContext>,
    ) -> Vec<u8> {
        let mut envelope = tree(raw);
        if let Some(Value::Object(headers)) = envelope.get_mut("headers") {
            if let Some(trace) = trace {
                trace.write(headers);
            }
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

/// The tree of a message that decoded, to re-publish it changed (an object, since it decoded).
fn tree(raw: &[u8]) -> Map<String, Value> {
    serde_json::from_slice(raw).unwrap_or_default()
}

/// The positional and keyword arguments of the body (`[args, kwargs, embed]`), checked and
/// split, not parsed into a tree; and the embed, read.
fn body(
    envelope: &Envelope,
    properties: &Properties,
) -> Result<(Box<RawValue>, Box<RawValue>, Embed), DecodeError> {
    let content_type: Option<Text> = field(envelope.content_type);
    let content_type = content_type.as_ref().map_or("application/json", |t| &t.0);
    if content_type != "application/json" {
        return Err(DecodeError::ContentType(content_type.to_owned()));
    }
    let body_text: Text = field(envelope.body).ok_or(DecodeError::Missing("body"))?;
    let encoding: Option<Text> = field(properties.body_encoding);
    let body_bytes: Cow<[u8]> = match encoding.as_ref().map(|e| &*e.0) {
        Some("base64") => BASE64
            .decode(&*body_text.0)
            .map_err(|e| DecodeError::Base64(e.to_string()))?
            .into(),
        None | Some("utf-8") => Cow::Borrowed(body_text.0.as_bytes()),
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

fn time_header(
    raw: Option<&RawValue>,
    name: &'static str,
) -> Result<Option<OffsetDateTime>, DecodeError> {
    let Some(raw) = raw.filter(|raw| raw.get() != "null") else {
        return Ok(None);
    };
    match field::<Text>(Some(raw)) {
        Some(text) => parse_time(&text.0).map(Some).ok_or(DecodeError::Time {
            field: name,
            value: text.0.into_owned(),
        }),
        None => Err(DecodeError::Time {
            field: name,
            value: raw.get().to_owned(),
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
    /// The span that sends it, for the trace to go on where it runs.
    pub trace: Option<TraceContext>,
}

impl NewTask {
    /// The protocol-v2 envelope a Celery 5.7 producer would push for this call, sent from
    /// `origin` (Celery's `gen<pid>@<hostname>`: [`crate::node::origin`]).
    pub fn encode(&self, origin: &str) -> Vec<u8> {
        let body = json!([self.args, self.kwargs, self.embed.to_json()]);
        let mut envelope = json!({
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
                "origin": origin,
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
        if let Some(trace) = &self.trace
            && let Some(Value::Object(headers)) = envelope.get_mut("headers")
        {
            trace.write(headers);
        }
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
