//! Taking messages: a non-blocking Lua fetch takes messages in kombu's priority order into the
//! in-flight lists; when the queues are empty, one waker per queue list blocks on `BLMOVE`
//! (which also moves atomically), so an idle worker answers a new task at once without
//! polling. A waker takes at most one message each time the fetcher arms the wakers, and what
//! it takes counts as reserved at once (autoscale demand, `inspect reserved`, the gauges).
//! After a fetch whose answer was lost, the in-flight lists are reconciled before the next
//! fetch. And the delayed set's due messages are moved back onto their queues.
//!
//! The fetcher reaches Redis through [`Queues`], so its timing rules are tested with tokio's
//! paused clock and a stand-in.

use super::health::Health;
use super::held::Held;
use crate::redis::broker::{BLOCK_TIMEOUT, BlockingConnection};
use crate::redis::keys::{queue_of, source_keys};
use crate::redis::recovery::Registration;
use crate::redis::{Broker, Delivery, RedisError, backoff};
use crate::shutdown::{Stopping, is_stopping, stopped};
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long a reconciliation waits at most for blocking fetches under way to be answered.
const QUIET_WAIT: Duration = Duration::from_secs(BLOCK_TIMEOUT.as_secs() * 3 + 10);

/// What the fetcher needs of Redis: the broker and this worker's registry entry, or a
/// stand-in.
pub(super) trait Queues: Clone + Send + Sync + 'static {
    type Blocking: Send;
    /// Takes up to `max` messages from `keys`, in order, without waiting.
    fn fetch(
        &self,
        keys: &[String],
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>, RedisError>> + Send;
    /// A connection of its own for blocking fetches.
    fn blocking_connection(
        &self,
    ) -> impl Future<Output = Result<Self::Blocking, RedisError>> + Send;
    /// Waits a while for a message on `key`.
    fn blocking_fetch<'a>(
        &'a self,
        conn: &'a mut Self::Blocking,
        key: &'a str,
    ) -> impl Future<Output = Result<Option<Delivery>, RedisError>> + Send + 'a;
    /// Every message in this worker's in-flight lists.
    fn in_flight(&self) -> impl Future<Output = Result<Vec<Delivery>, RedisError>> + Send;
    /// Puts a message back at the consuming end of its list.
    fn requeue(&self, delivery: &Delivery)
    -> impl Future<Output = Result<bool, RedisError>> + Send;
}

/// The broker, with the registry entry naming this worker's in-flight lists.
#[derive(Clone)]
pub(super) struct Lists {
    pub broker: Broker,
    pub registration: Arc<Registration>,
}

impl Queues for Lists {
    type Blocking = BlockingConnection;

    fn fetch(
        &self,
        keys: &[String],
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>, RedisError>> + Send {
        self.broker.fetch(keys, max)
    }

    fn blocking_connection(
        &self,
    ) -> impl Future<Output = Result<BlockingConnection, RedisError>> + Send {
        self.broker.blocking_connection()
    }

    fn blocking_fetch<'a>(
        &'a self,
        conn: &'a mut BlockingConnection,
        key: &'a str,
    ) -> impl Future<Output = Result<Option<Delivery>, RedisError>> + Send + 'a {
        self.broker.blocking_fetch(conn, key)
    }

    async fn in_flight(&self) -> Result<Vec<Delivery>, RedisError> {
        let sources = self.registration.sources().await;
        self.broker.in_flight(&sources).await
    }

    fn requeue(
        &self,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<bool, RedisError>> + Send {
        self.broker.requeue(delivery)
    }
}

/// What the fetcher and its wakers share.
#[derive(Default)]
struct FetchState {
    /// Blocking fetches sent to Redis and not answered yet.
    outstanding: AtomicUsize,
    /// A fetch failed after it may have moved messages: its answer, naming them, was lost (a
    /// killed connection, say), so messages may sit in the in-flight lists with nobody
    /// handling them until the lists are reconciled.
    lost_reply: AtomicBool,
    /// A waker put a message among the reserved ones.
    delivered: Notify,
}

/// Whether the wakers may block on their lists: `Some(round)` while the fetcher waits on them
/// (a new round each time), `None` otherwise. A waker that brought a message in a round waits
/// for the next one, so a worker whose slots are all busy does not go on taking messages.
type Arming = Option<u64>;

/// What a waker works with.
struct WakerContext<Q> {
    queues: Q,
    state: Arc<FetchState>,
    health: Arc<Health>,
    consumed: watch::Receiver<Vec<String>>,
    held: Arc<Held>,
}

/// Takes messages: first from what the wakers already moved, then the Lua fetch, then (when
/// every queue is empty) by arming the wakers and waiting. The queues consumed can change at
/// run time (`add_consumer`, `cancel_consumer`): the keys are recomputed then, and a waker is
/// started for every key that never had one.
pub(super) struct Fetcher<Q: Queues> {
    queues: Q,
    held: Arc<Held>,
    health: Arc<Health>,
    keys: Vec<String>,
    consumed: watch::Receiver<Vec<String>>,
    armed: watch::Sender<Arming>,
    round: u64,
    wakers: JoinSet<()>,
    waking: HashSet<String>,
    state: Arc<FetchState>,
    stop: Stopping,
}

impl<Q: Queues> Fetcher<Q> {
    pub(super) fn start(
        queues: Q,
        held: Arc<Held>,
        health: Arc<Health>,
        consumed: watch::Receiver<Vec<String>>,
        stop: Stopping,
    ) -> Self {
        let mut fetcher = Self {
            queues,
            held,
            health,
            keys: Vec::new(),
            consumed,
            armed: watch::channel(None).0,
            round: 0,
            wakers: JoinSet::new(),
            waking: HashSet::new(),
            state: Arc::new(FetchState::default()),
            stop,
        };
        fetcher.follow_queues();
        fetcher
    }

    /// Takes up the queues consumed now.
    fn follow_queues(&mut self) {
        self.keys = source_keys(&self.consumed.borrow_and_update());
        for key in &self.keys {
            if self.waking.insert(key.clone()) {
                let context = WakerContext {
                    queues: self.queues.clone(),
                    state: self.state.clone(),
                    health: self.health.clone(),
                    consumed: self.consumed.clone(),
                    held: self.held.clone(),
                };
                self.wakers.spawn(waker(
                    context,
                    key.clone(),
                    self.armed.subscribe(),
                    self.stop.clone(),
                ));
            }
        }
    }

    /// The next message, or none once a stop is asked for; `room` is how many could start now.
    pub(super) async fn next(&mut self, room: usize) -> Option<Delivery> {
        let mut failures = 0u32;
        loop {
            if is_stopping(&self.stop) {
                return None;
            }
            if self.state.lost_reply.load(Ordering::SeqCst) && !self.reconcile().await {
                failures += 1;
                if !self.pause(backoff(failures)).await {
                    return None;
                }
                continue;
            }
            if self.consumed.has_changed().unwrap_or(false) {
                self.follow_queues();
            }
            if let Some(d) = crate::lock(&self.held.reserved).pop_front() {
                return Some(d);
            }
            match self.queues.fetch(&self.keys, room).await {
                Ok(fetched) => {
                    failures = 0;
                    self.health.fetched();
                    if !fetched.is_empty() {
                        crate::lock(&self.held.reserved).extend(fetched);
                    } else {
                        self.wait_for_wakers().await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.state.lost_reply.store(true, Ordering::SeqCst);
                    let pause = backoff(failures);
                    tracing::error!("fetching from the broker failed (retrying in {pause:?}): {e}");
                    if !self.pause(pause).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Every queue was empty: arms the wakers and waits for one to bring a message (among the
    /// reserved ones), for the consumed queues to change, or for a stop.
    async fn wait_for_wakers(&mut self) {
        self.round += 1;
        self.armed.send_replace(Some(self.round));
        let changed = tokio::select! {
            () = self.state.delivered.notified() => false,
            _ = self.consumed.changed() => true,
            () = stopped(&mut self.stop) => false,
        };
        self.armed.send_replace(None);
        if changed {
            // The queues changed: follow them, then fetch from the new set.
            self.follow_queues();
        }
    }

    /// Waits `pause`; false if a stop came first.
    async fn pause(&mut self, pause: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = stopped(&mut self.stop) => false,
        }
    }

    /// After a lost fetch answer: once no fetch is under way (or [`QUIET_WAIT`] has passed),
    /// returns every message of this worker's in-flight lists that it is not handling to its
    /// queue. True once done.
    async fn reconcile(&mut self) -> bool {
        self.armed.send_replace(None);
        let quiet_by = Instant::now() + QUIET_WAIT;
        while self.state.outstanding.load(Ordering::SeqCst) > 0 && Instant::now() < quiet_by {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let known = self.held.raw_messages();
        let held = match self.queues.in_flight().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!("cannot read the in-flight lists to reconcile them: {e}");
                return false;
            }
        };
        let mut returned = 0;
        for orphan in held.iter().filter(|d| !known.contains(&d.raw)) {
            if let Err(e) = self.queues.requeue(orphan).await {
                tracing::warn!(
                    "cannot return an orphaned message to {}: {e}",
                    orphan.source
                );
                return false;
            }
            returned += 1;
        }
        if returned > 0 {
            tracing::warn!(
                returned,
                "a fetch answer was lost with its connection: the messages it moved went back to their queues"
            );
        }
        self.state.lost_reply.store(false, Ordering::SeqCst);
        true
    }

    /// Stops the wakers and returns what was fetched but not started.
    pub(super) async fn stop(mut self) -> Vec<Delivery> {
        self.armed.send_replace(None);
        while self.wakers.join_next().await.is_some() {}
        crate::lock(&self.held.reserved).drain(..).collect()
    }
}

/// Blocks on one queue list while armed, handing what it moves to the fetcher: at most one
/// message per round of arming.
async fn waker<Q: Queues>(
    mut context: WakerContext<Q>,
    key: String,
    mut armed: watch::Receiver<Arming>,
    mut stop: Stopping,
) {
    let queue = queue_of(&key).to_owned();
    let mut conn = None;
    let mut failures = 0u32;
    let mut served = 0;
    loop {
        let round = tokio::select! {
            r = armed.wait_for(|a| a.is_some_and(|round| round > served)) => match r {
                Ok(a) => (*a).unwrap_or(served),
                Err(_) => return,
            },
            () = stopped(&mut stop) => return,
        };
        if is_stopping(&stop) {
            return;
        }
        // A queue no longer consumed (cancel_consumer): wait until it is again.
        if !context.consumed.borrow_and_update().contains(&queue) {
            tokio::select! {
                r = context.consumed.changed() => if r.is_err() { return },
                () = stopped(&mut stop) => return,
            }
            continue;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match context.queues.blocking_connection().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(queue = %key, "cannot open a blocking connection: {e}");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            },
        };
        match wake_once(&context, c, &key).await {
            Ok(brought) => {
                failures = 0;
                if brought {
                    served = round;
                }
            }
            Err(e) => {
                failures += 1;
                conn = None;
                tracing::warn!(queue = %key, "blocking fetch failed: {e}");
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

/// One blocking fetch on `key`, its message put among the reserved ones and the fetcher told.
/// True if it brought one.
async fn wake_once<Q: Queues>(
    context: &WakerContext<Q>,
    conn: &mut Q::Blocking,
    key: &str,
) -> Result<bool, RedisError> {
    let state = &context.state;
    state.outstanding.fetch_add(1, Ordering::SeqCst);
    let fetched = context.queues.blocking_fetch(conn, key).await;
    if fetched.is_err() {
        state.lost_reply.store(true, Ordering::SeqCst);
    } else {
        context.health.fetched();
    }
    let delivery = match fetched {
        Ok(Some(delivery)) => delivery,
        other => {
            state.outstanding.fetch_sub(1, Ordering::SeqCst);
            return other.map(|_| false);
        }
    };
    // Reserved before it stops counting as outstanding, so a reconciliation knows it.
    crate::lock(&context.held.reserved).push_back(delivery);
    state.outstanding.fetch_sub(1, Ordering::SeqCst);
    state.delivered.notify_one();
    Ok(true)
}

/// Moves due messages from the delayed set to their queues until `stop`, waking when the next
/// is due or when `scheduled` says a message was just postponed.
pub(super) async fn move_due_messages(broker: Broker, scheduled: Arc<Notify>, mut stop: Stopping) {
    loop {
        let now = crate::clock::now_ms();
        let wait = match broker.move_due(now).await {
            Ok((moved, next)) => {
                if moved > 0 {
                    tracing::debug!(moved, "moved due messages to their queues");
                }
                next.map_or(1_000, |due| (due - now).clamp(0, 1_000))
            }
            Err(e) => {
                tracing::warn!("moving due messages failed: {e}");
                1_000
            }
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))) => {}
            () = scheduled.notified() => {}
            () = stopped(&mut stop) => return,
        }
    }
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
