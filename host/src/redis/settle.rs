//! Writing a batch of finished tasks (the worker's group commit): every state first, then every
//! acknowledgement with the messages that follow it in its canvas, so a task is never
//! acknowledged without its state, nor without what comes next.

use super::{Backend, Broker, Delivery, RedisError};
use std::time::{Duration, Instant};

/// One finished task of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The task's id and its result document, unless the producer ignores results.
    pub state: Option<(&'a str, &'a str)>,
    pub delivery: &'a Delivery,
    /// Messages published with the acknowledgement: the next chain step, callbacks, errbacks,
    /// a chord body.
    pub publish: &'a [Outgoing],
}

/// A message to publish as a task settles.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The queue list (with its priority bucket).
    pub key: String,
    pub raw: Vec<u8>,
}

/// The broker and the backend a worker settles into.
pub struct Stores {
    pub broker: Broker,
    pub backend: Backend,
    /// Replicas that must hold a batch's states before its messages are acknowledged
    /// (`[worker] wait_replicas`).
    pub wait_replicas: ReplicaWait,
}

/// How long a batch waits for its replicas before it is acknowledged anyway (and said so): a
/// replica that is down must not stop the worker.
pub const REPLICA_WAIT: Duration = Duration::from_secs(1);

/// After a batch whose replicas fell short, batches go on without waiting this long: a replica
/// that is down costs one wait per period, not one per batch.
const AFTER_SHORTFALL: Duration = Duration::from_secs(10);

/// `[worker] wait_replicas`: how many replicas, and until when waiting is off after a
/// shortfall.
#[derive(Debug, Default)]
pub struct ReplicaWait {
    replicas: u32,
    unwaited_until: std::sync::Mutex<Option<Instant>>,
}

impl ReplicaWait {
    /// Waiting for `replicas` replicas (0: never waiting).
    pub fn new(replicas: u32) -> Self {
        Self {
            replicas,
            unwaited_until: std::sync::Mutex::default(),
        }
    }

    fn unwaited(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.unwaited_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A follow-up of a written batch that Redis refused for good (its queue key holds another
/// type), while the rest of the batch was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpushed {
    /// The job of the batch, and the follow-up among its `publish`.
    pub job: usize,
    pub message: usize,
}

impl Stores {
    /// Writes `batch`; the follow-ups Redis refused for good, the rest being written. A failed
    /// write may be retried whole: nothing that is not idempotent ran (storing a state twice
    /// and removing an absent message are both harmless; a push runs only in the last step,
    /// which either is refused before it runs or runs whole but for the refused pushes).
    ///
    /// The states go first, in a step of their own: a state Redis refuses (its key holds a
    /// list) then fails the write before any message is acknowledged, where in one pipeline
    /// the acknowledgements after it would run anyway.
    pub async fn write(&self, batch: &[Finished<'_>]) -> Result<Vec<Unpushed>, RedisError> {
        let states: Vec<(&str, &str)> = batch.iter().filter_map(|job| job.state).collect();
        self.backend.store_all(&states).await?;
        self.replicated(batch.len()).await?;
        let mut acks = redis::pipe();
        // What follows a task goes out in one transaction with the acknowledgements: a push
        // Redis refuses (an ACL) then acknowledges nothing, instead of losing the next step.
        if batch.iter().any(|job| !job.publish.is_empty()) {
            acks.atomic();
        }
        // Which command of the pipeline pushes which follow-up.
        let mut pushes = Vec::new();
        for (j, job) in batch.iter().enumerate() {
            // In the same pipeline as the acknowledgement: sent before it, never without it
            // unless the connection drops between the two (then the task runs again).
            for (m, next) in job.publish.iter().enumerate() {
                pushes.push((acks.cmd_iter().count(), Unpushed { job: j, message: m }));
                acks.cmd("LPUSH").arg(&next.key).arg(&next.raw).ignore();
            }
            self.broker.add_ack(&mut acks, job.delivery);
        }
        match self.broker.run(&acks).await {
            Ok(()) => Ok(Vec::new()),
            // Redis runs every command of a transaction, and of a pipeline, whatever one of
            // them answers: refused pushes are all that was not written.
            Err(e) => match e.wrong_types() {
                Some(refused) if refused.iter().all(|i| pushes.iter().any(|(p, _)| p == i)) => {
                    Ok(pushes
                        .into_iter()
                        .filter(|(p, _)| refused.contains(p))
                        .map(|(_, unpushed)| unpushed)
                        .collect())
                }
                _ => Err(e),
            },
        }
    }

    /// With `wait_replicas`, waits until that many replicas hold the states written so far:
    /// an asynchronous replica promoted after the master dies then has every state whose
    /// message was acknowledged. Past [`REPLICA_WAIT`] the batch goes on, the log says so, and
    /// the next batches do not wait for [`AFTER_SHORTFALL`].
    async fn replicated(&self, tasks: usize) -> Result<(), RedisError> {
        let wanted = self.wait_replicas.replicas;
        if wanted == 0
            || self
                .wait_replicas
                .unwaited()
                .is_some_and(|t| Instant::now() < t)
        {
            return Ok(());
        }
        let held = self.backend.replicated(wanted, REPLICA_WAIT).await?;
        if held < wanted {
            *self.wait_replicas.unwaited() = Some(Instant::now() + AFTER_SHORTFALL);
            tracing::warn!(
                held,
                wanted,
                tasks,
                "fewer replicas than [worker] wait_replicas took a batch's states within \
                 {REPLICA_WAIT:?}: acknowledging it anyway, and not waiting for {AFTER_SHORTFALL:?}"
            );
        }
        Ok(())
    }
}
