//! Celery's canvas as a worker carries it out: the signatures a task message embeds (its
//! callbacks, errbacks, the rest of its chain, the chord it is a part of) and the messages that
//! applying a signature publishes — a task, a chain, a group or a chord — with the ids, group
//! headers and embeds Celery 5.7 gives them (`celery/canvas.py`, `celery/app/trace.py`,
//! `celery-protocol/SPEC.md` section 10). Building only: the worker sends what this returns.

use super::embed::Embed;
use super::message::NewTask;
use super::signature::{
    Kind, Signature, add_to_list_option, group_of, new_id, set_options, text, unroll_body,
};
use super::time::parse_time;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

pub use super::signature::CanvasError;

/// Something to do, in order, to apply a signature.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Write a chord's size (`celery-taskset-meta-<gid>.s`, after deleting its `.c` claim), as
    /// Celery's publisher does before the last header task goes out.
    ChordSize { group_id: String, size: usize },
    /// Publish a task message.
    Publish(Box<NewTask>),
}

/// The queues tasks declared for themselves (Celery's task `queue` option), by task name.
pub trait Routes: Sync {
    fn declared_queue(&self, task: &str) -> Option<&str>;
}

/// No task declares a queue.
impl Routes for () {
    fn declared_queue(&self, _: &str) -> Option<&str> {
        None
    }
}

/// Where signatures are applied from: the task that applies them, and the worker's defaults.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    /// The task applying them (their `parent_id`), if any.
    pub parent_id: Option<&'a str>,
    /// The workflow's root id, if any (else each published task is its own root).
    pub root_id: Option<&'a str>,
    /// The queue of a signature that names none and whose task declares none (Celery's
    /// `task_default_queue`).
    pub default_queue: &'a str,
    /// The queue a task declared, for a signature naming none.
    pub routes: &'a dyn Routes,
    pub now: OffsetDateTime,
}

/// What a signature applies with and into.
#[derive(Debug, Clone, Default)]
struct Call {
    /// Arguments prepended to the signature's own unless it is immutable.
    partial: Vec<Value>,
    /// The rest of an enclosing chain (reversed), carried by what this signature ends with.
    chain: Vec<Value>,
}

/// What Celery records of an applied signature among its parent's `children`: its result
/// tuple, `[[id, parent], children]` (a task's children null, a group's its members').
#[derive(Debug, Clone, PartialEq)]
pub struct Applied(Value);

impl Applied {
    /// The id a waiter asks for: the task's, or the group's.
    pub fn id(&self) -> &str {
        self.0[0][0].as_str().unwrap_or_default()
    }

    /// The tuple, as the parent's result document lists it.
    pub fn into_tuple(self) -> Value {
        self.0
    }
}

/// The steps that apply `sig` with `partial` prepended to its arguments (unless immutable),
/// and what Celery records of it among the parent's `children`.
pub fn apply(
    sig: &Value,
    partial: Vec<Value>,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Applied, CanvasError> {
    let call = Call {
        partial,
        chain: Vec::new(),
    };
    apply_call(Signature::parse(sig)?, call, origin, steps).map(Applied)
}

/// The steps that go on from a task that succeeded with `result`, as Celery's tracer does:
/// each callback applied with the result (several as one group), then the next chain step
/// with the rest of the chain. Returns the children to record in the task's result.
pub fn succeeded(
    embed: &Embed,
    result: &Value,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Vec<Value>, CanvasError> {
    let mut children = Vec::new();
    match embed.callbacks.as_slice() {
        [] => {}
        [one] => children.push(apply(one, vec![result.clone()], origin, steps)?.into_tuple()),
        many => {
            let group = group_of(many.to_vec());
            children.push(apply(&group, vec![result.clone()], origin, steps)?.into_tuple());
        }
    }
    if let Some((next, rest)) = embed.chain.split_last() {
        let call = Call {
            partial: vec![result.clone()],
            chain: rest.to_vec(),
        };
        children.push(apply_call(Signature::parse(next)?, call, origin, steps)?);
    }
    Ok(children)
}

/// The steps that send a failed task's errbacks, as Celery does for errbacks it does not call
/// inline: one group of them, applied with the failed task's id.
pub fn errbacks(
    errbacks: &[Value],
    failed_id: &str,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<(), CanvasError> {
    if errbacks.is_empty() {
        return Ok(());
    }
    apply(
        &group_of(errbacks.to_vec()),
        vec![json!(failed_id)],
        origin,
        steps,
    )
    .map(drop)
}

/// A task a failure reaches without running: a step of the failed task's chain (or of a chord
/// body there), which Celery marks failed too.
#[derive(Debug, Clone, PartialEq)]
pub struct Doomed {
    pub task_id: String,
    pub group_id: Option<String>,
    /// The chord body, if the step is a chord header part: its chord counts it as failed.
    pub chord: Option<Value>,
    pub group_index: Option<u64>,
}

/// The steps after a failed task that Celery marks failed with it (`_fail_chain`): every
/// remaining chain step with a frozen id, descending into chord bodies.
pub fn doomed(chain: &[Value]) -> Vec<Doomed> {
    let mut pending: std::collections::VecDeque<Value> = chain.iter().cloned().collect();
    let mut out = Vec::new();
    while let Some(step) = pending.pop_front() {
        let options = step.get("options").cloned().unwrap_or_default();
        if let Some(id) = options.get("task_id").and_then(Value::as_str) {
            out.push(Doomed {
                task_id: id.to_owned(),
                group_id: text(&options, "group_id"),
                chord: options.get("chord").filter(|c| c.is_object()).cloned(),
                group_index: options.get("group_index").and_then(Value::as_u64),
            });
        }
        if step.get("subtask_type").and_then(Value::as_str) == Some("chord")
            && let Some(body) = step.get("kwargs").and_then(|k| k.get("body"))
        {
            pending.push_back(body.clone());
        }
        for later in step
            .get("options")
            .and_then(|o| o.get("chain"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            pending.push_back(later.clone());
        }
    }
    out
}

fn apply_call(
    sig: Signature,
    call: Call,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Value, CanvasError> {
    match sig.kind.clone() {
        Kind::Task => Ok(send_task(sig, call, origin, steps)),
        Kind::Chain(tasks) => send_chain(&sig, tasks, call, origin, steps),
        // A group followed by more steps is a chord whose body is the next step (Celery
        // upgrades it the same way when it prepares a chain).
        Kind::Group(tasks) => match call.chain.split_last() {
            Some((next, rest)) => {
                let call = Call {
                    partial: call.partial,
                    chain: rest.to_vec(),
                };
                let group_id = sig.option_text("task_id");
                send_chord(&sig, tasks, group_id, next.clone(), call, origin, steps)
            }
            None => send_group(&sig, tasks, call.partial, None, origin, steps),
        },
        Kind::Chord {
            header,
            group_id,
            body,
        } => send_chord(&sig, header, group_id, body, call, origin, steps),
    }
}

/// Publishes one task; returns its result tuple `[[id, null], null]`.
fn send_task(sig: Signature, call: Call, origin: &Origin<'_>, steps: &mut Vec<Step>) -> Value {
    let options = Value::Object(sig.options.clone());
    let id = sig.option_text("task_id").unwrap_or_else(new_id);
    let list = |key: &str| match options.get(key) {
        Some(Value::Array(items)) => items.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut chain = list("chain");
    // What follows the enclosing chain runs after this task's own chain steps.
    let mut outer = call.chain.clone();
    outer.append(&mut chain);
    let embed = Embed {
        callbacks: list("link"),
        errbacks: list("link_error"),
        chain: outer,
        chord: options.get("chord").filter(|c| c.is_object()).cloned(),
    };
    let seconds = |key: &str| options.get(key).and_then(Value::as_f64);
    let eta = options
        .get("eta")
        .and_then(Value::as_str)
        .and_then(parse_time)
        .or_else(|| seconds("countdown").and_then(|s| after(origin.now, s)));
    let expires = match options.get("expires") {
        Some(Value::String(t)) => parse_time(t),
        Some(Value::Number(n)) => n.as_f64().and_then(|s| after(origin.now, s)),
        _ => None,
    };
    let root_id = origin
        .root_id
        .map(str::to_owned)
        .or_else(|| sig.option_text("root_id"))
        .unwrap_or_else(|| id.clone());
    let task = NewTask {
        args: Value::Array(sig.merged_args(call.partial)),
        kwargs: Value::Object(sig.kwargs.clone()),
        queue: sig.option_text("queue").unwrap_or_else(|| {
            origin
                .routes
                .declared_queue(&sig.task)
                .unwrap_or(origin.default_queue)
                .to_owned()
        }),
        priority: options
            .get("priority")
            .and_then(Value::as_u64)
            .map_or(0, |p| p.min(9) as u8),
        eta,
        expires,
        root_id: Some(root_id),
        parent_id: origin
            .parent_id
            .map(str::to_owned)
            .or_else(|| sig.option_text("parent_id")),
        group: sig.option_text("group_id"),
        group_index: options.get("group_index").and_then(Value::as_u64),
        // Set by the worker as it publishes: the span that sends it.
        trace: None,
        embed,
        time_limit: (seconds("soft_time_limit"), seconds("time_limit")),
        ignore_result: options
            .get("ignore_result")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        id: id.clone(),
        task: sig.task,
        retries: 0,
    };
    steps.push(Step::Publish(Box::new(task)));
    json!([[id, null], null])
}

fn after(now: OffsetDateTime, seconds: f64) -> Option<OffsetDateTime> {
    let delay = time::Duration::checked_seconds_f64(seconds)?;
    now.checked_add(delay)
}

/// Publishes a chain: its first step with the others (reversed) riding in its embed.
fn send_chain(
    sig: &Signature,
    tasks: Vec<Value>,
    call: Call,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Value, CanvasError> {
    let mut flat = Vec::new();
    for task in tasks {
        // A chain within a chain is its steps, in place.
        match Signature::parse(&task)?.kind {
            Kind::Chain(inner) => flat.extend(inner),
            _ => flat.push(task),
        }
    }
    let links = [("link_error", true), ("link", false)];
    for (key, every) in links {
        if let Some(extra) = sig.options.get(key) {
            let targets: Vec<usize> = if every {
                (0..flat.len()).collect()
            } else {
                flat.len().checked_sub(1).into_iter().collect()
            };
            for i in targets {
                add_to_list_option(&mut flat[i], key, extra);
            }
        }
    }
    let last = freeze(&mut flat);
    let Some((first, rest)) = flat.split_first() else {
        return Ok(Value::Null);
    };
    let mut chain = call.chain;
    chain.extend(rest.iter().rev().cloned());
    let partial = if sig.immutable || call.partial.is_empty() {
        sig.args.clone()
    } else {
        call.partial.into_iter().chain(sig.args.clone()).collect()
    };
    let first = apply_call(
        Signature::parse(first)?,
        Call { partial, chain },
        origin,
        steps,
    )?;
    Ok(last.unwrap_or(first))
}

/// Gives each plain task of a chain its id now, as Celery does when it sends a chain, so that
/// what the chain returns is its last task's result tuple, with the tasks before it as its
/// parents (`[[id, parent], null]`); none when the chain ends with a group or a chord.
fn freeze(steps: &mut [Value]) -> Option<Value> {
    let mut result = None;
    for step in steps.iter_mut() {
        let plain = step.get("subtask_type").is_none_or(Value::is_null);
        let Some(options) = step.get_mut("options").and_then(Value::as_object_mut) else {
            result = None;
            continue;
        };
        if !plain {
            result = None;
            continue;
        }
        let id = match options.get("task_id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => new_id(),
        };
        options.insert("task_id".into(), Value::String(id.clone()));
        result = Some(json!([[id, result.unwrap_or(Value::Null)], null]));
    }
    result
}

/// Publishes a group: each member (nested groups unrolled) with the group's id and its index;
/// for a chord header, each with the body, and the chord's size written before the last.
fn send_group(
    sig: &Signature,
    tasks: Vec<Value>,
    partial: Vec<Value>,
    chord: Option<Value>,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Value, CanvasError> {
    let group_id = sig.option_text("task_id").unwrap_or_else(new_id);
    let mut members = Vec::new();
    unroll(tasks, &mut members)?;
    let size = members.len();
    let mut children = Vec::with_capacity(size);
    for (index, mut member) in members.into_iter().enumerate() {
        set_options(&mut member, &group_id, index, chord.as_ref());
        if chord.is_some() && index + 1 == size {
            steps.push(Step::ChordSize {
                group_id: group_id.clone(),
                size,
            });
        }
        let call = Call {
            partial: partial.clone(),
            chain: Vec::new(),
        };
        children.push(apply_call(Signature::parse(&member)?, call, origin, steps)?);
    }
    Ok(json!([[group_id, null], children]))
}

fn unroll(tasks: Vec<Value>, out: &mut Vec<Value>) -> Result<(), CanvasError> {
    for task in tasks {
        match Signature::parse(&task)?.kind {
            Kind::Group(inner) => unroll(inner, out)?,
            Kind::Chain(inner) if inner.is_empty() => {}
            Kind::Task | Kind::Chain(_) | Kind::Chord { .. } => out.push(task),
        }
    }
    Ok(())
}

/// Publishes a chord: the body frozen into the header's group (its id, the chain that follows
/// it, the chord's own link and link_error), each header task carrying it, the size written
/// before the last. An empty header calls the body at once with `[]`. Ids the producer froze
/// are kept: a chord signature's own `task_id` is its header group's, the body has its own.
fn send_chord(
    sig: &Signature,
    header: Vec<Value>,
    group_id: Option<String>,
    body: Value,
    call: Call,
    origin: &Origin<'_>,
    steps: &mut Vec<Step>,
) -> Result<Value, CanvasError> {
    let group_id = group_id
        .or_else(|| sig.option_text("task_id"))
        .unwrap_or_else(new_id);
    let mut body = unroll_body(body)?;
    let body_id =
        text(body.get("options").unwrap_or(&Value::Null), "task_id").unwrap_or_else(new_id);
    {
        let options = body
            .as_object_mut()
            .map(|o| {
                o.entry("options")
                    .or_insert_with(|| Value::Object(Map::new()))
            })
            .and_then(Value::as_object_mut)
            .ok_or(CanvasError::Missing {
                kind: "chord",
                field: "body options",
            })?;
        options.insert("task_id".into(), json!(body_id));
        // A nested chord's body already belongs to the enclosing chord's group.
        options.entry("group_id").or_insert_with(|| json!(group_id));
        if !call.chain.is_empty() {
            let mut chain = call.chain.clone();
            if let Some(Value::Array(own)) = options.remove("chain") {
                chain.extend(own);
            }
            options.insert("chain".into(), Value::Array(chain));
        }
    }
    for key in ["link", "link_error"] {
        if let Some(extra) = sig.options.get(key) {
            add_to_list_option(&mut body, key, extra);
        }
    }
    if header.is_empty() {
        apply(&body, vec![json!([])], origin, steps)?;
    } else {
        let header_sig = Signature {
            options: Map::from_iter([("task_id".to_owned(), json!(group_id))]),
            ..sig.clone()
        };
        let partial = sig.merged_args(call.partial);
        send_group(&header_sig, header, partial, Some(body), origin, steps)?;
    }
    Ok(json!([[body_id, null], null]))
}

#[cfg(test)]
#[path = "canvas_tests.rs"]
mod tests;
