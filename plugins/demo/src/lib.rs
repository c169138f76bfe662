//! The demo plugin: small tasks that show every outcome a task can have, used by the README, the
//! tests and the benchmarks.

use serde_json::{Value, json};
use taskhost_sdk::canvas::{Signature, chord, group};
use taskhost_sdk::{Failure, Result, tasks, trace};

tasks! {
    /// x + y. Overflow is a failure, not a wrap.
    #[task(name = "demo.add")]
    fn add(x: i64, y: i64) -> Result<i64> {
        x.checked_add(y)
            .ok_or_else(|| Failure::error("OverflowError", format!("{x} + {y} overflows a 64-bit integer")))
    }

    /// The sum of a list of integers: a chord body over `demo.add` parts.
    #[task(name = "demo.tsum")]
    fn tsum(numbers: Vec<i64>) -> Result<i64> {
        numbers.iter().try_fold(0i64, |sum, n| sum.checked_add(*n)).ok_or_else(|| {
            Failure::error("OverflowError", "the sum overflows a 64-bit integer")
        })
    }

    /// Fans out from inside a task: `n` tasks `demo.add(i, i)`, and a chord of `n` more summed
    /// by `demo.tsum`, `n` at most 1,000. Returns their ids: `{"group": id, "tasks": [ids],
    /// "chord": body id}`.
    #[task(name = "demo.fanout")]
    fn fanout(mut n: u32) -> Result<Value> {
        n = n.min(1_000);
        let failed = |e: String| Failure::error("RuntimeError", format!("cannot send: {e}"));
        let tasks: Vec<String> = (0..n)
            .map(|i| Signature::new("demo.add", (i, i)).send())
            .collect::<std::result::Result<_, _>>()
            .map_err(failed)?;
        let group_id = group((0..n).map(|i| Signature::new("demo.add", (i, 1)))).send().map_err(failed)?;
        let parts = (0..n).map(|i| Signature::new("demo.add", (i, i)));
        let body = chord(parts, Signature::new("demo.tsum", ())).send().map_err(failed)?;
        Ok(json!({"tasks": tasks, "group": group_id, "chord": body}))
    }

    /// Sends task `name` with `args` and returns its id: a task of another plugin needs the
    /// operator's `allow_send` grant.
    #[task(name = "demo.send")]
    fn send(name: String, args: Vec<Value>) -> Result<String> {
        Signature::new(&name, args)
            .send()
            .map_err(|e| Failure::error("PermissionError", e))
    }

    /// Returns its argument unchanged, whatever JSON it is.
    #[task(name = "demo.echo")]
    fn echo(value: Value) -> Result<Value> {
        Ok(value)
    }

    /// Sleeps `ms` milliseconds on the WASI monotonic clock, then returns null.
    #[task(name = "demo.sleep")]
    fn sleep(ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }

    /// Fails with `message`; Python's `.get()` raises `RuntimeError(message)`.
    #[task(name = "demo.fail")]
    fn fail(message: String) -> Result<()> {
        Err(Failure::error("RuntimeError", message))
    }

    /// Reports progress `steps` times through the host interface (Celery's `update_state`, state
    /// `PROGRESS` with `{"current": n, "total": steps}`), then returns `steps`.
    #[task(name = "demo.progress")]
    fn progress(steps: u32) -> Result<u32> {
        for current in 1..=steps {
            let meta = serde_json::json!({"current": current, "total": steps});
            taskhost_sdk::update_state("PROGRESS", &meta)
                .map_err(|e| Failure::error("RuntimeError", format!("cannot report progress: {e}")))?;
        }
        Ok(steps)
    }

    /// Counts the letters of `words` in a span of its own, with a span per word nested in it:
    /// a traced worker shows them under the task's (see the README's "Tracing" section).
    #[task(name = "demo.traced")]
    fn traced(words: Vec<String>) -> Result<usize> {
        let mut span = trace::span("count letters");
        span.set_attribute("words", words.len() as i64);
        let letters = words
            .iter()
            .map(|word| {
                let mut measure = trace::span("measure");
                measure.set_attribute("word", word.as_str());
                word.chars().count()
            })
            .sum();
        span.set_attribute("letters", letters as i64);
        Ok(letters)
    }

    /// Asks to be retried, with its backoff (0.1 s, doubling), until its retry count equals
    /// `times`, then returns it.
    #[task(name = "demo.retry", max_retries = 10, retry_backoff = 0.1, retry_jitter = false)]
    fn retry(times: u32) -> Result<u32> {
        let retries = taskhost_sdk::task().retries;
        if retries < times {
            return Err(Failure::retry("RuntimeError", format!("retry {retries} of {times}")));
        }
        Ok(retries)
    }
}

// The tasks as plain functions on the author's machine (`cargo test -p demo`), the host's
// imports answered by the SDK's test double.
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskhost_sdk::testing::FakeHost;

    #[test]
    fn add_overflowing_fails_as_an_overflow_error() {
        FakeHost::new();
        assert_eq!(add(2, 3).ok(), Some(5));
        assert!(add(i64::MAX, 1).is_err());
    }

    #[test]
    fn progress_reports_each_step_then_returns_the_count() {
        let host = FakeHost::new();
        assert_eq!(progress(3).ok(), Some(3));
        let reported = host.progress();
        assert_eq!(reported.len(), 3);
        assert_eq!(
            reported[2],
            ("PROGRESS".to_owned(), json!({"current": 3, "total": 3}))
        );
    }

    #[test]
    fn retry_asks_again_until_its_retry_count_reaches_times() {
        FakeHost::new().retries(1);
        assert!(retry(2).is_err(), "retry 1 of 2 asks again");
        FakeHost::new().retries(2);
        assert_eq!(retry(2).ok(), Some(2));
    }

    #[test]
    fn fanout_sends_at_most_a_thousand_tasks() {
        let host = FakeHost::new();
        assert!(fanout(5_000).is_ok());
        let added = host
            .sent()
            .iter()
            .filter(|s| s["task"] == "demo.add")
            .count();
        assert_eq!(
            added, 1_000,
            "the lone tasks, the group and the chord are separate sends"
        );
    }

    #[test]
    fn send_records_the_signature_it_sent() {
        let host = FakeHost::new();
        let id = send("demo.add".into(), vec![json!(1), json!(2)]);
        assert!(id.is_ok());
        assert_eq!(host.sent()[0]["task"], "demo.add");
        assert_eq!(host.sent()[0]["args"], json!([1, 2]));
    }
}
