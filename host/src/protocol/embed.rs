//! What a task message embeds after its arguments (`[args, kwargs, embed]`): the signatures
//! that follow the task in Celery's canvas.

use serde_json::{Value, json};

/// What a task message embeds after its arguments: `[args, kwargs, embed]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embed {
    /// `link`: applied with the task's result when it succeeds.
    pub callbacks: Vec<Value>,
    /// `link_error`: sent the task's id when it fails.
    pub errbacks: Vec<Value>,
    /// The steps after this one, reversed: the next step is the last element.
    pub chain: Vec<Value>,
    /// The chord body this task is a header part of.
    pub chord: Option<Value>,
}

impl Embed {
    /// Reads an embed as producers write it (nulls for what is absent); anything else is read
    /// as no canvas at all, as Celery's workers do for protocol-v2 messages without one.
    pub fn parse(value: &Value) -> Self {
        let list = |key: &str| match value.get(key) {
            Some(Value::Array(items)) => items.clone(),
            Some(sig @ Value::Object(_)) => vec![sig.clone()],
            _ => Vec::new(),
        };
        Self {
            callbacks: list("callbacks"),
            errbacks: list("errbacks"),
            chain: list("chain"),
            chord: value.get("chord").filter(|c| c.is_object()).cloned(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty()
            && self.errbacks.is_empty()
            && self.chain.is_empty()
            && self.chord.is_none()
    }

    pub fn to_json(&self) -> Value {
        let list = |items: &[Value]| (!items.is_empty()).then(|| items.to_vec());
        json!({
            "callbacks": list(&self.callbacks),
            "errbacks": list(&self.errbacks),
            "chain": list(&self.chain),
            "chord": self.chord,
        })
    }
}
