//! The messages this worker holds: fetched and not started (reserved, in order), and running
//! (with when each began). Every one of them is also in an in-flight list in Redis; this is
//! what lets a stop return them, a reconciliation tell orphans from them, and `inspect`
//! list them.

use crate::lock;
use crate::redis::Delivery;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(super) struct Held {
    /// Fetched and not started, in order.
    pub reserved: Mutex<VecDeque<Delivery>>,
    /// Being handled, by handle id, with when each began (seconds since the epoch).
    running: Mutex<HashMap<u64, (Delivery, f64)>>,
    next_id: AtomicU64,
}

impl Held {
    /// Counts `delivery` as running from now; returns its handle id.
    pub(super) fn start(&self, delivery: &Delivery) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.running).insert(id, (delivery.clone(), crate::clock::now_s()));
        id
    }

    /// The handle `id` is done.
    pub(super) fn finish(&self, id: u64) {
        lock(&self.running).remove(&id);
    }

    pub(super) fn running_count(&self) -> usize {
        lock(&self.running).len()
    }

    pub(super) fn reserved_count(&self) -> usize {
        lock(&self.reserved).len()
    }

    /// The running messages, with when each began.
    pub(super) fn running(&self) -> Vec<(Delivery, f64)> {
        lock(&self.running).values().cloned().collect()
    }

    /// The reserved messages, in order.
    pub(super) fn reserved(&self) -> Vec<Delivery> {
        lock(&self.reserved).iter().cloned().collect()
    }

    /// Takes every running message (at a stop, once their handlers are gone).
    pub(super) fn drain_running(&self) -> Vec<Delivery> {
        lock(&self.running).drain().map(|(_, (d, _))| d).collect()
    }

    /// The raw bytes of every message held, reserved or running.
    pub(super) fn raw_messages(&self) -> HashSet<Vec<u8>> {
        let reserved = lock(&self.reserved);
        let running = lock(&self.running);
        reserved
            .iter()
            .map(|d| d.raw.clone())
            .chain(running.values().map(|(d, _)| d.raw.clone()))
            .collect()
    }
}
