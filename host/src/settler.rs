//! Group commit of task outcomes: a task's final state is stored (and published) and its
//! message removed from the in-flight list by one writer that batches whatever tasks finished
//! meanwhile into one pipeline per Redis connection.
//!
//! Under load a batch holds many tasks, so the per-task Redis work costs a fraction of a round
//! trip and of a system call; when idle a batch holds one task and adds nothing but a channel
//! hop. Order and safety are those of settling one task at a time: every state in a batch is
//! stored before any of its messages is acknowledged (in one pipeline when the broker and the
//! backend are the same Redis database, since Redis runs one connection's commands in order),
//! and a failed batch is retried whole (storing a state twice and removing an absent message
//! are both harmless), so a task is never acknowledged without its state.

use crate::broker::{Broker, Delivery};
use crate::results::Backend;
use tokio::sync::{mpsc, oneshot};

/// The most tasks one batch carries.
const MAX_BATCH: usize = 256;

/// One task to settle.
struct Job {
    /// The task's id and its final state document, unless the producer ignores results.
    state: Option<(String, String)>,
    /// Whether the state is a SUCCESS (stored unguarded; see [`Backend::add_success`]).
    success: bool,
    delivery: Delivery,
    done: oneshot::Sender<()>,
}

/// The handle tasks settle through; the writer stops when every handle is dropped.
#[derive(Clone)]
pub struct Settler {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Settler {
    /// Starts the writer. `same_database`: the broker and the backend are one Redis database,
    /// so a batch goes out as a single pipeline.
    pub fn start(broker: Broker, backend: Backend, same_database: bool) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(write(queue, broker, backend, same_database));
        Self { jobs }
    }

    /// Stores `state` (task id, document) if any, then acknowledges `delivery`; returns once
    /// both are done. Redis being away delays this, never drops it.
    pub async fn settle(
        &self,
        state: Option<(String, String)>,
        success: bool,
        delivery: &Delivery,
    ) {
        let (done, finished) = oneshot::channel();
        let job = Job {
            state,
            success,
            delivery: delivery.clone(),
            done,
        };
        if self.jobs.send(job).is_ok() {
            let _ = finished.await;
        }
    }
}

async fn write(
    mut queue: mpsc::UnboundedReceiver<Job>,
    broker: Broker,
    backend: Backend,
    same_database: bool,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        crate::worker::retrying("settle finished tasks", || {
            write_batch(&batch, &broker, &backend, same_database)
        })
        .await;
        for job in batch.drain(..) {
            let _ = job.done.send(());
        }
    }
}

async fn write_batch(
    batch: &[Job],
    broker: &Broker,
    backend: &Backend,
    same_database: bool,
) -> Result<(), crate::broker::BrokerError> {
    // States that must not replace a stored SUCCESS go through the guarded script, one by one;
    // they are failures and revocations, rare next to successes.
    for job in batch.iter().filter(|j| !j.success) {
        if let Some((id, doc)) = &job.state {
            backend.store(id, doc).await?;
        }
    }
    let mut states = redis::pipe();
    let mut stored = 0;
    for job in batch.iter().filter(|j| j.success) {
        if let Some((id, doc)) = &job.state {
            backend.add_success(&mut states, id, doc);
            stored += 1;
        }
    }
    let mut acks = if same_database {
        states
    } else {
        // Redis refuses an empty pipeline.
        if stored > 0 {
            backend.run(&states).await?;
        }
        redis::pipe()
    };
    for job in batch {
        broker.add_ack(&mut acks, &job.delivery);
    }
    broker.run(&acks).await
}
