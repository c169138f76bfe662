//! The fetcher's timing rules, on tokio's paused clock, against a stand-in for Redis's lists.

use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::task::JoinHandle;

/// Queue lists and in-flight lists in memory, recording when each call came.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<InMemory>>);

#[derive(Default)]
struct InMemory {
    queued: VecDeque<Delivery>,
    in_flight: Vec<Delivery>,
    /// The next fetches that fail; each moves one queued message first (its answer is lost).
    failing_fetches: u32,
    calls: Vec<(&'static str, Duration)>,
    start: Option<Instant>,
}

impl InMemory {
    fn record(&mut self, call: &'static str) {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.calls.push((call, start.elapsed()));
    }
}

impl Fake {
    fn with(messages: &[&str], failing_fetches: u32) -> Self {
        let fake = Self::default();
        {
            let mut lists = crate::lock(&fake.0);
            lists.queued = messages.iter().map(|m| delivery(m)).collect();
            lists.failing_fetches = failing_fetches;
            lists.start = Some(Instant::now());
        }
        fake
    }

    fn push(&self, message: &str) {
        crate::lock(&self.0).queued.push_back(delivery(message));
    }

    /// A producer that sends `messages` once `after` has passed.
    fn push_after(&self, after: Duration, messages: &'static [&'static str]) -> JoinHandle<()> {
        let fake = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for m in messages {
                fake.push(m);
            }
        })
    }

    fn calls(&self) -> Vec<(&'static str, Duration)> {
        crate::lock(&self.0).calls.clone()
    }

    fn take(&self, max: usize) -> Vec<Delivery> {
        let mut lists = crate::lock(&self.0);
        let n = max.min(lists.queued.len());
        let taken: Vec<Delivery> = lists.queued.drain(..n).collect();
        lists.in_flight.extend(taken.iter().cloned());
        taken
    }
}

fn delivery(message: &str) -> Delivery {
    Delivery {
        raw: message.as_bytes().to_vec(),
        source: "celery".into(),
    }
}

fn lost() -> RedisError {
    RedisError::Connect {
        url: "redis://fake".into(),
        reason: "connection killed".into(),
    }
}

impl Queues for Fake {
    type Blocking = ();

    async fn fetch(&self, _keys: &[String], max: usize) -> Result<Vec<Delivery>, RedisError> {
        let failing = {
            let mut lists = crate::lock(&self.0);
            let failing = lists.failing_fetches > 0;
            lists.failing_fetches = lists.failing_fetches.saturating_sub(1);
            lists.record(if failing { "fetch failed" } else { "fetch" });
            failing
        };
        let taken = self.take(if failing { 1 } else { max });
        if failing { Err(lost()) } else { Ok(taken) }
    }

    async fn blocking_connection(&self) -> Result<(), RedisError> {
        Ok(())
    }

    async fn blocking_fetch(
        &self,
        _conn: &mut (),
        _key: &str,
    ) -> Result<Option<Delivery>, RedisError> {
        tokio::time::sleep(BLOCK_TIMEOUT).await;
        Ok(self.take(1).pop())
    }

    async fn in_flight(&self) -> Result<Vec<Delivery>, RedisError> {
        Ok(crate::lock(&self.0).in_flight.clone())
    }

    async fn requeue(&self, delivery: &Delivery) -> Result<bool, RedisError> {
        let mut lists = crate::lock(&self.0);
        lists.record("requeue");
        let Some(at) = lists.in_flight.iter().position(|d| d.raw == delivery.raw) else {
            return Ok(false);
        };
        let returned = lists.in_flight.remove(at);
        lists.queued.push_front(returned);
        Ok(true)
    }
}

/// A fetcher on `fake`, consuming `celery`, with what keeps it going.
fn fetcher(
    fake: &Fake,
) -> (
    Fetcher<Fake>,
    Arc<Held>,
    watch::Sender<Vec<String>>,
    crate::shutdown::Stop,
) {
    let held = Arc::new(Held::default());
    let (consumed, consumed_rx) = watch::channel(vec!["celery".to_owned()]);
    let (stop, stopping) = crate::shutdown::flag();
    let fetcher = Fetcher::start(
        fake.clone(),
        held.clone(),
        Arc::new(Health::default()),
        consumed_rx,
        stopping,
    );
    (fetcher, held, consumed, stop)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn a_lost_fetch_answer_is_reconciled_after_a_backoff_before_the_next_fetch() {
    let fake = Fake::with(&["m1"], 1);
    let (mut fetcher, _held, _consumed, _stop) = fetcher(&fake);
    let got = fetcher.next(4).await.expect("a message");
    assert_eq!(got.raw, b"m1");
    // The failed fetch moved m1 with nobody told; after the backoff it goes back to its queue,
    // and only then is the queue fetched again.
    assert_eq!(
        fake.calls(),
        [
            ("fetch failed", ms(0)),
            ("requeue", ms(200)),
            ("fetch", ms(200))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_back_off_doubling() {
    let fake = Fake::with(&[], 3);
    let (mut fetcher, _held, _consumed, _stop) = fetcher(&fake);
    let idle = tokio::time::timeout(Duration::from_secs(5), fetcher.next(1)).await;
    assert!(idle.is_err(), "nothing to fetch");
    let fetches: Vec<Duration> = fake
        .calls()
        .iter()
        .filter(|(call, _)| call.starts_with("fetch"))
        .map(|(_, at)| *at)
        .collect();
    assert_eq!(fetches, [ms(0), ms(200), ms(600), ms(1400)]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_fetcher_waits_on_its_wakers_without_polling() {
    let fake = Fake::with(&[], 0);
    let (mut fetcher, _held, _consumed, _stop) = fetcher(&fake);
    let producer = fake.push_after(ms(2500), &["late"]);
    let start = Instant::now();
    let got = fetcher.next(4).await.expect("a message");
    assert_eq!(got.raw, b"late");
    // Brought by the waker's blocking fetch that was waiting when it came (each waits 1 s).
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let fetches = fake.calls().iter().filter(|(c, _)| *c == "fetch").count();
    assert_eq!(
        fetches, 1,
        "one fetch, then only the wakers' blocking fetches"
    );
    producer.await.expect("producer");
}

#[tokio::test(start_paused = true)]
async fn reconcile_waits_for_blocking_fetches_under_way() {
    let fake = Fake::with(&[], 0);
    let (mut fetcher, _held, _consumed, _stop) = fetcher(&fake);
    fetcher.state.outstanding.store(1, Ordering::SeqCst);
    let state = fetcher.state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(300)).await;
        state.outstanding.fetch_sub(1, Ordering::SeqCst);
    });
    let start = Instant::now();
    assert!(fetcher.reconcile().await);
    assert!(
        (ms(300)..=ms(310)).contains(&start.elapsed()),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn reconcile_gives_up_waiting_for_an_answer_that_never_comes() {
    let fake = Fake::with(&[], 0);
    let (mut fetcher, _held, _consumed, _stop) = fetcher(&fake);
    fetcher.state.outstanding.store(1, Ordering::SeqCst);
    let start = Instant::now();
    assert!(fetcher.reconcile().await);
    assert!((QUIET_WAIT..=QUIET_WAIT + ms(10)).contains(&start.elapsed()));
}

#[tokio::test(start_paused = true)]
async fn reconcile_returns_orphans_but_not_what_the_worker_holds() {
    let fake = Fake::with(&["running", "orphan"], 0);
    let (mut fetcher, held, _consumed, _stop) = fetcher(&fake);
    let taken = fake.take(2);
    held.start(&taken[0]);
    assert!(fetcher.reconcile().await);
    let lists = crate::lock(&fake.0);
    assert_eq!(
        lists
            .queued
            .iter()
            .map(|d| d.raw.clone())
            .collect::<Vec<_>>(),
        [b"orphan".to_vec()]
    );
    assert_eq!(
        lists.in_flight.len(),
        1,
        "the running message stays in flight"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_the_wakers_take_count_as_reserved_until_started() {
    let fake = Fake::with(&[], 0);
    let (mut fetcher, held, _consumed, _stop) = fetcher(&fake);
    let producer = fake.push_after(ms(2500), &["m1", "m2", "m3"]);
    let got = fetcher.next(1).await.expect("a message");
    assert_eq!(got.raw, b"m1");
    // Every queue list has a waker, and each took one message when its blocking fetch ended:
    // what the worker cannot start yet is reserved (seen by the autoscaler and `inspect
    // reserved`), not hidden between a waker and the fetcher.
    assert_eq!(crate::lock(&fake.0).queued.len(), 0);
    assert_eq!(
        held.reserved()
            .iter()
            .map(|d| d.raw.clone())
            .collect::<Vec<_>>(),
        [b"m2".to_vec(), b"m3".to_vec()]
    );
    producer.await.expect("producer");
}

#[tokio::test(start_paused = true)]
async fn a_waker_takes_one_message_per_round_of_arming() {
    let fake = Fake::with(&["m1", "m2"], 0);
    let held = Arc::new(Held::default());
    let (_consumed, consumed) = watch::channel(vec!["celery".to_owned()]);
    let (arm, armed) = watch::channel(Some(1));
    let (_stop, stopping) = crate::shutdown::flag();
    let context = WakerContext {
        queues: fake.clone(),
        state: Arc::new(FetchState::default()),
        health: Arc::new(Health::default()),
        consumed,
        held: held.clone(),
    };
    let waker = tokio::spawn(waker(context, "celery".into(), armed, stopping));
    tokio::time::sleep(BLOCK_TIMEOUT * 10).await;
    assert_eq!(held.reserved_count(), 1, "one message in the first round");
    assert_eq!(crate::lock(&fake.0).queued.len(), 1);
    arm.send_replace(Some(2));
    tokio::time::sleep(BLOCK_TIMEOUT * 2).await;
    assert_eq!(held.reserved_count(), 2, "the next in the next round");
    waker.abort();
}
