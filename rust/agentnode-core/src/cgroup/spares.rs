//! Task cgroups made ahead of time by a background thread, so a start only writes its limits:
//! on a hybrid host a task's cgroups are five `mkdir`s (one per hierarchy), about 0.2 ms of
//! every start.
//!
//! Each spare is handed out once, to one task, exactly as a cgroup made at the start would be:
//! empty, with the kernel's default (unlimited) settings and zeroed counters. Spares are
//! ordinary task cgroups of the instance (`t<N>`), so the cleanup that covers tasks covers
//! them: [`Spares::close`] removes them with the instance, and after a crash the next start's
//! sweep removes them with the dead instance's subtree.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use super::manager::TaskCgroup;
use super::Result;

/// How many spares wait ready: enough for a burst of starts while the thread catches up.
const READY: usize = 4;

/// Makes one task cgroup of the instance.
pub type Make = dyn Fn() -> Result<Box<dyn TaskCgroup>> + Send + Sync;

#[derive(Debug, Default)]
struct Shared {
    ready: Mutex<Vec<Box<dyn TaskCgroup>>>,
    taken: Condvar,
    closed: AtomicBool,
}

/// The spare cgroups of one instance and the thread that makes them.
#[derive(Debug)]
pub struct Spares {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
    /// The process they were made for: a forked copy of it must not hand out its parent's.
    owner: u32,
}

impl Default for Spares {
    fn default() -> Self {
        Self {
            shared: Arc::default(),
            filler: Mutex::default(),
            owner: std::process::id(),
        }
    }
}

impl Spares {
    /// A ready cgroup, or `None` (the caller makes one). The first call starts the thread that
    /// keeps [`READY`] of them, so an instance that never starts a task makes none.
    pub fn take(&self, make: &Arc<Make>) -> Option<Box<dyn TaskCgroup>> {
        if self.shared.closed.load(Ordering::Acquire) || self.forked() {
            return None;
        }
        let spare = lock(&self.shared.ready).pop();
        self.shared.taken.notify_one();
        let mut filler = lock(&self.filler);
        if filler.is_none() {
            let (shared, make) = (self.shared.clone(), make.clone());
            *filler = std::thread::Builder::new()
                .name("agentnode-cgroups".into())
                .spawn(move || fill(&shared, &*make))
                .ok();
        }
        spare
    }

    /// The cgroup2 directories of the spares ready now.
    pub fn ready(&self) -> Vec<std::path::PathBuf> {
        lock(&self.shared.ready)
            .iter()
            .map(|t| t.placement().to_owned())
            .collect()
    }

    /// Whether this is a forked copy, in a child, of its parent's spares.
    pub fn forked(&self) -> bool {
        std::process::id() != self.owner
    }

    /// Stops the thread and removes the spares not handed out. Idempotent.
    pub fn close(&self) {
        if self.forked() {
            // A forked copy: the thread and the spares are its parent's. Its locks may have
            // been held at the fork, so it only tries them.
            if let Ok(mut filler) = self.filler.try_lock() {
                std::mem::forget(filler.take());
            }
            if let Ok(mut ready) = self.shared.ready.try_lock() {
                std::mem::forget(std::mem::take(&mut *ready));
            }
            return;
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.taken.notify_all();
        if let Some(filler) = lock(&self.filler).take() {
            let _ = filler.join();
        }
        lock(&self.shared.ready).clear();
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps [`READY`] spares until closed; stops (leaving starts to make their own) on a failure.
fn fill(shared: &Shared, make: &Make) {
    crate::sys::lower_thread_priority();
    loop {
        {
            let ready = lock(&shared.ready);
            let _ready = shared
                .taken
                .wait_while(ready, |r| {
                    r.len() >= READY && !shared.closed.load(Ordering::Acquire)
                })
                .unwrap_or_else(PoisonError::into_inner);
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        // One made while closing is pushed all the same: `close` clears after joining.
        let Ok(spare) = make() else { return };
        lock(&shared.ready).push(spare);
    }
}
