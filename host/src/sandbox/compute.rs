//! The threads guest code runs on, apart from the worker's own I/O, and when a task moves there.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

/// The threads guest code runs on: a runtime of their own, so a guest that computes (even one
/// that yields at every epoch tick) never delays the worker's own Redis I/O, which runs on the
/// caller's runtime. Guests share these threads fairly by yielding at every epoch tick.
pub(super) struct Compute(Option<tokio::runtime::Runtime>);

impl Compute {
    /// One thread per core, or `TASKHOST_GUEST_THREADS`; 0 runs guests on the caller's
    /// runtime (one thread hop less per task, but a computing guest then shares the I/O
    /// threads).
    pub(super) fn new() -> std::io::Result<Self> {
        let threads = crate::config::threads::from_env("TASKHOST_GUEST_THREADS", 0);
        if threads == 0 {
            return Ok(Self(None));
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("taskhost-wasm")
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
    }

    /// Runs `future` on the guest threads; dropping the returned future cancels it.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
        impl<T> Drop for AbortOnDrop<T> {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let handle = match &self.0 {
            Some(rt) => rt.handle().spawn(future),
            None => tokio::spawn(future),
        };
        let mut guard = AbortOnDrop(handle);
        (&mut guard.0).await
    }
}

impl Compute {
    /// Runs `future` on the caller's thread until `computing` is set (the guest has used a
    /// whole epoch tick), then the rest of it on the guest threads. Most tasks finish in far
    /// less than a tick: they pay no hop to another thread and back, and a computing guest
    /// still leaves the worker's I/O within a tick.
    pub(super) async fn run_adaptive<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
        computing: Arc<AtomicBool>,
    ) -> Result<T, tokio::task::JoinError> {
        let mut future = Box::pin(future);
        let moves = self.0.is_some();
        let here = std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending if moves && computing.load(Ordering::Relaxed) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        match here.await {
            Some(done) => Ok(done),
            None => self.run(future).await,
        }
    }
}

impl Drop for Compute {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would block it; let its threads wind down.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Yield to the runtime at every epoch tick, so a busy guest cannot starve other tasks, and
/// set `computing`: a guest that reaches a tick moves to the guest threads. Through tokio's
/// yield_now, which wakes the task only after the scheduler has polled the I/O driver: a plain
/// yield puts the guest straight back in the run queue, and a spinning guest then delays every
/// socket event of its thread by tokio's event interval (61 polls, one tick each: 61 ms).
pub(super) fn yield_at_ticks(
    store: &mut wasmtime::Store<super::TaskState>,
    computing: Arc<AtomicBool>,
) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        computing.store(true, Ordering::Relaxed);
        Ok(wasmtime::UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    });
}
