use super::*;

fn origin() -> Origin<'static> {
    Origin {
        parent_id: Some("parent"),
        root_id: Some("root"),
        default_queue: "celery",
        routes: &(),
        now: OffsetDateTime::UNIX_EPOCH,
    }
}

fn sig(task: &str, args: Value, options: Value) -> Value {
    json!({"task": task, "args": args, "kwargs": {}, "options": options,
           "subtask_type": null, "immutable": false})
}

fn published(steps: &[Step]) -> Vec<&NewTask> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Publish(task) => Some(task.as_ref()),
            Step::ChordSize { .. } => None,
        })
        .collect()
}

#[test]
fn the_next_chain_step_gets_the_result_first_and_the_rest_of_the_chain() {
    // chain(a, b, c) as sent: a's embed holds [c, b].
    let embed = Embed {
        chain: vec![
            sig("add", json!([8]), json!({"task_id": "c"})),
            sig("add", json!([4]), json!({"task_id": "b"})),
        ],
        ..Embed::default()
    };
    let mut steps = Vec::new();
    let children = succeeded(&embed, &json!(4), &origin(), &mut steps).expect("applies");
    let sent = published(&steps);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].id, "b");
    assert_eq!(sent[0].args, json!([4, 4]));
    assert_eq!(sent[0].embed.chain.len(), 1);
    assert_eq!(sent[0].embed.chain[0]["options"]["task_id"], "c");
    assert_eq!(sent[0].parent_id.as_deref(), Some("parent"));
    assert_eq!(sent[0].root_id.as_deref(), Some("root"));
    assert_eq!(children, vec![json!([["b", null], null])]);
}

#[test]
fn a_chain_sent_returns_its_last_task_with_the_tasks_before_as_parents() {
    let chain = json!({"task": "celery.chain", "args": [], "kwargs": {"tasks": [
        sig("add", json!([1, 2]), json!({})),
        sig("add", json!([10]), json!({})),
    ]}, "options": {}, "subtask_type": "chain", "immutable": false});
    let mut steps = Vec::new();
    let returned = apply(&chain, Vec::new(), &origin(), &mut steps).expect("applies");
    let sent = published(&steps);
    assert_eq!(
        sent.len(),
        1,
        "the first step, the second riding in its embed"
    );
    let second = sent[0].embed.chain[0]["options"]["task_id"].clone();
    assert!(
        second.is_string(),
        "the second step has its id before it is sent"
    );
    assert_eq!(returned.id(), second.as_str().unwrap_or_default());
    assert_eq!(
        returned.into_tuple(),
        json!([[second, [[sent[0].id, null], null]], null])
    );
}

#[test]
fn an_immutable_signature_keeps_its_own_arguments() {
    let mut callback = sig("add", json!([1, 1]), json!({}));
    callback["immutable"] = json!(true);
    let embed = Embed {
        callbacks: vec![callback],
        ..Embed::default()
    };
    let mut steps = Vec::new();
    succeeded(&embed, &json!(99), &origin(), &mut steps).expect("applies");
    assert_eq!(published(&steps)[0].args, json!([1, 1]));
}

#[test]
fn several_callbacks_go_out_as_one_group() {
    let embed = Embed {
        callbacks: vec![
            sig("a", json!([]), json!({})),
            sig("b", json!([]), json!({})),
        ],
        ..Embed::default()
    };
    let mut steps = Vec::new();
    succeeded(&embed, &json!(1), &origin(), &mut steps).expect("applies");
    let sent = published(&steps);
    assert_eq!(sent.len(), 2);
    assert!(sent[0].group.is_some());
    assert_eq!(sent[0].group, sent[1].group);
    assert_eq!(
        (sent[0].group_index, sent[1].group_index),
        (Some(0), Some(1))
    );
}

#[test]
fn a_chord_writes_its_size_before_its_last_header_task_and_each_part_carries_the_body() {
    let chord = json!({
        "task": "celery.chord", "args": [], "options": {}, "subtask_type": "chord",
        "immutable": false,
        "kwargs": {"header": {"task": "celery.group", "args": [], "options": {},
                              "subtask_type": "group", "immutable": false,
                              "kwargs": {"tasks": [sig("add", json!([1]), json!({})),
                                                   sig("add", json!([2]), json!({}))]}},
                   "body": sig("tsum", json!([]), json!({})), "kwargs": {}},
    });
    let mut steps = Vec::new();
    apply(&chord, vec![json!(10)], &origin(), &mut steps).expect("applies");
    assert!(matches!(steps[1], Step::ChordSize { size: 2, .. }));
    let sent = published(&steps);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].args, json!([10, 1]));
    let body = sent[1].embed.chord.as_ref().expect("chord body");
    assert_eq!(body["task"], "tsum");
    assert_eq!(
        body["options"]["group_id"].as_str(),
        sent[1].group.as_deref()
    );
    assert_eq!(sent[1].group_index, Some(1));
}

#[test]
fn errbacks_are_sent_the_failed_task_id() {
    let mut steps = Vec::new();
    errbacks(
        &[sig("on_error", json!([]), json!({"task_id": "e"}))],
        "failed-id",
        &origin(),
        &mut steps,
    )
    .expect("applies");
    let sent = published(&steps);
    assert_eq!(sent[0].id, "e");
    assert_eq!(sent[0].args, json!(["failed-id"]));
}

#[test]
fn a_failure_dooms_every_later_chain_step_and_the_chord_body_there() {
    let chord_step = json!({
        "task": "celery.chord", "args": [], "subtask_type": "chord", "immutable": false,
        "options": {"task_id": "chord-step"},
        "kwargs": {"header": [], "body": sig("tsum", json!([]), json!({"task_id": "body"}))},
    });
    let doomed = doomed(&[sig("c", json!([]), json!({"task_id": "c"})), chord_step]);
    let ids: Vec<&str> = doomed.iter().map(|d| d.task_id.as_str()).collect();
    assert_eq!(ids, ["c", "chord-step", "body"]);
}

#[test]
fn unknown_canvas_types_are_refused_by_name() {
    let mut chunks = sig("celery.chunks", json!([]), json!({}));
    chunks["subtask_type"] = json!("chunks");
    let mut steps = Vec::new();
    assert_eq!(
        apply(&chunks, Vec::new(), &origin(), &mut steps),
        Err(CanvasError::Unsupported("chunks".into()))
    );
}

#[test]
fn an_embed_round_trips_through_a_message() {
    let task = NewTask {
        id: "x".into(),
        task: "add".into(),
        args: json!([1, 2]),
        kwargs: json!({}),
        queue: "celery".into(),
        group: Some("g".into()),
        group_index: Some(3),
        embed: Embed {
            chord: Some(sig("tsum", json!([]), json!({"task_id": "body"}))),
            ..Embed::default()
        },
        ..NewTask::default()
    };
    let decoded = crate::protocol::TaskMessage::decode(&task.encode("host")).expect("decodes");
    assert_eq!(decoded.embed, task.embed);
    assert_eq!(decoded.group_index, Some(3));
    assert_eq!(decoded.group.as_deref(), Some("g"));
}

#[test]
fn every_task_a_signature_would_send_is_named() {
    let mut first = sig(
        "a",
        json!([]),
        json!({"link": [sig("on_ok", json!([]), json!({}))]}),
    );
    first["options"]["link_error"] = sig("on_error", json!([]), json!({}));
    let chord = json!({
        "task": "celery.chord", "args": [], "subtask_type": "chord", "immutable": false,
        "options": {},
        "kwargs": {"header": [first], "body": sig("body", json!([]), json!({}))},
    });
    let mut names = crate::protocol::signature::task_names(&chord);
    names.sort();
    assert_eq!(names, ["a", "body", "on_error", "on_ok"]);
}

/// `evaluate_code` declares the queue `evaluations`.
struct Declared;

impl Routes for Declared {
    fn declared_queue(&self, task: &str) -> Option<&str> {
        (task == "evaluate_code").then_some("evaluations")
    }
}

#[test]
fn a_signature_naming_no_queue_goes_to_the_queue_its_task_declared() {
    let origin = Origin {
        routes: &Declared,
        ..origin()
    };
    let queues = |sig: Value| {
        let mut steps = Vec::new();
        apply(&sig, Vec::new(), &origin, &mut steps).expect("applies");
        published(&steps)
            .iter()
            .map(|t| t.queue.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        queues(sig("evaluate_code", json!([]), json!({}))),
        ["evaluations"]
    );
    assert_eq!(
        queues(sig("evaluate_code", json!([]), json!({"queue": "urgent"}))),
        ["urgent"]
    );
    assert_eq!(
        queues(sig("demo.add", json!([1, 2]), json!({}))),
        ["celery"]
    );
}
