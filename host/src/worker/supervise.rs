//! The worker's long-running loops (remote control, worker events, the heartbeat, the
//! delayed-set mover), supervised: one that panics, or ends while the worker is not stopping,
//! is logged and started again after a backoff, and while it is down `/healthz` names it.
//! Also the one way to turn a caught panic into words.

use crate::lock;
use crate::shutdown::Stopping;
use futures_util::FutureExt as _;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// Which supervised loops are down, and how often each was restarted.
#[derive(Debug, Default)]
pub struct Loops {
    /// Loop name → (down now, restarts so far).
    state: Mutex<BTreeMap<&'static str, (bool, u32)>>,
}

impl Loops {
    /// The loops that are down now, each with its restart count.
    pub fn down(&self) -> Vec<(&'static str, u32)> {
        lock(&self.state)
            .iter()
            .filter(|(_, (down, _))| *down)
            .map(|(name, (_, restarts))| (*name, *restarts))
            .collect()
    }

    fn set(&self, name: &'static str, down: bool, restarts: u32) {
        lock(&self.state).insert(name, (down, restarts));
    }
}

/// Runs the loop `make` builds until `stop`: whenever it panics or ends before the stop, says
/// so and starts a new one after [`crate::redis::backoff`].
pub fn spawn<F, Fut>(
    loops: Arc<Loops>,
    name: &'static str,
    mut stop: Stopping,
    mut make: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut restarts = 0u32;
        loop {
            loops.set(name, false, restarts);
            let ended = AssertUnwindSafe(make()).catch_unwind().await;
            if crate::shutdown::is_stopping(&stop) {
                return;
            }
            restarts = restarts.saturating_add(1);
            loops.set(name, true, restarts);
            let why = match ended {
                Ok(()) => "it ended".to_owned(),
                Err(panic) => format!("it panicked: {}", panic_text(panic.as_ref())),
            };
            tracing::error!(
                worker_loop = name,
                restarts,
                "a worker loop stopped ({why}); starting it again"
            );
            tokio::select! {
                () = tokio::time::sleep(crate::redis::backoff(restarts)) => {}
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    })
}

/// What a caught panic said.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_panics_is_started_again_and_reported_down_meanwhile() {
        let loops = Arc::new(Loops::default());
        let (stop_tx, stop) = crate::shutdown::flag();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handle = spawn(loops.clone(), "control", stop, move || {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    panic!("boom in the loop");
                }
                std::future::pending::<()>().await;
            }
        });
        // The first run panics at once; the second starts after the backoff (200 ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(loops.down(), [("control", 1)]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(loops.down().is_empty(), "running again");
        let _ = stop_tx.send(true);
        handle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_ending_at_the_stop_is_not_started_again() {
        let loops = Arc::new(Loops::default());
        let (stop_tx, stop) = crate::shutdown::flag();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let in_loop = stop.clone();
        let handle = spawn(loops.clone(), "mover", stop, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut watched = in_loop.clone();
            async move { crate::shutdown::stopped(&mut watched).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = stop_tx.send(true);
        handle.await.expect("the supervisor returns");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(loops.down().is_empty());
    }

    #[test]
    fn a_panics_text_is_its_message() {
        let caught = std::panic::catch_unwind(|| panic!("with {}", "words")).expect_err("panics");
        assert_eq!(panic_text(caught.as_ref()), "with words");
    }
}
