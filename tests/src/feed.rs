//! Every state each task's result went through, as Redis published it on the result channels
//! (`celery-task-meta-<id>`): how tests count runs from Redis rather than from log lines.
//!
//! A run's ending is told by its document: each run stores its own `date_done` (to the
//! microsecond), while a write the worker repeats after a lost reply publishes the very same
//! document again. So runs are counted as distinct ready documents, not as publications.

use crate::{READY_STATES, RedisServer};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// A subscriber to every task's result channel, recording each published state in order.
pub struct ResultFeed {
    states: Arc<Mutex<HashMap<String, Vec<Published>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One published result document: its status, and the document as published.
#[derive(Debug, Clone)]
struct Published {
    status: String,
    document: String,
}

impl ResultFeed {
    /// Subscribes (returning once the subscription is in place, so nothing published after is
    /// missed) and records until dropped.
    pub fn start(redis: &RedisServer) -> Self {
        let url = redis.url(1);
        let states: Arc<Mutex<HashMap<String, Vec<Published>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (subscribed, ready) = mpsc::channel();
        let thread = {
            let (states, stop) = (states.clone(), stop.clone());
            std::thread::spawn(move || {
                // Subscribed again whenever the connection is lost (a Redis restart, a
                // CLIENT KILL): what is published meanwhile is missed, so counts across such
                // a fault are lower bounds.
                while !stop.load(Ordering::SeqCst) {
                    if record(&url, &states, &stop, &subscribed).is_err() {
                        let retry_after = Duration::from_millis(50);
                        std::thread::sleep(retry_after);
                    }
                }
            })
        };
        ready
            .recv_timeout(crate::WAIT)
            .expect("the result feed subscribed");
        Self {
            states,
            stop,
            thread: Some(thread),
        }
    }

    /// Every state published for task `id`, in order.
    pub fn states(&self, id: &str) -> Vec<String> {
        self.published(id).into_iter().map(|p| p.status).collect()
    }

    fn published(&self, id: &str) -> Vec<Published> {
        self.states
            .lock()
            .expect("feed lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// How many times task `id` ran to an end: its distinct ready documents. More than one
    /// means it ran to its end more than once.
    pub fn endings(&self, id: &str) -> usize {
        self.published(id)
            .into_iter()
            .filter(|p| READY_STATES.contains(&p.status.as_str()))
            .map(|p| p.document)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

/// Records published states on one connection until `stop` or the connection fails.
fn record(
    url: &str,
    states: &Mutex<HashMap<String, Vec<Published>>>,
    stop: &AtomicBool,
    subscribed: &mpsc::Sender<()>,
) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let mut pubsub = conn.as_pubsub();
    pubsub.psubscribe("celery-task-meta-*")?;
    pubsub.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = subscribed.send(());
    while !stop.load(Ordering::SeqCst) {
        let message = match pubsub.get_message() {
            Ok(message) => message,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e),
        };
        let channel = message.get_channel_name().to_owned();
        let payload: String = message.get_payload().unwrap_or_default();
        let status = serde_json::from_str::<Value>(&payload)
            .ok()
            .and_then(|doc| doc["status"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let id = channel.trim_start_matches("celery-task-meta-").to_owned();
        states
            .lock()
            .expect("feed lock")
            .entry(id)
            .or_default()
            .push(Published {
                status,
                document: payload,
            });
    }
    Ok(())
}

impl Drop for ResultFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
