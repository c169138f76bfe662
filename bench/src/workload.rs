//! The tasks every contender is given: the same protocol-v2 messages, generated once.

use serde_json::{Value, json};

/// One kind of task in the drain runs.
pub struct Workload {
    /// What the table calls it.
    pub label: &'static str,
    pub task: &'static str,
    /// The result every task must end with.
    pub expected: Value,
    /// The messages, producer order, and their task ids.
    pub messages: Vec<Vec<u8>>,
    pub ids: Vec<String>,
}

impl Workload {
    fn new(
        label: &'static str,
        task: &'static str,
        args: Value,
        expected: Value,
        n: usize,
    ) -> Self {
        let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        let messages = ids
            .iter()
            .map(|id| {
                taskhost_tests::celery_message(id, task, args.clone(), json!({}), "celery")
                    .into_bytes()
            })
            .collect();
        Self {
            label,
            task,
            expected,
            messages,
            ids,
        }
    }
}

/// `demo.add(1, 2)`, `demo.echo` of a 10 KB JSON document, and `demo.progress(1)` (one
/// `update_state` through the host interface, then the result).
pub fn all(n: usize) -> Vec<Workload> {
    let document = ten_kb_document();
    vec![
        Workload::new("demo.add", "demo.add", json!([1, 2]), json!(3), n),
        Workload::new(
            "demo.echo 10 KB",
            "demo.echo",
            json!([document.clone()]),
            document,
            n,
        ),
        Workload::new(
            "demo.progress (host API)",
            "demo.progress",
            json!([1]),
            json!(1),
            n,
        ),
    ]
}

/// A JSON document of about 10 KB, shaped like a record list.
pub fn ten_kb_document() -> Value {
    let items: Vec<Value> = (0..102)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("evaluation-{i:04}"),
                "score": f64::from(i) * 0.125,
                "passed": i % 3 != 0,
                "tags": ["bench", "celery", "taskhost"],
            })
        })
        .collect();
    json!({"kind": "bench", "items": items})
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_echo_document_is_about_ten_kb() {
        let len = super::ten_kb_document().to_string().len();
        assert!((9_000..12_000).contains(&len), "{len} bytes");
    }
}
