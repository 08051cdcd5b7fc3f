//! Things a start needs, made ahead of time by a background thread at the lowest CPU priority
//! and each handed out once: network namespaces (see `sandbox::netns`), task cgroups (see
//! `cgroup::Manager`) and whole tasks waiting for their command (`sandbox::zygote`). A start
//! that finds none ready makes its own, so a thread that falls behind (or fails, and retries)
//! only costs time.
//!
//! A forked child inherits the ready list but not the thread: there [`Ahead::take`] hands out
//! nothing and [`Ahead::close`] leaves the items alone, since they are the parent's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How many wait ready: enough for a burst of starts while the thread catches up.
pub const READY: usize = 4;

/// How long the thread waits after `make` failed before it tries again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Whether this process makes anything ahead (see [`make_none`]).
static MAKING: AtomicBool = AtomicBool::new(true);

/// From now on no pool of this process makes anything ahead: a take finds nothing and starts
/// no thread, and the caller makes its own. For a process that starts one task and exits
/// (`agentnode exec`), whatever was made ahead (task cgroups, network namespaces with their
/// mount copies, zygotes) would only be torn down again at its exit. Call it before the first
/// start: a pool whose thread already runs keeps what it made.
pub fn make_none() {
    MAKING.store(false, Ordering::Release);
}

/// What each pool whose items hold copies of the mount template runs to drop those copies.
type Forget = Arc<dyn Fn() + Send + Sync>;

/// The forgets of every pool holding template copies, run by [`template_changed`].
static TEMPLATE_HOLDERS: Mutex<Vec<Forget>> = Mutex::new(Vec::new());

/// Registers `forget`, which drops the template copies its pool made ahead (once per pool or
/// kind of pool): [`template_changed`] runs it. The template invalidates through here, so it
/// need not know which pools hold its copies.
pub fn hold_template_copies(forget: impl Fn() + Send + Sync + 'static) {
    TEMPLATE_HOLDERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Arc::new(forget));
}

/// Drops every copy of the mount template made ahead: the host's mounts changed, so they are
/// stale and would keep unmounted file systems busy.
pub fn template_changed() {
    // Run outside the lock: a forget may start its pool, which registers.
    let holders = TEMPLATE_HOLDERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for forget in holders {
        forget();
    }
}

struct Shared<T> {
    ready: Mutex<Vec<T>>,
    /// Whether an item just made may still join the ready ones (checked under their lock).
    keep: Box<dyn Fn(&T) -> bool + Send + Sync>,
    taken: Condvar,
    closed: AtomicBool,
}

/// Up to [`READY`] items made by `make` on a thread named `name`, started by the first take.
pub struct Ahead<T: Send + 'static> {
    name: &'static str,
    make: Arc<dyn Fn() -> Option<T> + Send + Sync>,
    shared: Arc<Shared<T>>,
    filler: Mutex<Option<JoinHandle<()>>>,
    /// The process they are made for.
    owner: u32,
}

impl<T: Send + 'static> std::fmt::Debug for Ahead<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> Ahead<T> {
    /// A pool whose thread calls `make` until [`READY`] wait; after a `None` from it the thread
    /// waits [`RETRY`] and tries again. It never ends before [`Ahead::close`]: tasks may live
    /// by it (a zygote's task dies with the thread that cloned it, see `sandbox::zygote`).
    pub fn new(name: &'static str, make: impl Fn() -> Option<T> + Send + Sync + 'static) -> Self {
        Self::keeping(name, make, |_| true)
    }

    /// A pool as [`Ahead::new`] whose items join the ready ones only if `keep` says they
    /// still may, under the lock [`Ahead::clear`] takes: an item made while a `clear` ran (of
    /// what became stale meanwhile) is dropped, not kept.
    pub fn keeping(
        name: &'static str,
        make: impl Fn() -> Option<T> + Send + Sync + 'static,
        keep: impl Fn(&T) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            make: Arc::new(make),
            shared: Arc::new(Shared {
                ready: Mutex::new(Vec::with_capacity(READY)),
                keep: Box::new(keep),
                taken: Condvar::new(),
                closed: AtomicBool::new(false),
            }),
            filler: Mutex::new(None),
            owner: std::process::id(),
        }
    }

    /// A ready item, or `None` (the caller makes its own). The first call starts the thread,
    /// so a pool nobody takes from makes nothing (nor one in a process that makes none).
    pub fn take(&self) -> Option<T> {
        if self.shared.closed.load(Ordering::Acquire)
            || self.forked()
            || !MAKING.load(Ordering::Acquire)
        {
            return None;
        }
        let item = lock(&self.shared.ready).pop();
        self.shared.taken.notify_one();
        let mut filler = lock(&self.filler);
        if filler.is_none() {
            let (shared, make) = (self.shared.clone(), self.make.clone());
            *filler = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || fill(&shared, &*make))
                .ok();
        }
        item
    }

    /// Runs `f` on the items ready now.
    pub fn with_ready<R>(&self, f: impl FnOnce(&mut [T]) -> R) -> R {
        f(&mut lock(&self.shared.ready))
    }

    /// Drops the items ready now; the thread makes new ones.
    pub fn clear(&self) {
        if self.forked() {
            return; // the parent's
        }
        let dropped = std::mem::take(&mut *lock(&self.shared.ready));
        self.shared.taken.notify_one();
        drop(dropped); // outside the lock: dropping an item may take a while
    }

    /// Whether this is a forked child's copy of its parent's pool.
    pub fn forked(&self) -> bool {
        std::process::id() != self.owner
    }

    /// Stops the thread and drops the items not handed out. Idempotent.
    pub fn close(&self) {
        if self.forked() {
            // The thread and the items are the parent's. Its locks may have been held at the
            // fork, so they are only tried.
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

impl<T: Send + 'static> Drop for Ahead<T> {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fill<T>(shared: &Shared<T>, make: &(dyn Fn() -> Option<T> + Send + Sync)) {
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
        crate::background::quiet::wait();
        // One made while closing is pushed all the same: `close` clears after joining.
        if let Some(item) = make() {
            let mut ready = lock(&shared.ready);
            if (shared.keep)(&item) {
                ready.push(item);
            } else {
                drop(ready);
                drop(item);
            }
        } else {
            let ready = lock(&shared.ready);
            let _ = shared
                .taken
                .wait_timeout_while(ready, RETRY, |_| !shared.closed.load(Ordering::Acquire))
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    #[test]
    fn items_are_made_ahead_handed_out_once_and_dropped_at_close() {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let pool = Ahead::new("ahead-test", move || {
            Some(counter.fetch_add(1, Ordering::SeqCst))
        });
        assert_eq!(
            made.load(Ordering::SeqCst),
            0,
            "nothing before the first take"
        );
        let mut seen = vec![pool.take()];
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.with_ready(|r| r.len()) < READY && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(pool.with_ready(|r| r.len()), READY);
        for _ in 0..READY {
            seen.push(pool.take());
        }
        let mut got: Vec<usize> = seen.into_iter().flatten().collect();
        let n = got.len();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), n, "no item handed out twice");
        pool.close();
        assert!(pool.take().is_none(), "nothing after close");
        assert_eq!(pool.with_ready(|r| r.len()), 0);
    }

    fn wait_for(pool: &Ahead<usize>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.with_ready(|r| r.len()) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_failed_make_is_retried_and_items_no_longer_kept_are_dropped() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        // The first make fails, then odd items are stale by the time they are made.
        let pool = Ahead::keeping(
            "ahead-test",
            move || match counter.fetch_add(1, Ordering::SeqCst) {
                0 => None,
                n => Some(n),
            },
            |n| n % 2 == 0,
        );
        assert!(pool.take().is_none());
        wait_for(&pool, READY);
        assert!(
            calls.load(Ordering::SeqCst) > READY,
            "the thread outlived a failure"
        );
        assert!(pool.with_ready(|r| r.iter().all(|n| n % 2 == 0)));
        let before = pool.with_ready(|r| r.to_vec());
        pool.clear();
        wait_for(&pool, READY); // refilled after a clear, with new items only
        assert!(pool.with_ready(|r| r.len() == READY && r.iter().all(|n| !before.contains(n))));
        pool.close();
    }
}
