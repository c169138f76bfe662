//! The worker's slots, resized: Celery's `--autoscale MAX,MIN` (once a second the slots follow
//! the demand: tasks running, messages held, messages waiting in the consumed queues; they grow
//! at once up to MAX and shrink towards MIN only after the demand stayed below them for the
//! keepalive), and remote control's `pool_grow` / `pool_shrink`, which resize the same way.

use super::{Pool, Shared};
use crate::config::Autoscale;
use crate::shutdown::{Stopping, stopped};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How often the autoscaler looks (Celery's autoscaler: every second).
const INTERVAL: Duration = Duration::from_secs(1);

impl Pool {
    /// Adds `delta` slots (takes them, if negative), at most up to `most` (the concurrency the
    /// worker was sized for) and never below one; returns the slots now. Taken slots go as
    /// running tasks free them.
    pub(super) fn resize(&self, most: usize, delta: i64) -> usize {
        if delta >= 0 {
            let wanted = usize::try_from(delta).unwrap_or(usize::MAX);
            let mut added = 0;
            let _ = self
                .concurrency
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    added = wanted.min(most.saturating_sub(c));
                    Some(c + added)
                });
            self.slots.add_permits(added);
            return self.concurrency.load(Ordering::Relaxed);
        }
        let wanted = usize::try_from(delta.unsigned_abs()).unwrap_or(usize::MAX);
        let mut taken = 0;
        let _ = self
            .concurrency
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                taken = wanted.min(c.saturating_sub(1));
                Some(c - taken)
            });
        if taken > 0 {
            let slots = self.slots.clone();
            tokio::spawn(async move {
                if let Ok(permits) = slots
                    .acquire_many_owned(u32::try_from(taken).unwrap_or(u32::MAX))
                    .await
                {
                    permits.forget();
                }
            });
        }
        self.concurrency.load(Ordering::Relaxed)
    }
}

/// The autoscaler's judgement: how many slots to add (or take, negative) given the `slots`
/// there are and the `demand` now. `low_since` is when the demand fell below the slots, kept
/// between calls.
pub(super) fn step(
    slots: usize,
    demand: usize,
    bounds: &Autoscale,
    low_since: &mut Option<Instant>,
    now: Instant,
) -> i64 {
    let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let up = demand.min(bounds.max);
    if up > slots {
        *low_since = None;
        return signed(up - slots);
    }
    let down = demand.max(bounds.min);
    if down >= slots {
        *low_since = None;
        return 0;
    }
    let since = *low_since.get_or_insert(now);
    if now.duration_since(since) < bounds.keepalive {
        return 0;
    }
    *low_since = None;
    -signed(slots - down)
}

/// Starts the autoscaler, supervised, if the worker autoscales.
pub(super) fn spawn(shared: &Arc<Shared>, stop: &Stopping) -> Option<tokio::task::JoinHandle<()>> {
    let bounds = shared.config.autoscale?;
    let (in_loop, shared) = (stop.clone(), shared.clone());
    Some(super::supervise::spawn(
        shared.monitor.loops.clone(),
        "autoscaler",
        stop.clone(),
        move || run(shared.clone(), bounds, in_loop.clone()),
    ))
}

/// Resizes the slots to the demand until a stop.
pub(super) async fn run(shared: Arc<Shared>, bounds: Autoscale, mut stop: Stopping) {
    let mut low_since = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
        let queues = shared.queues.borrow().clone();
        let waiting: u64 = match shared.broker.lengths(&queues).await {
            Ok((lengths, _, _)) => lengths.iter().sum(),
            Err(e) => {
                tracing::debug!("autoscaler cannot read the queue lengths: {e}");
                continue;
            }
        };
        let held = shared.pool.held.running_count() + shared.pool.held.reserved_count();
        let demand = held.saturating_add(usize::try_from(waiting).unwrap_or(usize::MAX));
        let slots = shared.pool.concurrency.load(Ordering::Relaxed);
        let delta = step(slots, demand, &bounds, &mut low_since, Instant::now());
        if delta != 0 {
            let now = shared.pool.resize(shared.config.concurrency, delta);
            tracing::info!(from = slots, to = now, demand, "autoscale: slots resized");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Autoscale = Autoscale {
        max: 8,
        min: 2,
        keepalive: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn grows_at_once_to_the_demand_up_to_max() {
        let mut low = None;
        assert_eq!(step(2, 5, &BOUNDS, &mut low, Instant::now()), 3);
        assert_eq!(step(2, 100, &BOUNDS, &mut low, Instant::now()), 6);
        assert_eq!(step(8, 100, &BOUNDS, &mut low, Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_to_the_demand_only_after_the_keepalive_and_never_below_min() {
        let mut low = None;
        assert_eq!(step(8, 0, &BOUNDS, &mut low, Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(step(8, 0, &BOUNDS, &mut low, Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(step(8, 0, &BOUNDS, &mut low, Instant::now()), -6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rise_in_demand_restarts_the_keepalive() {
        let mut low = None;
        assert_eq!(step(8, 3, &BOUNDS, &mut low, Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(step(8, 8, &BOUNDS, &mut low, Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            step(8, 3, &BOUNDS, &mut low, Instant::now()),
            0,
            "low again, anew"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(step(8, 3, &BOUNDS, &mut low, Instant::now()), -5);
    }
}
