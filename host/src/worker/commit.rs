//! Group commit of task outcomes: a task's final state is stored (and published) and its
//! message removed from the in-flight list by one writer that batches whatever tasks finished
//! meanwhile into one script call for the states and one pipeline for the acknowledgements
//! (`redis::settle` writes a batch).
//!
//! Under load a batch holds many tasks, so the per-task Redis work costs a fraction of a round
//! trip and of a system call; when idle a batch holds one task and adds nothing but a channel
//! hop. Order and safety are those of settling one task at a time: every state in a batch is
//! stored before any of its messages is acknowledged (a step of its own, so a state Redis
//! refuses fails the batch before anything is acknowledged), and a failed batch is retried whole (storing a state twice and removing an absent message
//! are both harmless), so a task is never acknowledged without its state. A batch that fails
//! with an error retrying cannot cure (one task's key holding another type) is written task by
//! task, and the task that still fails has its message dead-lettered with the reason: one
//! task's keys never stall the others' outcomes. A follow-up whose queue key holds another
//! type is dead-lettered alone: Redis ran the rest of its batch, which is not written again
//! (a callback beside it would otherwise go out twice).

use super::dead_letters::DeadLetters;
use crate::protocol::TaskMessage;
use crate::redis::deadletter;
use crate::redis::settle::{Finished, Outgoing, Stores, Unpushed};
use crate::redis::{Delivery, RedisError, retrying};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The most tasks one batch carries.
const MAX_BATCH: usize = 256;

/// One task to settle.
pub struct Job {
    task_id: String,
    /// The task's final state document, unless the producer ignores results.
    document: Option<String>,
    delivery: Delivery,
    /// What follows the task in its canvas, published with the acknowledgement.
    publish: Vec<Outgoing>,
    done: oneshot::Sender<()>,
}

/// Where batches are written: Redis, or a test's stand-in.
pub trait Sink: Send + Sync + 'static {
    /// Writes one batch: every state, then every acknowledgement; the follow-ups Redis
    /// refused for good while writing the rest.
    fn write(
        &self,
        batch: &[Job],
    ) -> impl Future<Output = Result<Vec<Unpushed>, RedisError>> + Send;
    /// Moves a job's message to the dead-letter list, saying `reason`.
    fn dead_letter(
        &self,
        job: &Job,
        reason: &str,
    ) -> impl Future<Output = Result<bool, RedisError>> + Send;
    /// Adds a follow-up whose queue key refused it to the dead-letter list.
    fn dead_letter_follow_up(
        &self,
        message: &Outgoing,
    ) -> impl Future<Output = Result<(), RedisError>> + Send;
}

/// The worker's sink: its broker and backend, and its dead-letter list.
pub struct RedisSink {
    pub stores: Stores,
    pub dead_letters: DeadLetters,
}

impl Sink for RedisSink {
    async fn write(&self, batch: &[Job]) -> Result<Vec<Unpushed>, RedisError> {
        let finished: Vec<Finished<'_>> = batch
            .iter()
            .map(|job| Finished {
                state: job
                    .document
                    .as_deref()
                    .map(|doc| (job.task_id.as_str(), doc)),
                delivery: &job.delivery,
                publish: &job.publish,
            })
            .collect();
        self.stores.write(&finished).await
    }

    async fn dead_letter(&self, job: &Job, reason: &str) -> Result<bool, RedisError> {
        let task = TaskMessage::decode(&job.delivery.raw).ok().map(|m| m.task);
        self.dead_letters
            .message(&job.delivery, reason, Some(&job.task_id), task.as_deref())
            .await
    }

    async fn dead_letter_follow_up(&self, message: &Outgoing) -> Result<(), RedisError> {
        self.dead_letters.unpushed(message).await
    }
}

/// The handle tasks settle through; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct Settler {
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs handed over and not yet written: a task aborted while it waits for its job (the
    /// shutdown grace ran out) leaves its job here, still to be written.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Settler {
    /// Starts the writer on `sink`.
    pub fn start(sink: impl Sink) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let pending = Arc::new(tokio::sync::watch::Sender::new(0));
        tokio::spawn(write(queue, sink, pending.clone()));
        Self { jobs, pending }
    }

    /// Waits until every job handed over so far is written, for at most `within`; whether
    /// they were. Before a stop returns unfinished messages to their queues: a task whose
    /// outcome is being written is finished, and must not be returned to run again.
    pub async fn flush(&self, within: std::time::Duration) -> bool {
        let mut pending = self.pending.subscribe();
        tokio::time::timeout(within, pending.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stores task `task_id`'s `document` if any, then publishes `publish` and acknowledges
    /// `delivery`; returns once all are done. Redis being away delays this, never drops it.
    pub async fn settle(
        &self,
        task_id: &str,
        document: Option<String>,
        delivery: &Delivery,
        publish: Vec<Outgoing>,
    ) {
        let (done, finished) = oneshot::channel();
        let job = Job {
            task_id: task_id.to_owned(),
            document,
            delivery: delivery.clone(),
            publish,
            done,
        };
        self.pending.send_modify(|n| *n += 1);
        if self.jobs.send(job).is_ok() {
            let _ = finished.await;
        } else {
            self.pending.send_modify(|n| *n -= 1);
        }
    }
}

async fn write(
    mut queue: mpsc::UnboundedReceiver<Job>,
    sink: impl Sink,
    pending: Arc<tokio::sync::watch::Sender<usize>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match retrying("settle finished tasks", || sink.write(&batch)).await {
            Ok(unpushed) => dead_letter_unpushed(&sink, &batch, &unpushed).await,
            Err(e) => {
                tracing::warn!(
                    "settling a batch of finished tasks failed ({e}): settling them one by one"
                );
                for job in &batch {
                    settle_alone(&sink, job).await;
                }
            }
        }
        let written = batch.len();
        for job in batch.drain(..) {
            let _ = job.done.send(());
        }
        pending.send_modify(|n| *n = n.saturating_sub(written));
    }
}

/// Settles one job of a batch that failed for good; if the job itself fails for good, its
/// message goes to the dead-letter list with the reason — unless Redis refused it to the ACL
/// user (which stops the worker): then it stays in flight for recovery.
async fn settle_alone(sink: &impl Sink, job: &Job) {
    let alone = std::slice::from_ref(job);
    let e = match retrying("settle a finished task", || sink.write(alone)).await {
        Ok(unpushed) => return dead_letter_unpushed(sink, alone, &unpushed).await,
        Err(e) => e,
    };
    if e.refusal().is_some() {
        tracing::error!(task_id = %job.task_id, "cannot settle the task, its message stays in flight: {e}");
        return;
    }
    let reason = format!("cannot settle the task: {e}");
    tracing::error!(task_id = %job.task_id, "{reason}; its message is dead-lettered");
    if let Err(e) = retrying("dead-letter a message", || sink.dead_letter(job, &reason)).await {
        tracing::error!(task_id = %job.task_id, "cannot dead-letter it either ({e}): it stays in flight");
    }
}

/// Dead-letters each follow-up of `batch` that Redis refused for good, with the reason.
async fn dead_letter_unpushed(sink: &impl Sink, batch: &[Job], unpushed: &[Unpushed]) {
    for refused in unpushed {
        let Some(job) = batch.get(refused.job) else {
            continue;
        };
        let Some(message) = job.publish.get(refused.message) else {
            continue;
        };
        let reason = deadletter::unpushed_reason(&message.key);
        tracing::error!(task_id = %job.task_id, queue = %message.key, "{reason}: a follow-up of the task, dead-lettered");
        let step = "dead-letter a follow-up";
        if let Err(e) = retrying(step, || sink.dead_letter_follow_up(message)).await {
            tracing::error!(task_id = %job.task_id, "cannot dead-letter it either ({e}): it is lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::time::Instant;

    /// Records each batch's size and when it was written; fails the first `failures` writes;
    /// takes `takes` to write; fails for good any batch holding the delivery `poison`.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<(usize, Duration)>>>,
        failures: Arc<Mutex<u32>>,
        takes: Duration,
        poison: Option<u8>,
        /// Follow-ups whose queue key refuses them, as Redis does one holding a string.
        refused_queue: Option<&'static str>,
        dead: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl Sink for Recorder {
        async fn write(&self, batch: &[Job]) -> Result<Vec<Unpushed>, RedisError> {
            let start = Instant::now();
            tokio::time::sleep(self.takes).await;
            let mut failures = crate::lock(&self.failures);
            if *failures > 0 {
                *failures -= 1;
                return Err(RedisError::Connect {
                    url: "redis://test".into(),
                    reason: "down".into(),
                });
            }
            if batch.iter().any(|j| Some(j.delivery.raw[0]) == self.poison) {
                return Err(RedisError::wrong_type());
            }
            crate::lock(&self.batches).push((batch.len(), start.elapsed()));
            let refused = |message: &Outgoing| Some(message.key.as_str()) == self.refused_queue;
            Ok(batch
                .iter()
                .enumerate()
                .flat_map(|(j, job)| {
                    job.publish
                        .iter()
                        .enumerate()
                        .filter(move |(_, m)| refused(m))
                        .map(move |(m, _)| Unpushed { job: j, message: m })
                })
                .collect())
        }

        async fn dead_letter(&self, job: &Job, reason: &str) -> Result<bool, RedisError> {
            crate::lock(&self.dead).push((job.task_id.clone(), reason.to_owned()));
            Ok(true)
        }

        async fn dead_letter_follow_up(&self, message: &Outgoing) -> Result<(), RedisError> {
            let reason = deadletter::unpushed_reason(&message.key);
            crate::lock(&self.dead).push((message.key.clone(), reason));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flush_waits_for_the_job_of_a_task_aborted_while_it_was_written() {
        let sink = Recorder {
            takes: Duration::from_millis(50),
            ..Recorder::default()
        };
        let settler = Settler::start(sink.clone());
        let aborted = {
            let settler = settler.clone();
            tokio::spawn(async move {
                settler.settle("t", None, &delivery(1), Vec::new()).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        aborted.abort();
        assert!(crate::lock(&sink.batches).is_empty(), "still being written");
        assert!(settler.flush(Duration::from_secs(1)).await);
        assert_eq!(
            crate::lock(&sink.batches).len(),
            1,
            "written before flush returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_follow_up_is_dead_lettered_alone_and_its_batch_is_not_written_again() {
        let sink = Recorder {
            refused_queue: Some("a-string"),
            ..Recorder::default()
        };
        let settler = Settler::start(sink.clone());
        let follow_up = |key: &str| Outgoing {
            key: key.into(),
            raw: b"{}".to_vec(),
        };
        let publish = vec![follow_up("celery"), follow_up("a-string")];
        settler.settle("t", None, &delivery(1), publish).await;
        assert_eq!(crate::lock(&sink.batches).len(), 1, "written once");
        let dead = crate::lock(&sink.dead).clone();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].0, "a-string");
        assert!(dead[0].1.contains("WRONGTYPE"), "{dead:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_whose_keys_fail_for_good_is_dead_lettered_and_the_rest_settle() {
        let sink = Recorder {
            takes: Duration::from_millis(10),
            poison: Some(2),
            ..Recorder::default()
        };
        let settler = Settler::start(sink.clone());
        let tasks: Vec<_> = (0..4u8)
            .map(|n| {
                let settler = settler.clone();
                tokio::spawn(async move {
                    let id = n.to_string();
                    settler.settle(&id, None, &delivery(n), Vec::new()).await;
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("settle returns");
        }
        let written: usize = crate::lock(&sink.batches).iter().map(|(n, _)| *n).sum();
        assert_eq!(written, 3, "every other task settled");
        let dead = crate::lock(&sink.dead).clone();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].0, "2");
        assert!(dead[0].1.contains("WRONGTYPE"), "{dead:?}");
    }

    fn delivery(n: u8) -> Delivery {
        Delivery {
            raw: vec![n],
            source: "celery".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_is_retried_with_backoff_before_settle_returns() {
        let sink = Recorder {
            failures: Arc::new(Mutex::new(2)),
            ..Recorder::default()
        };
        let settler = Settler::start(sink.clone());
        let start = Instant::now();
        settler.settle("t", None, &delivery(1), Vec::new()).await;
        // Two failures: 200 ms then 400 ms of backoff, then the write that lands.
        assert_eq!(start.elapsed(), Duration::from_millis(600));
        assert_eq!(crate::lock(&sink.batches).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_finishing_during_a_write_go_out_together_in_the_next_batch() {
        let sink = Recorder {
            takes: Duration::from_millis(10),
            ..Recorder::default()
        };
        let settler = Settler::start(sink.clone());
        let first = {
            let settler = settler.clone();
            tokio::spawn(async move { settler.settle("t", None, &delivery(0), Vec::new()).await })
        };
        // The first batch is being written (it takes 10 ms): three more finish meanwhile.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = (1..4)
            .map(|n| {
                let settler = settler.clone();
                tokio::spawn(
                    async move { settler.settle("t", None, &delivery(n), Vec::new()).await },
                )
            })
            .collect();
        first.await.expect("first settle");
        for task in rest {
            task.await.expect("settle");
        }
        let sizes: Vec<usize> = crate::lock(&sink.batches).iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, [1, 3]);
    }
}
