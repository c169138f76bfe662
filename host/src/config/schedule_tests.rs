use super::*;

fn at(text: &str) -> Timestamp {
    text.parse().expect("a timestamp")
}

fn cron(text: &str, zone: &str) -> When {
    When::Cron(Cron::parse(text, TimeZone::get(zone).expect("zone")).expect("cron"))
}

/// The ticks from `from`, one after another.
fn ticks(when: &When, from: &str, n: usize) -> Vec<String> {
    let mut at = at(from);
    (0..n)
        .map(|_| {
            at = when.next_after(at).expect("a next tick");
            at.to_string()
        })
        .collect()
}

#[test]
fn hourly_cron_fires_on_the_hour() {
    let when = cron("0 * * * *", "UTC");
    assert_eq!(
        ticks(&when, "2026-12-02T07:13:00Z", 3),
        [
            "2026-12-02T08:00:00Z",
            "2026-12-02T09:00:00Z",
            "2026-12-02T10:00:00Z"
        ]
    );
}

#[test]
fn cron_reads_its_fields_in_its_time_zone() {
    // 09:30 on weekdays in Berlin: UTC+1 in winter.
    let when = cron("30 9 * * 1-5", "Europe/Berlin");
    assert_eq!(
        ticks(&when, "2026-12-04T12:00:00Z", 2),
        ["2026-12-07T08:30:00Z", "2026-12-08T08:30:00Z"]
    );
}

#[test]
fn cron_follows_daylight_saving_time() {
    // New York moves to UTC-4 on 8 March 2026.
    let when = cron("0 12 * * *", "America/New_York");
    assert_eq!(
        ticks(&when, "2026-03-07T00:00:00Z", 2),
        ["2026-03-07T17:00:00Z", "2026-03-08T16:00:00Z"]
    );
}

#[test]
fn cron_steps_lists_and_sunday_as_seven() {
    let when = cron("*/20 0 1,15 * *", "UTC");
    assert_eq!(
        ticks(&when, "2026-12-01T00:30:00Z", 3),
        [
            "2026-12-01T00:40:00Z",
            "2026-12-15T00:00:00Z",
            "2026-12-15T00:20:00Z"
        ]
    );
    let sundays = cron("0 0 * * 7", "UTC");
    assert_eq!(
        ticks(&sundays, "2026-12-02T00:00:00Z", 1),
        ["2026-12-06T00:00:00Z"]
    );
}

#[test]
fn bad_cron_expressions_say_what_is_wrong() {
    let utc = || TimeZone::get("UTC").expect("UTC");
    assert!(
        Cron::parse("0 * * *", utc())
            .expect_err("refused")
            .contains("five fields")
    );
    assert!(
        Cron::parse("61 * * * *", utc())
            .expect_err("refused")
            .contains("minute")
    );
    assert!(
        Cron::parse("0 5-2 * * *", utc())
            .expect_err("refused")
            .contains("backwards")
    );
    assert!(
        Cron::parse("0 0 30 2 *", utc())
            .map(|c| When::Cron(c).next_after(at("2026-01-01T00:00:00Z")))
            .expect("parses")
            .is_none()
    );
}

#[test]
fn every_ticks_on_multiples_of_its_period_since_the_epoch() {
    let when = When::Every(Duration::from_secs(3600));
    assert_eq!(
        ticks(&when, "2026-12-02T07:13:00Z", 2),
        ["2026-12-02T08:00:00Z", "2026-12-02T09:00:00Z"]
    );
}

#[test]
fn the_latest_tick_is_the_last_one_due_since_the_last_run() {
    let when = cron("0 * * * *", "UTC");
    let now = at("2026-12-02T07:13:00Z");
    assert_eq!(
        when.latest(at("2026-12-02T03:00:00Z"), now),
        Some(at("2026-12-02T07:00:00Z"))
    );
    assert_eq!(when.latest(at("2026-12-02T07:00:00Z"), now), None);
    let every = When::Every(Duration::from_secs(1));
    assert_eq!(
        every.latest(at("2026-12-02T07:12:00Z"), now),
        Some(at("2026-12-02T07:13:00Z"))
    );
}

#[test]
fn a_section_is_checked_into_an_entry() {
    let section: ScheduleSection = toml::from_str(
        r#"
task = "tasks.cleanup_old_evaluations"
every = "1h"
kwargs = { days = 7 }
expires = "10m"
"#,
    )
    .expect("TOML");
    let entry = section.check("cleanup").expect("valid");
    assert_eq!(entry.when, When::Every(Duration::from_secs(3600)));
    assert_eq!(entry.kwargs, serde_json::json!({"days": 7}));
    assert_eq!(entry.expires, Some(Duration::from_secs(600)));
    assert_eq!(entry.queue, "celery");
    let both: ScheduleSection =
        toml::from_str("task = \"t\"\nevery = \"1h\"\ncron = \"0 * * * *\"").expect("TOML");
    assert_eq!(
        both.check("x"),
        Err(ScheduleError::When { name: "x".into() })
    );
    let zone: ScheduleSection =
        toml::from_str("task = \"t\"\ncron = \"0 * * * *\"\ntimezone = \"Mars/Olympus\"")
            .expect("TOML");
    assert!(matches!(
        zone.check("x"),
        Err(ScheduleError::TimeZone { .. })
    ));
}
