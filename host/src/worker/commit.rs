//! Group commit of task outcomes: a task's final state is stored (and published) and its
//! message removed from the in-flight list by one writer that batches whatever tasks finished
//! meanwhile into one pipeline per Redis connection (`redis::settle` writes a batch).
//!
//! Under load a batch holds many tasks, so the per-task Redis work costs a fraction of a round
//! trip and of a system call; when idle a batch holds one task and adds nothing but a channel
//! hop. Order and safety are those of settling one task at a time: every state in a batch is
//! stored before any of its messages is acknowledged (in one pipeline when the broker and the
//! backend are the same Redis database, since Redis runs one connection's commands in order),
//! and a failed batch is retried whole (storing a state twice and removing an absent message
//! are both harmless), so a task is never acknowledged without its state.

use crate::redis::settle::{Finished, Outgoing, Stores};
use crate::redis::{Delivery, RedisError, retrying};
use std::future::Future;
use tokio::sync::{mpsc, oneshot};

/// The most tasks one batch carries.
const MAX_BATCH: usize = 256;

/// One task to settle.
pub struct Job {
    /// The task's id and its final state document, unless the producer ignores results.
    state: Option<(String, String)>,
    /// Whether the state is a SUCCESS (stored unguarded).
    success: bool,
    delivery: Delivery,
    /// What follows the task in its canvas, published with the acknowledgement.
    publish: Vec<Outgoing>,
    done: oneshot::Sender<()>,
}

/// Where batches are written: Redis, or a test's stand-in.
pub trait Sink: Send + Sync + 'static {
    /// Writes one batch: every state, then every acknowledgement.
    fn write(&self, batch: &[Job]) -> impl Future<Output = Result<(), RedisError>> + Send;
}

impl Sink for Stores {
    async fn write(&self, batch: &[Job]) -> Result<(), RedisError> {
        let finished: Vec<Finished<'_>> = batch
            .iter()
            .map(|job| Finished {
                state: job
                    .state
                    .as_ref()
                    .map(|(id, doc)| (id.as_str(), doc.as_str())),
                success: job.success,
                delivery: &job.delivery,
                publish: &job.publish,
            })
            .collect();
        Stores::write(self, &finished).await
    }
}

/// The handle tasks settle through; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct Settler {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Settler {
    /// Starts the writer on `sink`.
    pub fn start(sink: impl Sink) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(write(queue, sink));
        Self { jobs }
    }

    /// Stores `state` (task id, document) if any, then publishes `publish` and acknowledges
    /// `delivery`; returns once all are done. Redis being away delays this, never drops it.
    pub async fn settle(
        &self,
        state: Option<(String, String)>,
        success: bool,
        delivery: &Delivery,
        publish: Vec<Outgoing>,
    ) {
        let (done, finished) = oneshot::channel();
        let job = Job {
            state,
            success,
            delivery: delivery.clone(),
            publish,
            done,
        };
        if self.jobs.send(job).is_ok() {
            let _ = finished.await;
        }
    }
}

async fn write(mut queue: mpsc::UnboundedReceiver<Job>, sink: impl Sink) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        retrying("settle finished tasks", || sink.write(&batch)).await;
        for job in batch.drain(..) {
            let _ = job.done.send(());
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
    /// takes `takes` to write.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<(usize, Duration)>>>,
        failures: Arc<Mutex<u32>>,
        takes: Duration,
    }

    impl Sink for Recorder {
        async fn write(&self, batch: &[Job]) -> Result<(), RedisError> {
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
            crate::lock(&self.batches).push((batch.len(), start.elapsed()));
            Ok(())
        }
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
        settler.settle(None, true, &delivery(1), Vec::new()).await;
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
            tokio::spawn(async move { settler.settle(None, true, &delivery(0), Vec::new()).await })
        };
        // The first batch is being written (it takes 10 ms): three more finish meanwhile.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = (1..4)
            .map(|n| {
                let settler = settler.clone();
                tokio::spawn(
                    async move { settler.settle(None, true, &delivery(n), Vec::new()).await },
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
