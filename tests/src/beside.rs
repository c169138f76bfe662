//! Normal traffic beside an attack: a steady trickle of `demo.add` tasks sent while a test
//! does something hostile, each of which must come back with its sum.

use crate::{Client, RedisServer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// `demo.add` tasks flowing until [`Beside::finish`].
pub struct Beside {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    sender: JoinHandle<Vec<(String, i64)>>,
}

impl Beside {
    /// Starts sending `demo.add(i, 7)` to `celery` every 5 ms.
    pub fn start(redis: &RedisServer) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let mut client = Client::new(redis);
        let (stopped, counted) = (stop.clone(), count.clone());
        let sender = std::thread::spawn(move || {
            let mut sent = Vec::new();
            let mut i = 0i64;
            while !stopped.load(Ordering::SeqCst) {
                sent.push((client.send("demo.add", json!([i, 7])), i + 7));
                counted.fetch_add(1, Ordering::SeqCst);
                i += 1;
                // A steady trickle (pacing traffic, not a wait).
                crate::pace(Duration::from_millis(5));
            }
            sent
        });
        Self {
            stop,
            sent: count,
            sender,
        }
    }

    /// Stops sending and returns each task's expected sum and final document.
    pub fn finish(self, client: &mut Client) -> Vec<(i64, Value)> {
        self.stop.store(true, Ordering::SeqCst);
        self.sender
            .join()
            .expect("the traffic thread")
            .into_iter()
            .map(|(id, expected)| (expected, client.result(&id)))
            .collect()
    }

    /// Once at least `min` were sent (an attack may end sooner), stops sending and checks
    /// that every task succeeded with its sum.
    pub fn all_succeed(self, client: &mut Client, min: usize) {
        crate::wait_for(&format!("{min} tasks sent beside"), || {
            (self.sent.load(Ordering::SeqCst) >= min).then_some(())
        });
        let traffic = self.finish(client);
        for (expected, doc) in &traffic {
            assert_eq!(doc["status"], "SUCCESS", "a demo.add beside: {doc}");
            assert_eq!(doc["result"], *expected, "a demo.add beside: {doc}");
        }
    }
}
