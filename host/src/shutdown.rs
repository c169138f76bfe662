//! The stop flag: one `watch` channel every long-running loop of a worker selects on, so a stop
//! is seen between steps and never cancels a step (a Redis call that moves messages) half-way.

use tokio::sync::watch;

/// The sending side, turned to true once to ask every loop to stop.
pub type Stop = watch::Sender<bool>;

/// A loop's view of the stop flag.
pub type Stopping = watch::Receiver<bool>;

/// A new flag, not set.
pub fn flag() -> (Stop, Stopping) {
    watch::channel(false)
}

/// Completes once a stop is asked for (or the flag's sender is gone).
pub async fn stopped(stop: &mut Stopping) {
    // The guard wait_for returns is not Send: drop it here, inside, rather than in a caller's
    // select! whose future must be Send.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Whether a stop has been asked for.
pub fn is_stopping(stop: &Stopping) -> bool {
    *stop.borrow()
}
