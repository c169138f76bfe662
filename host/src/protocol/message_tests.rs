//! The decoder against real Celery captures, generated messages and corruptions of both.

use super::*;
use crate::protocol::result::result_document;

const CAPTURED_DELAY: &str = include_str!("../../../tests/fixtures/task_message_delay.json");
const CAPTURED_COUNTDOWN: &str =
    include_str!("../../../tests/fixtures/task_message_countdown_expires.json");

#[test]
fn decodes_a_message_captured_from_celery() {
    let m = TaskMessage::decode(CAPTURED_DELAY.as_bytes()).expect("decodes");
    assert_eq!(m.task, "app.add");
    assert_eq!(parse(&m.args), json!([2, 3]));
    assert_eq!(parse(&m.kwargs), json!({}));
    assert_eq!(m.retries, 0);
    assert_eq!(m.eta, None);
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
        retries: 0,
        ..Default::default()
    };
    let encoded = new.encode("gen42@test-host");
    let envelope: Value = serde_json::from_slice(&encoded).expect("JSON envelope");
    assert_eq!(
        envelope["properties"]["delivery_info"]["routing_key"],
        "high"
    );
    assert_eq!(envelope["headers"]["origin"], "gen42@test-host");
    let m = TaskMessage::decode(&encoded).expect("decodes");
    assert_eq!((m.id.as_str(), m.task.as_str()), ("abc", "demo.add"));
    assert_eq!(parse(&m.args), new.args);
    assert_eq!(parse(&m.kwargs), new.kwargs);
    assert_eq!(m.priority, 3);
    assert_eq!(m.eta, new.eta);
    let retried = TaskMessage::decode(&m.retry_message(&encoded, None, None)).expect("decodes");
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

#[test]
fn a_header_of_another_type_counts_as_absent() {
    let mut envelope: Value = serde_json::from_str(CAPTURED_DELAY).expect("json");
    envelope["headers"]["retries"] = json!("two");
    envelope["headers"]["root_id"] = json!(5);
    envelope["headers"]["timelimit"] = json!("soon");
    envelope["headers"]["argsrepr"] = json!(null);
    envelope["properties"]["priority"] = json!(-1);
    let m = TaskMessage::decode(envelope.to_string().as_bytes()).expect("decodes");
    assert_eq!((m.retries, m.root_id.as_deref(), m.priority), (0, None, 0));
    assert_eq!(m.time_limit, (None, None));
    assert_eq!(m.args_repr(), "(2, 3)", "printed from the arguments");
}

#[test]
fn an_envelope_with_a_field_twice_is_refused_as_malformed() {
    let raw = br#"{"headers": {"task": "t", "id": "i"}, "body": "[[], {}]", "body": "[[1], {}]"}"#;
    let err = TaskMessage::decode(raw).expect_err("ambiguous");
    assert!(
        matches!(err.error, DecodeError::Malformed(_)),
        "{:?}",
        err.error
    );
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
            retries: 0,
            ..Default::default()
        };
        let m = TaskMessage::decode(&new.encode("test-host")).expect("decodes");
        // What the plugin receives is the JSON text of these values.
        let sent: Value = serde_json::from_str(m.args.get()).expect("args text");
        assert_eq!((&sent, &parse(&m.kwargs)), (&args, &kwargs), "case {case}");
        // What the plugin returns is stored as the result unchanged.
        let result = arbitrary(&mut rng, 4);
        let doc = result_document(
            &Meta::of("id"),
            "SUCCESS",
            &result,
            None,
            OffsetDateTime::UNIX_EPOCH,
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
            retries: 0,
            ..Default::default()
        }
        .encode("test-host"),
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
                    !m.id.is_empty() && parse(&m.args).is_array() && parse(&m.kwargs).is_object()
                );
            }
            Err(e) => assert!(!e.error.to_string().is_empty()),
        }
    }
    // Some corruptions leave a valid message (a changed letter in a name, say).
    assert!(decoded > 0);
}

#[test]
fn a_postponed_message_is_marked_announced_and_a_retry_is_not() {
    let raw = CAPTURED_COUNTDOWN.as_bytes().to_vec();
    let message = TaskMessage::decode(&raw).expect("decodes");
    assert!(!message.announced);
    let held = message.postponed_message(&raw);
    let back = TaskMessage::decode(&held).expect("the held message decodes");
    assert!(
        back.announced,
        "back from the delayed set, already announced"
    );
    assert_eq!(back.id, message.id);
    assert_eq!(back.postponed_message(&held), held, "marked once");
    let retry = TaskMessage::decode(&back.retry_message(&held, None, None)).expect("retry decodes");
    assert!(!retry.announced, "a retry is a new delivery");
}

#[test]
fn the_trace_context_goes_out_and_comes_back_with_the_message() {
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let trace = TraceContext::read(Some(parent), Some("k=v"));
    let new = NewTask {
        id: "t".into(),
        task: "demo.add".into(),
        args: json!([]),
        kwargs: json!({}),
        trace: trace.clone(),
        ..Default::default()
    };
    let encoded = new.encode("gen1@h");
    let m = TaskMessage::decode(&encoded).expect("decodes");
    assert_eq!(m.trace, trace);
    let next = TraceContext::read(
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"),
        None,
    );
    let retried =
        TaskMessage::decode(&m.retry_message(&encoded, None, next.as_ref())).expect("decodes");
    assert_eq!(
        retried.trace, next,
        "the retry's parent is the span that sent it"
    );
    let untraced = TaskMessage::decode(CAPTURED_DELAY.as_bytes()).expect("decodes");
    assert_eq!(untraced.trace, None);
}

#[test]
fn a_hostile_trace_header_or_origin_is_ignored_not_refused() {
    let encoded = NewTask {
        id: "t".into(),
        task: "demo.add".into(),
        args: json!([]),
        kwargs: json!({}),
        ..Default::default()
    }
    .encode(&"o".repeat(10_000));
    let mut envelope: Value = serde_json::from_slice(&encoded).expect("JSON");
    envelope["headers"]["traceparent"] = json!({"not": "a string"});
    envelope["headers"]["tracestate"] = json!("k=v");
    let m = TaskMessage::decode(envelope.to_string().as_bytes()).expect("still decodes");
    assert_eq!((m.trace, m.origin), (None, None));
}
