//! Celery's signatures (`celery/canvas.py`): a task, chain, group or chord as a dict of
//! `task, args, kwargs, options, subtask_type, immutable`, read, and edited as Celery freezes
//! them into their groups and chains.

use serde_json::{Map, Value, json};

/// Why a signature cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CanvasError {
    #[error("a signature is not an object with a task name: {0}")]
    NotASignature(String),
    #[error("{0} signatures are not supported by taskhost (see the README's canvas section)")]
    Unsupported(String),
    #[error("a {kind} signature has no {field}")]
    Missing {
        kind: &'static str,
        field: &'static str,
    },
}

/// A signature, read.
#[derive(Debug, Clone)]
pub(super) struct Signature {
    pub(super) task: String,
    pub(super) args: Vec<Value>,
    pub(super) kwargs: Map<String, Value>,
    pub(super) options: Map<String, Value>,
    pub(super) immutable: bool,
    pub(super) kind: Kind,
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    Task,
    Chain(Vec<Value>),
    Group(Vec<Value>),
    Chord {
        header: Vec<Value>,
        /// The header group's id, when the producer froze it.
        group_id: Option<String>,
        body: Value,
    },
}

impl Signature {
    pub(super) fn parse(value: &Value) -> Result<Self, CanvasError> {
        let not_one =
            || CanvasError::NotASignature(super::message::truncate(&value.to_string(), 80));
        let object = value.as_object().ok_or_else(not_one)?;
        let task = object
            .get("task")
            .and_then(Value::as_str)
            .ok_or_else(not_one)?
            .to_owned();
        let args = match object.get("args") {
            Some(Value::Array(items)) => items.clone(),
            _ => Vec::new(),
        };
        let kwargs = match object.get("kwargs") {
            Some(Value::Object(map)) => map.clone(),
            _ => Map::new(),
        };
        let kind = match object.get("subtask_type").and_then(Value::as_str) {
            None => Kind::Task,
            Some("chain") => Kind::Chain(tasks_of(&kwargs, "chain")?),
            Some("group") => Kind::Group(tasks_of(&kwargs, "group")?),
            Some("chord") => {
                let (header, group_id) = header_of(&kwargs)?;
                Kind::Chord {
                    header,
                    group_id,
                    body: kwargs.get("body").cloned().ok_or(CanvasError::Missing {
                        kind: "chord",
                        field: "body",
                    })?,
                }
            }
            Some(other) => return Err(CanvasError::Unsupported(other.to_owned())),
        };
        Ok(Self {
            task,
            args,
            kwargs,
            options: match object.get("options") {
                Some(Value::Object(map)) => map.clone(),
                _ => Map::new(),
            },
            immutable: object
                .get("immutable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            kind,
        })
    }

    pub(super) fn option_text(&self, key: &str) -> Option<String> {
        self.options
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The arguments after `partial` is prepended (unless immutable).
    pub(super) fn merged_args(&self, partial: Vec<Value>) -> Vec<Value> {
        if self.immutable || partial.is_empty() {
            self.args.clone()
        } else {
            partial
                .into_iter()
                .chain(self.args.iter().cloned())
                .collect()
        }
    }
}

/// Options of a signature that name ids: the host makes its own for whatever a plugin sends,
/// so a plugin can neither answer another task's `.get()` nor join another's group or chord.
const ID_OPTIONS: [&str; 5] = ["task_id", "group_id", "group_index", "root_id", "parent_id"];
/// Options that carry Celery's own bookkeeping of a message (its remaining chain, its chord,
/// where a reply goes): a plugin builds a chain or chord as a signature instead.
const HOST_OPTIONS: [&str; 3] = ["chain", "chord", "reply_to"];

/// `sig` as a plugin may send it: every id it names dropped (the host makes them), in each
/// task of its chains, groups and chords and in their links and errbacks. Refused, naming the
/// option, when it sets an option only the host may (`chain`, `chord`, `reply_to`).
pub fn for_a_plugin(mut sig: Value) -> Result<Value, String> {
    let mut pending = vec![&mut sig];
    while let Some(sig) = pending.pop() {
        let Some(object) = sig.as_object_mut() else {
            continue;
        };
        for (key, value) in object.iter_mut() {
            match (key.as_str(), value) {
                ("options", Value::Object(options)) => {
                    if let Some(key) = HOST_OPTIONS.iter().find(|k| options.contains_key(**k)) {
                        return Err(format!(
                            "option {key:?} is the host's to set: send a chain or chord \
                             signature instead"
                        ));
                    }
                    options.retain(|key, _| !ID_OPTIONS.contains(&key.as_str()));
                    for (key, value) in options.iter_mut() {
                        if key == "link" || key == "link_error" {
                            nested(value, &mut pending);
                        }
                    }
                }
                ("kwargs", Value::Object(kwargs)) => {
                    for (key, value) in kwargs.iter_mut() {
                        if matches!(key.as_str(), "tasks" | "header" | "body") {
                            nested(value, &mut pending);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(sig)
}

/// The signatures `value` holds (one, or a list of them), added to `pending`.
fn nested<'a>(value: &'a mut Value, pending: &mut Vec<&'a mut Value>) {
    match value {
        Value::Array(items) => pending.extend(items.iter_mut()),
        one @ Value::Object(_) => pending.push(one),
        _ => {}
    }
}

/// Every task name a signature would send: the tasks of its chains, groups and chords, and
/// their links, errbacks, later chain steps and chord bodies.
pub fn task_names(sig: &Value) -> Vec<String> {
    signatures(sig)
        .into_iter()
        .filter(|sig| sig.get("subtask_type").and_then(Value::as_str).is_none())
        .filter_map(|sig| sig.get("task").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// Every signature in `sig`, itself first: group, chain and chord members, link and
/// link_error callbacks, embedded chain steps and chord bodies, at any depth.
pub fn signatures(sig: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    let mut pending = vec![sig];
    while let Some(sig) = pending.pop() {
        all.push(sig);
        let kwargs = sig.get("kwargs");
        let options = sig.get("options");
        let nested = [
            kwargs.and_then(|k| k.get("tasks")),
            kwargs.and_then(|k| k.get("header")),
            kwargs.and_then(|k| k.get("body")),
            options.and_then(|o| o.get("link")),
            options.and_then(|o| o.get("link_error")),
            options.and_then(|o| o.get("chain")),
            options.and_then(|o| o.get("chord")),
        ];
        for value in nested.into_iter().flatten() {
            match value {
                Value::Array(items) => pending.extend(items.iter()),
                one @ Value::Object(_) => pending.push(one),
                _ => {}
            }
        }
    }
    all
}

pub(super) fn text(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn tasks_of(kwargs: &Map<String, Value>, kind: &'static str) -> Result<Vec<Value>, CanvasError> {
    match kwargs.get("tasks") {
        Some(Value::Array(items)) => Ok(items.clone()),
        // A group of one may be stored as the signature itself.
        Some(sig @ Value::Object(_)) => Ok(vec![sig.clone()]),
        _ => Err(CanvasError::Missing {
            kind,
            field: "tasks",
        }),
    }
}

/// A chord's header: a list of signatures, or a group signature holding them (and the group's
/// frozen id).
fn header_of(kwargs: &Map<String, Value>) -> Result<(Vec<Value>, Option<String>), CanvasError> {
    match kwargs.get("header") {
        Some(Value::Array(items)) => Ok((items.clone(), None)),
        Some(group @ Value::Object(_)) => {
            let id = group.get("options").and_then(|o| text(o, "task_id"));
            match group.get("kwargs").and_then(|k| k.get("tasks")) {
                Some(Value::Array(items)) => Ok((items.clone(), id)),
                _ => Ok((vec![group.clone()], None)),
            }
        }
        _ => Err(CanvasError::Missing {
            kind: "chord",
            field: "header",
        }),
    }
}

/// A group signature of `tasks`, as Celery writes one.
pub(super) fn group_of(tasks: Vec<Value>) -> Value {
    json!({
        "task": "celery.group",
        "args": [],
        "kwargs": {"tasks": tasks},
        "options": {},
        "subtask_type": "group",
        "immutable": false,
    })
}

pub(super) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(super) fn add_to_list_option(sig: &mut Value, key: &str, extra: &Value) {
    let Some(object) = sig.as_object_mut() else {
        return;
    };
    let options = object
        .entry("options")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(options) = options.as_object_mut() else {
        return;
    };
    let mut list = match options.remove(key) {
        Some(Value::Array(items)) => items,
        Some(one @ Value::Object(_)) => vec![one],
        _ => Vec::new(),
    };
    match extra {
        Value::Array(items) => list.extend(items.iter().cloned()),
        one => list.push(one.clone()),
    }
    options.insert(key.into(), Value::Array(list));
}

/// Freezes a group member into its group: on a chain, its last step carries the group; on a
/// chord, its body (whose result is the chord's).
pub(super) fn set_options(member: &mut Value, group_id: &str, index: usize, chord: Option<&Value>) {
    let kind = member.get("subtask_type").and_then(Value::as_str);
    let target = match kind {
        Some("chain") => member
            .get_mut("kwargs")
            .and_then(|k| k.get_mut("tasks"))
            .and_then(Value::as_array_mut)
            .and_then(|t| t.last_mut()),
        Some("chord") => member.get_mut("kwargs").and_then(|k| k.get_mut("body")),
        _ => Some(member),
    };
    let Some(target) = target else {
        return;
    };
    let Some(object) = target.as_object_mut() else {
        return;
    };
    let options = object
        .entry("options")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(options) = options.as_object_mut() {
        options.insert("group_id".into(), json!(group_id));
        options.insert("group_index".into(), json!(index));
        if let Some(body) = chord {
            options.insert("chord".into(), body.clone());
        }
        options.entry("task_id").or_insert_with(|| json!(new_id()));
    }
}

/// A chain body is its first task with the rest as that task's chain, as Celery 5.7 unrolls it
/// so that the header parts do not each carry the whole chain.
pub(super) fn unroll_body(body: Value) -> Result<Value, CanvasError> {
    let sig = Signature::parse(&body)?;
    let Kind::Chain(tasks) = sig.kind else {
        return Ok(body);
    };
    let Some((first, rest)) = tasks.split_first() else {
        return Err(CanvasError::Missing {
            kind: "chord body chain",
            field: "tasks",
        });
    };
    let mut first = first.clone();
    if !rest.is_empty() {
        let reversed: Vec<Value> = rest.iter().rev().cloned().collect();
        add_to_list_option(&mut first, "chain", &Value::Array(reversed));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::for_a_plugin;
    use serde_json::json;

    #[test]
    fn the_ids_a_plugin_names_are_dropped_everywhere_it_can_name_them() {
        let named = json!({"task_id": "victim", "group_id": "g", "root_id": "r",
                           "parent_id": "p", "group_index": 0, "queue": "celery"});
        let sig = json!({
            "task": "celery.chord", "subtask_type": "chord", "options": named,
            "kwargs": {
                "header": [{"task": "a", "options": named}],
                "body": {"task": "b", "options": {"task_id": "victim",
                         "link": [{"task": "c", "options": {"task_id": "victim"}}],
                         "link_error": {"task": "d", "options": {"task_id": "victim"}}}},
            },
        });
        let sent = for_a_plugin(sig).expect("no host option").to_string();
        for id in ["victim", "\"g\"", "\"r\"", "\"p\"", "group_index"] {
            assert!(!sent.contains(id), "{id} left in {sent}");
        }
        assert!(sent.contains("\"queue\":\"celery\""), "{sent}");
    }

    #[test]
    fn a_plugin_may_not_set_the_hosts_bookkeeping_options() {
        for key in ["chain", "chord", "reply_to"] {
            let sig = json!({"task": "celery.chain", "subtask_type": "chain", "kwargs": {
                "tasks": [{"task": "a", "options": {key: []}}]}});
            let refused = for_a_plugin(sig).expect_err(key);
            assert!(refused.contains(key), "{refused}");
        }
    }
}
