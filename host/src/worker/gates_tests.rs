use super::*;

fn defaults() -> TaskDefaults {
    TaskDefaults {
        queue: None,
        max_retries: None,
        retry_backoff: None,
        retry_backoff_max: None,
        retry_jitter: None,
        soft_time_limit: None,
        time_limit: Some(1e9),
        rate_limit: None,
        autoretry_for: None,
    }
}

#[test]
fn a_plugin_can_tighten_but_not_extend_its_time_limit() {
    let granted = Limits::default();
    let mut declared = defaults();
    assert_eq!(
        time_limits((None, None), &granted, &declared),
        (None, granted.time_limit)
    );
    declared.time_limit = Some(2.0);
    declared.soft_time_limit = Some(1.0);
    assert_eq!(
        time_limits((None, None), &granted, &declared),
        (Some(Duration::from_secs(1)), Some(Duration::from_secs(2)))
    );
}

/// A demo.add message carrying the producer's `time_limit` (soft, hard).
fn add_with_limits(time_limit: (Option<f64>, Option<f64>)) -> TaskMessage {
    let sent = crate::protocol::NewTask {
        id: "t-1".into(),
        task: "demo.add".into(),
        args: serde_json::json!([]),
        kwargs: serde_json::json!({}),
        queue: "celery".into(),
        time_limit,
        ..Default::default()
    }
    .encode("test-host");
    TaskMessage::decode(&sent).expect("decodes")
}

#[test]
fn a_producer_or_remote_limit_never_exceeds_the_operators() {
    let granted = Limits::default();
    let cap = granted.time_limit;
    let gates = Gates::new(&TaskOverrides::default());
    let huge = add_with_limits((Some(1e20), Some(1e20)));
    let (_, hard) = gates.time_limits(&huge, &granted, &defaults());
    assert_eq!(hard, cap, "a producer's 1e20 s stops at the operator's cap");
    let (_, hard) = gates.time_limits(
        &add_with_limits((Some(0.0), Some(0.0))),
        &granted,
        &defaults(),
    );
    assert_eq!(hard, cap, "a producer's 0 does not remove the cap");
    gates.set_time_limits("demo.add", Some(0.0), Some(0.0));
    let (_, hard) = gates.time_limits(&add_with_limits((None, None)), &granted, &defaults());
    assert_eq!(hard, cap, "a remote limit of 0 does not remove the cap");
}

#[test]
fn a_producer_or_remote_soft_limit_never_exceeds_the_operators() {
    let soft_cap = Some(Duration::from_secs(10));
    let granted = Limits {
        soft_time_limit: soft_cap,
        ..Limits::default()
    };
    let gates = Gates::new(&TaskOverrides::default());
    for asked in [(Some(1e20), None), (Some(0.0), None), (Some(-1.0), None)] {
        let (soft, _) = gates.time_limits(&add_with_limits(asked), &granted, &defaults());
        assert_eq!(soft, soft_cap, "a producer's soft limit {asked:?}");
    }
    gates.set_time_limits("demo.add", Some(0.0), None);
    let (soft, _) = gates.time_limits(&add_with_limits((None, None)), &granted, &defaults());
    assert_eq!(
        soft, soft_cap,
        "a remote soft limit of 0 does not remove the cap"
    );
    gates.set_time_limits("demo.add", Some(1e20), None);
    let (soft, _) = gates.time_limits(&add_with_limits((None, None)), &granted, &defaults());
    assert_eq!(
        soft, soft_cap,
        "a remote soft limit of 1e20 stops at the cap"
    );
}

#[test]
fn the_producers_time_limit_wins() {
    let declared = TaskDefaults {
        time_limit: Some(2.0),
        ..defaults()
    };
    assert_eq!(
        time_limits((Some(5.0), Some(7.0)), &Limits::default(), &declared),
        (Some(Duration::from_secs(5)), Some(Duration::from_secs(7)))
    );
}

fn per_minute() -> Option<Rate> {
    Rate::parse("1/m").ok()
}

#[tokio::test(start_paused = true)]
async fn a_start_given_back_is_taken_by_the_next_task() {
    let limits = RateLimits::new(&TaskOverrides::default());
    assert_eq!(limits.acquire("t", per_minute()), None);
    limits.give_back("t", per_minute());
    assert_eq!(
        limits.acquire("t", per_minute()),
        None,
        "the start given back"
    );
    assert!(limits.acquire("t", per_minute()).is_some());
}

#[test]
fn a_capped_backlog_comes_back_paced_not_all_at_once() {
    let gates = Gates::new(&TaskOverrides::default());
    let plugin: Arc<str> = "p".into();
    let dues: Vec<i64> = (0..5)
        .map(|_| gates.capped_due(&plugin, 2, 1_000))
        .collect();
    assert_eq!(dues, [1_200, 1_300, 1_400, 1_500, 1_600]);
    // With the backlog gone, the next waits one interval again.
    assert_eq!(gates.capped_due(&plugin, 2, 10_000), 10_200);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_spaces_starts_by_its_interval() {
    let limits = RateLimits::new(&TaskOverrides::default());
    assert_eq!(limits.acquire("t", per_minute()), None);
    assert_eq!(
        limits.acquire("t", per_minute()),
        Some(Duration::from_secs(60))
    );
    tokio::time::advance(Duration::from_secs(45)).await;
    assert_eq!(
        limits.acquire("t", per_minute()),
        Some(Duration::from_secs(15))
    );
    tokio::time::advance(Duration::from_secs(15)).await;
    assert_eq!(
        limits.acquire("t", per_minute()),
        None,
        "due again after one interval"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_without_a_rate_never_waits() {
    let limits = RateLimits::new(&TaskOverrides::default());
    for _ in 0..100 {
        assert_eq!(limits.acquire("t", None), None);
    }
}

#[tokio::test(start_paused = true)]
async fn remote_control_sets_and_lifts_a_rate_over_the_declared_one() {
    let limits = RateLimits::new(&TaskOverrides::default());
    limits.set("t", Rate::parse("2/s").ok());
    assert_eq!(limits.acquire("t", per_minute()), None);
    assert_eq!(
        limits.acquire("t", per_minute()),
        Some(Duration::from_millis(500))
    );
    limits.set("t", None);
    assert_eq!(
        limits.acquire("t", per_minute()),
        None,
        "lifted, whatever was declared"
    );
    assert_eq!(limits.acquire("t", per_minute()), None);
}

#[tokio::test(start_paused = true)]
async fn a_configured_rate_applies_over_the_declared_one() {
    let mut overrides = HashMap::new();
    overrides.insert(
        "t".to_owned(),
        crate::config::TaskSection {
            rate_limit: Rate::parse("10/s").ok(),
            ..Default::default()
        },
    );
    let limits = RateLimits::new(&Arc::new(overrides));
    assert_eq!(limits.acquire("t", per_minute()), None);
    assert_eq!(
        limits.acquire("t", per_minute()),
        Some(Duration::from_millis(100))
    );
}

#[tokio::test(start_paused = true)]
async fn a_vanishing_rate_does_not_overflow_the_clock() {
    let limits = RateLimits::new(&TaskOverrides::default());
    let tiny = Rate::parse("1e-300/s").ok();
    assert_eq!(limits.acquire("t", tiny), None);
    assert!(
        limits
            .acquire("t", tiny)
            .is_some_and(|w| w > Duration::from_secs(86_400))
    );
}
