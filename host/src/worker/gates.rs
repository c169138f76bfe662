//! The gates a decoded task passes before it runs, in this order: not expired, not revoked,
//! due (its `eta`), served by a plugin, within its plugin's `max_instances`, within its rate
//! limit, within its fleet-wide rate limit (counted in Redis); then the time limits it runs
//! under. The checks that spend nothing come first; a rate token taken for a task a later gate
//! postpones is given back. Each gate lets the task through, or stops it: postponed (back to
//! the delayed set until a given time, never held in a slot) or settled without running
//! (revoked, or refused). Tasks over `max_instances` come back paced, one per interval per
//! instance, not all at once: a capped backlog never crowds the head of its queue.
//!
//! A new gate: a function returning `Result<_, Stop>` here, called from [`admit`] in its
//! place in the order.

use super::Shared;
use crate::clock::now_ms;
use crate::config::{Grants, Limits, Rate, TaskOverrides};
use crate::lock;
use crate::monitor::revocations::Revocations;
use crate::plugins::{Plugin, Registry, TaskSpec};
use crate::protocol::time::epoch_ms;
use crate::protocol::{RevokeReason, TaskMessage};
use crate::sandbox::TaskDefaults;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

/// How long a task over its plugin's `max_instances` waits before it is tried again.
const INSTANCE_RETRY: Duration = Duration::from_millis(200);

/// Why a task does not run now.
#[derive(Debug)]
pub(super) enum Stop {
    /// Not yet: back to the delayed set until `due_ms` (ms since the epoch).
    Postpone { due_ms: i64, wait: Wait },
    /// Never: it is settled REVOKED.
    Revoke(RevokeReason),
    /// Never: no plugin serves its name.
    NotRegistered,
}

/// What a postponed task waits for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wait {
    Eta,
    RateLimit(Duration),
    FleetRateLimit(Duration),
    MaxInstances,
    /// No instance of the pool was free when it was to start.
    PoolFull,
}

impl Wait {
    /// The step, as the log names it when Redis is slow to take it.
    /// Why, in a word: the trace's `taskhost.postponed.reason`.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Self::Eta => "eta",
            Self::RateLimit(_) => "rate_limit",
            Self::FleetRateLimit(_) => "fleet_rate_limit",
            Self::MaxInstances => "max_instances",
            Self::PoolFull => "pool_full",
        }
    }

    pub(super) fn step(self) -> &'static str {
        match self {
            Self::Eta => "schedule a message with an eta",
            Self::RateLimit(_) => "reschedule a task over its rate limit",
            Self::FleetRateLimit(_) => "reschedule a task over its fleet rate limit",
            Self::MaxInstances => "reschedule a task over its plugin's max_instances",
            Self::PoolFull => "reschedule a task that found the instance pool full",
        }
    }
}

/// A task through every gate: what runs it, with what grants, and under which time limits.
pub(super) struct Admitted<'a> {
    pub plugin: Arc<Plugin>,
    pub spec: TaskSpec,
    /// The plugin's grants as the task passed the gates: it runs under these, whatever a
    /// config reload changes meanwhile.
    pub grants: Arc<Grants>,
    /// Counts against the plugin's `max_instances` until dropped.
    pub _slot: InstanceSlot<'a>,
    /// (soft, hard).
    pub time_limits: (Option<Duration>, Option<Duration>),
}

/// When a task that found no instance free tries again.
fn instance_retry_due() -> i64 {
    now_ms().saturating_add(i64::try_from(INSTANCE_RETRY.as_millis()).unwrap_or(0))
}

/// What a task that found every instance of the pool in use does: waits its turn in the
/// delayed set.
pub(super) fn pool_full() -> Stop {
    Stop::Postpone {
        due_ms: instance_retry_due(),
        wait: Wait::PoolFull,
    }
}

/// Passes `message` through the gates, in order.
pub(super) async fn admit<'a>(
    shared: &'a Shared,
    message: &TaskMessage,
) -> Result<Admitted<'a>, Stop> {
    let now = crate::clock::now();
    expiry(message, now)?;
    revocation(&shared.revocations, message)?;
    eta(message, now)?;
    let (plugin, spec) = registration(&shared.plugins.registry(), message)?;
    let grants = shared.grants.load().for_plugin(&plugin.name);
    let slot = shared
        .gates
        .instance(&plugin.name, grants.limits.max_instances)?;
    shared.gates.rate_limit(&message.task, spec.rate)?;
    if let Err(stop) = fleet_rate_limit(shared, &message.task).await {
        shared.gates.rates.give_back(&message.task, spec.rate);
        return Err(stop);
    }
    let time_limits = shared
        .gates
        .time_limits(message, &grants.limits, &spec.defaults);
    Ok(Admitted {
        plugin,
        spec,
        grants,
        _slot: slot,
        time_limits,
    })
}

fn expiry(message: &TaskMessage, now: OffsetDateTime) -> Result<(), Stop> {
    match message.expires {
        Some(expires) if expires <= now => Err(Stop::Revoke(RevokeReason::Expired)),
        _ => Ok(()),
    }
}

fn revocation(revocations: &Revocations, message: &TaskMessage) -> Result<(), Stop> {
    if revocations.is_revoked(&message.id) {
        return Err(Stop::Revoke(RevokeReason::Revoked));
    }
    Ok(())
}

fn eta(message: &TaskMessage, now: OffsetDateTime) -> Result<(), Stop> {
    match message.eta {
        Some(eta) if eta > now => Err(Stop::Postpone {
            due_ms: epoch_ms(eta),
            wait: Wait::Eta,
        }),
        _ => Ok(()),
    }
}

/// The task's `fleet_rate_limit`, shared by every worker through Redis. A task over it is
/// postponed until the next start is allowed, plus up to one interval of jitter, so the
/// tasks waiting do not all come back at the same instant.
async fn fleet_rate_limit(shared: &Shared, task: &str) -> Result<(), Stop> {
    let Some(rate) = shared
        .config
        .task_overrides
        .get(task)
        .and_then(|o| o.fleet_rate_limit)
    else {
        return Ok(());
    };
    let interval = rate.interval();
    let what = "take a start under a fleet rate limit";
    let wait =
        crate::redis::retrying(what, || shared.broker.take_fleet_start(task, interval)).await;
    match wait {
        Ok(None) => Ok(()),
        // Refused for good (an ACL refusal stops the worker): the task waits one interval
        // rather than run over the limit.
        Err(e) => {
            tracing::error!(task, "cannot {what} (Redis refuses it for good): {e}");
            Err(Stop::Postpone {
                due_ms: now_ms()
                    .saturating_add(i64::try_from(interval.as_millis()).unwrap_or(i64::MAX)),
                wait: Wait::FleetRateLimit(interval),
            })
        }
        Ok(Some(wait)) => {
            let jitter = interval.min(wait).mul_f64(fastrand::f64());
            let wait = wait.saturating_add(jitter);
            Err(Stop::Postpone {
                due_ms: now_ms()
                    .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
                wait: Wait::FleetRateLimit(wait),
            })
        }
    }
}

fn registration(
    registry: &Registry,
    message: &TaskMessage,
) -> Result<(Arc<Plugin>, TaskSpec), Stop> {
    registry
        .resolve(&message.task)
        .map(|(plugin, spec)| (plugin.clone(), spec.clone()))
        .ok_or(Stop::NotRegistered)
}

/// (soft, hard) time limits in seconds, as remote control sets them; none lifts one.
type SetTimeLimits = (Option<f64>, Option<f64>);

/// What the gates remember between tasks: rate limits, time limits set by remote control, and
/// the instances running per plugin.
pub(super) struct Gates {
    pub rates: RateLimits,
    /// Time limits set by remote control, per task.
    set_time_limits: Mutex<HashMap<String, SetTimeLimits>>,
    /// Instances running per plugin, for its `max_instances`.
    instances: Mutex<HashMap<Arc<str>, u32>>,
    /// Per plugin, when the last task postponed over its `max_instances` comes back (ms since
    /// the epoch): the next comes back a step later.
    capped_until: Mutex<HashMap<Arc<str>, i64>>,
}

impl Gates {
    pub(super) fn new(overrides: &TaskOverrides) -> Self {
        Self {
            rates: RateLimits::new(overrides),
            set_time_limits: Mutex::new(HashMap::new()),
            instances: Mutex::new(HashMap::new()),
            capped_until: Mutex::new(HashMap::new()),
        }
    }

    fn rate_limit(&self, task: &str, declared: Option<Rate>) -> Result<(), Stop> {
        match self.rates.acquire(task, declared) {
            None => Ok(()),
            Some(wait) => Err(Stop::Postpone {
                due_ms: now_ms()
                    .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
                wait: Wait::RateLimit(wait),
            }),
        }
    }

    /// Takes one of `plugin`'s instances, if it runs fewer than `max` (none: no limit).
    fn instance(&self, plugin: &Arc<str>, max: Option<u32>) -> Result<InstanceSlot<'_>, Stop> {
        let mut counts = lock(&self.instances);
        let count = counts.entry(plugin.clone()).or_default();
        if let Some(max) = max.filter(|max| *count >= *max) {
            // It waits its turn in the delayed set, not in a worker slot, which tasks of other
            // plugins can use meanwhile.
            return Err(Stop::Postpone {
                due_ms: self.capped_due(plugin, max, now_ms()),
                wait: Wait::MaxInstances,
            });
        }
        *count += 1;
        Ok(InstanceSlot {
            gates: self,
            plugin: plugin.clone(),
        })
    }

    /// When a task of `plugin` over its `max` instances comes back: [`INSTANCE_RETRY`] from
    /// `now`, or a step of `INSTANCE_RETRY / max` after the last one postponed, whichever is
    /// later. A backlog of capped tasks so returns about as fast as `max` instances could take
    /// them, spread out, instead of every task at once every interval.
    fn capped_due(&self, plugin: &Arc<str>, max: u32, now: i64) -> i64 {
        let retry = i64::try_from(INSTANCE_RETRY.as_millis()).unwrap_or(i64::MAX);
        let step = (retry / i64::from(max.max(1))).max(1);
        let mut until = lock(&self.capped_until);
        let last = until.entry(plugin.clone()).or_insert(0);
        *last = (now + retry).max(*last + step);
        *last
    }

    /// Sets `task`'s time limits (remote control's `time_limit`); none lifts one.
    pub(super) fn set_time_limits(&self, task: &str, soft: Option<f64>, hard: Option<f64>) {
        lock(&self.set_time_limits).insert(task.to_owned(), (soft, hard));
    }

    /// The (soft, hard) limits `message` runs under: the producer's `timelimit`, else those
    /// set by remote control, else the operator's and the plugin's (see [`time_limits`]);
    /// never above the operator's, whoever asks (a limit of 0 or none included).
    fn time_limits(
        &self,
        message: &TaskMessage,
        granted: &Limits,
        declared: &TaskDefaults,
    ) -> (Option<Duration>, Option<Duration>) {
        let (mut soft, mut hard) = time_limits(message.time_limit, granted, declared);
        if let Some((set_soft, set_hard)) = lock(&self.set_time_limits).get(&message.task).copied()
        {
            if message.time_limit.0.is_none() {
                soft = set_soft.and_then(seconds);
            }
            if message.time_limit.1.is_none() {
                hard = set_hard.and_then(seconds);
            }
        }
        (
            at_most(soft, granted.soft_time_limit),
            at_most(hard, granted.time_limit),
        )
    }
}

/// One running instance of a plugin, counted against its `max_instances` until dropped.
pub(super) struct InstanceSlot<'a> {
    gates: &'a Gates,
    plugin: Arc<str>,
}

impl Drop for InstanceSlot<'_> {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.gates.instances).get_mut(&self.plugin) {
            *count = count.saturating_sub(1);
        }
    }
}

/// Seconds as a duration, if positive and representable.
fn seconds(s: f64) -> Option<Duration> {
    (s > 0.0)
        .then(|| Duration::try_from_secs_f64(s).ok())
        .flatten()
}

/// `limit`, no longer than the operator's `cap` (none: the cap).
fn at_most(limit: Option<Duration>, cap: Option<Duration>) -> Option<Duration> {
    match (limit, cap) {
        (Some(limit), Some(cap)) => Some(limit.min(cap)),
        (limit, cap) => limit.or(cap),
    }
}

/// A task's (soft, hard) time limits. The producer's `timelimit` wins (producers are trusted,
/// as in Celery); otherwise the plugin's declared limit applies, but only to tighten the
/// operator's (or the default) limit: a plugin cannot give itself more time than it was granted.
pub fn time_limits(
    requested: (Option<f64>, Option<f64>),
    granted: &Limits,
    declared: &TaskDefaults,
) -> (Option<Duration>, Option<Duration>) {
    let tighten = |granted: Option<Duration>, declared: Option<f64>| match (
        granted,
        declared.and_then(seconds),
    ) {
        (Some(g), Some(d)) => Some(g.min(d)),
        (g, d) => g.or(d),
    };
    let soft = requested
        .0
        .and_then(seconds)
        .or_else(|| tighten(granted.soft_time_limit, declared.soft_time_limit));
    let hard = requested
        .1
        .and_then(seconds)
        .or_else(|| tighten(granted.time_limit, declared.time_limit));
    (soft, hard)
}

/// Celery's per-worker task rate limits: a task over its rate waits, spaced `1/rate` apart as
/// Celery's token bucket of capacity one spaces them. The limit comes from remote control
/// (`celery control rate_limit`), else the operator's `[tasks."NAME"]`, else the plugin's
/// declared default (parsed when it loaded).
pub(super) struct RateLimits {
    /// From `[tasks."NAME"] rate_limit`.
    configured: HashMap<String, Rate>,
    /// Set by remote control; `None` lifts the limit.
    set: Mutex<HashMap<String, Option<Rate>>>,
    /// When each limited task may next start.
    next: Mutex<HashMap<String, Instant>>,
}

impl RateLimits {
    pub(super) fn new(overrides: &TaskOverrides) -> Self {
        Self {
            configured: overrides
                .iter()
                .filter_map(|(task, section)| Some((task.clone(), section.rate_limit?)))
                .collect(),
            set: Mutex::new(HashMap::new()),
            next: Mutex::new(HashMap::new()),
        }
    }

    /// Sets or (with `None`) lifts `task`'s limit at run time.
    pub(super) fn set(&self, task: &str, rate: Option<Rate>) {
        lock(&self.set).insert(task.to_owned(), rate);
        lock(&self.next).remove(task);
    }

    /// Gives back the start [`Self::acquire`] just took for `task`, whose run a later gate
    /// postponed.
    pub(super) fn give_back(&self, task: &str, declared: Option<Rate>) {
        let rate = match lock(&self.set).get(task) {
            Some(set) => *set,
            None => self.configured.get(task).copied().or(declared),
        };
        if let Some(rate) = rate
            && let Some(at) = lock(&self.next).get_mut(task)
            && let Some(earlier) = at.checked_sub(rate.interval())
        {
            *at = earlier;
        }
    }

    /// Takes a start for `task` now, or says how long to wait for one. `declared` is the
    /// plugin's default.
    pub(super) fn acquire(&self, task: &str, declared: Option<Rate>) -> Option<Duration> {
        let rate = match lock(&self.set).get(task) {
            Some(set) => *set,
            None => self.configured.get(task).copied().or(declared),
        }?;
        let now = Instant::now();
        let mut next = lock(&self.next);
        let at = next.entry(task.to_owned()).or_insert(now);
        if *at > now {
            return Some(*at - now);
        }
        // A rate too small to space within Instant's range: the next start is a year away.
        *at = now
            .checked_add(rate.interval())
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        None
    }
}

#[cfg(test)]
#[path = "gates_tests.rs"]
mod tests;
