//! The epoch ticker: the thread that advances the engine's epoch every tick while a guest runs
//! (a running guest yields at each tick, and its time limits are checked then), and sleeps while
//! none does, so an idle worker wakes no thread a thousand times a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;
use wasmtime::Engine;

/// How often the epoch advances: a running guest yields to other tasks at least this often.
const TICK: Duration = Duration::from_millis(1);

/// How long the idle ticker sleeps between checks that its engine still exists.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The ticker of one engine, and how many guests run on it now.
pub(super) struct Ticker {
    running: Arc<AtomicUsize>,
    thread: Thread,
}

impl Ticker {
    /// Starts the ticker of `engine`; its thread ends within [`IDLE_CHECK`] of the engine's.
    pub(super) fn start(engine: &Engine) -> std::io::Result<Arc<Self>> {
        let weak = engine.weak();
        let running = Arc::new(AtomicUsize::new(0));
        let counted = running.clone();
        let thread = std::thread::Builder::new()
            .name("taskhost-epoch".into())
            .spawn(move || {
                loop {
                    let idle = counted.load(Ordering::Acquire) == 0;
                    if idle {
                        // A guest starting unparks it (an unpark before this park makes it
                        // return at once, so no start is missed).
                        std::thread::park_timeout(IDLE_CHECK);
                    } else {
                        std::thread::sleep(TICK);
                    }
                    let Some(engine) = weak.upgrade() else { break };
                    // Only a whole tick after a guest started: a guest that has not computed
                    // for a tick must not look as if it had.
                    if !idle {
                        engine.increment_epoch();
                    }
                }
            })?;
        Ok(Arc::new(Self {
            running,
            thread: thread.thread().clone(),
        }))
    }

    /// Marks a guest running until the returned guard is dropped: the epoch advances meanwhile.
    pub(super) fn running(self: &Arc<Self>) -> Running {
        if self.running.fetch_add(1, Ordering::AcqRel) == 0 {
            self.thread.unpark();
        }
        Running(self.clone())
    }
}

/// A guest running: the ticker ticks while any of these lives.
pub(super) struct Running(Arc<Ticker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}
