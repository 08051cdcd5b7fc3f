//! A counting semaphore over usearch's per-thread scratch contexts: callers beyond usearch's
//! limit wait here instead of failing inside usearch.

use std::sync::{Condvar, Mutex, PoisonError};

/// usearch serves at most this many concurrent adds/searches (one scratch context each, a few
/// KiB); callers beyond it wait on [`Contexts`] instead of failing inside usearch.
pub(super) const CONTEXTS: usize = 32;

/// A counting semaphore over usearch's per-thread contexts.
pub(super) struct Contexts {
    free: Mutex<usize>,
    freed: Condvar,
}

pub(super) struct ContextGuard<'a>(&'a Contexts);

impl Contexts {
    pub(super) fn new() -> Self {
        Self {
            free: Mutex::new(CONTEXTS),
            freed: Condvar::new(),
        }
    }

    pub(super) fn acquire(&self) -> ContextGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self
                .freed
                .wait(free)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        ContextGuard(self)
    }
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.freed.notify_one();
    }
}
