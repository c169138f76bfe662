//! Celery's remote control on the wire (kombu's pidbox): a broadcast command decoded into a
//! typed [`Request`], whether it is addressed to this node, and the reply in kombu's envelope.
//! Which commands exist and what their arguments are lives here; what the worker does about
//! each lives in `monitor::control`.

use super::envelope::transient_envelope;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

/// A command as kombu's pidbox sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub request: Request,
    destination: Option<Vec<String>>,
    pattern: Option<String>,
    matcher: Option<String>,
    /// Where the reply goes: the ticket and the caller's reply routing key, if it wants one.
    pub reply_to: Option<ReplyTo>,
    /// The sender's Lamport clock.
    pub clock: Option<u64>,
}

/// The caller's reply address.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    pub ticket: String,
    pub routing_key: String,
}

/// What a command asks for, with its arguments read.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping,
    /// `revoke` (and `terminate`, a revoke with `terminate` set).
    Revoke {
        ids: Vec<String>,
        terminate: bool,
    },
    Active,
    Reserved,
    Scheduled,
    Revoked,
    /// `registered` and `dump_tasks`.
    Registered,
    Stats,
    ActiveQueues,
    Conf,
    Clock,
    Hello {
        from_node: Option<String>,
    },
    EnableEvents,
    DisableEvents,
    Heartbeat,
    /// `rate: None` lifts the limit (Celery sends `"0"`, an empty string or 0 for that).
    RateLimit {
        task: String,
        rate: Option<String>,
    },
    TimeLimit {
        task: String,
        soft: Option<f64>,
        hard: Option<f64>,
    },
    AddConsumer {
        queue: Option<String>,
    },
    CancelConsumer {
        queue: Option<String>,
    },
    /// `pool_grow` (`grow`) or `pool_shrink` by `by` slots.
    ResizePool {
        grow: bool,
        by: i64,
    },
    Shutdown,
    /// A method this host does not serve.
    Unknown(String),
}

impl Request {
    fn parse(method: &str, args: &Value) -> Self {
        let text = |key: &str| args.get(key).and_then(Value::as_str).map(str::to_owned);
        let seconds = |key: &str| args.get(key).and_then(Value::as_f64);
        let count = || args.get("n").and_then(Value::as_i64).unwrap_or(1).max(0);
        match method {
            "ping" => Self::Ping,
            "revoke" | "terminate" => Self::Revoke {
                ids: task_ids(args),
                // `celery control terminate SIGNAL ID...` is a revoke that stops running
                // instances (a sandboxed task is interrupted, not signalled).
                terminate: method == "terminate"
                    || args.get("terminate").and_then(Value::as_bool) == Some(true),
            },
            "active" => Self::Active,
            "reserved" => Self::Reserved,
            "scheduled" => Self::Scheduled,
            "revoked" => Self::Revoked,
            "registered" | "dump_tasks" => Self::Registered,
            "stats" => Self::Stats,
            "active_queues" => Self::ActiveQueues,
            "conf" => Self::Conf,
            "clock" => Self::Clock,
            "hello" => Self::Hello {
                from_node: text("from_node"),
            },
            "enable_events" => Self::EnableEvents,
            "disable_events" => Self::DisableEvents,
            "heartbeat" => Self::Heartbeat,
            "rate_limit" => Self::RateLimit {
                task: text("task_name").unwrap_or_default(),
                rate: rate(args.get("rate_limit")),
            },
            "time_limit" => Self::TimeLimit {
                task: text("task_name").unwrap_or_default(),
                soft: seconds("soft"),
                hard: seconds("hard"),
            },
            "add_consumer" => Self::AddConsumer {
                queue: text("queue"),
            },
            "cancel_consumer" => Self::CancelConsumer {
                queue: text("queue"),
            },
            "pool_grow" | "pool_shrink" => Self::ResizePool {
                grow: method == "pool_grow",
                by: count(),
            },
            "shutdown" => Self::Shutdown,
            other => Self::Unknown(other.to_owned()),
        }
    }
}

/// `task_id` as one id or a list of them.
fn task_ids(args: &Value) -> Vec<String> {
    match args.get("task_id") {
        Some(Value::String(id)) => vec![id.clone()],
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A rate limit argument; none lifts the limit.
fn rate(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(r)) if !r.is_empty() && r != "0" => Some(r.clone()),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|n| n > 0.0) => Some(n.to_string()),
        _ => None,
    }
}

impl Command {
    /// Decodes a message from the broadcast channel; none if it is not a pidbox command.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let envelope: Value = serde_json::from_slice(payload).ok()?;
        let body = envelope.get("body")?.as_str()?;
        let body = match envelope
            .pointer("/properties/body_encoding")
            .and_then(Value::as_str)
        {
            Some("base64") => BASE64.decode(body).ok()?,
            _ => body.as_bytes().to_vec(),
        };
        let body: Value = serde_json::from_slice(&body).ok()?;
        let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
        let method = text("method")?;
        let arguments = body.get("arguments").cloned().unwrap_or(Value::Null);
        let reply_to = match (text("ticket"), body.pointer("/reply_to/routing_key")) {
            (Some(ticket), Some(Value::String(key))) => Some(ReplyTo {
                ticket,
                routing_key: key.clone(),
            }),
            _ => None,
        };
        Some(Self {
            request: Request::parse(&method, &arguments),
            destination: body.get("destination").and_then(Value::as_array).map(|d| {
                d.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }),
            pattern: text("pattern"),
            matcher: text("matcher"),
            reply_to,
            clock: envelope.pointer("/headers/clock").and_then(Value::as_u64),
        })
    }

    /// Whether the command is addressed to `node` (kombu's `Node.handle_message`): a non-empty
    /// destination list names it, or else a pattern matches it, or else it is for everyone.
    pub fn is_for(&self, node: &str) -> bool {
        if let Some(destination) = &self.destination
            && !destination.is_empty()
        {
            return destination.iter().any(|d| d == node);
        }
        match (&self.pattern, self.matcher.as_deref()) {
            (Some(pattern), None | Some("glob")) => glob_match(pattern, node),
            // Regular expressions (`pcre`) are not understood here: answer rather than ignore.
            _ => true,
        }
    }
}

/// Shell-style matching of `*` and `?`, as Python's `fnmatch` (without character classes).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The reply message `node` pushes to the caller's reply list: `{node: reply}` in kombu's
/// envelope, with the ticket and this node's `clock`.
pub fn reply(node: &str, to: &ReplyTo, clock: u64, reply: Value) -> String {
    let body = json!({ node: reply }).to_string();
    transient_envelope(
        &body,
        json!({"ticket": to.ticket, "clock": clock}),
        "reply.celery.pidbox",
        &to.routing_key,
    )
}

/// A queue as kombu describes it in `active_queues` (direct exchange of the queue's name).
pub fn queue_dict(queue: &str) -> Value {
    json!({
        "name": queue,
        "exchange": {"name": queue, "type": "direct", "arguments": null, "durable": true,
                     "passive": false, "auto_delete": false, "delivery_mode": null,
                     "no_declare": false},
        "routing_key": queue,
        "queue_arguments": null, "binding_arguments": null, "consumer_arguments": null,
        "durable": true, "exclusive": false, "auto_delete": false, "no_ack": false,
        "alias": null, "bindings": [], "no_declare": null, "expires": null,
        "message_ttl": null, "max_length": null, "max_length_bytes": null, "max_priority": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match("w1@*", "w1@host"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("w?@h", "w1@h"));
        assert!(!glob_match("w2@*", "w1@host"));
        assert!(!glob_match("w1@", "w1@host"));
    }

    /// A broadcast as `celery control` sends it.
    fn broadcast(body: Value) -> Vec<u8> {
        json!({
            "body": BASE64.encode(body.to_string()),
            "properties": {"body_encoding": "base64"},
            "headers": {"clock": 7},
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn decodes_a_revoke_with_its_reply_address() {
        let command = Command::decode(&broadcast(json!({
            "method": "revoke",
            "arguments": {"task_id": ["a", "b"], "terminate": true},
            "destination": ["w1@h"],
            "ticket": "t-1",
            "reply_to": {"exchange": "reply.celery.pidbox", "routing_key": "r-1"},
        })))
        .expect("decodes");
        assert_eq!(
            command.request,
            Request::Revoke {
                ids: vec!["a".into(), "b".into()],
                terminate: true
            }
        );
        assert_eq!(command.clock, Some(7));
        assert!(command.is_for("w1@h") && !command.is_for("w2@h"));
        let to = command.reply_to.expect("a reply is wanted");
        assert_eq!(
            (to.ticket.as_str(), to.routing_key.as_str()),
            ("t-1", "r-1")
        );
    }

    #[test]
    fn a_zero_rate_lifts_the_limit() {
        let parse = |rate: Value| {
            Request::parse("rate_limit", &json!({"task_name": "t", "rate_limit": rate}))
        };
        assert_eq!(
            parse(json!("0")),
            Request::RateLimit {
                task: "t".into(),
                rate: None
            }
        );
        assert_eq!(
            parse(json!(5)),
            Request::RateLimit {
                task: "t".into(),
                rate: Some("5".into())
            }
        );
        assert_eq!(
            Request::parse("pool_shrink", &json!({"n": 2})),
            Request::ResizePool { grow: false, by: 2 }
        );
    }
}
