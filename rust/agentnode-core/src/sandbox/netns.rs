//! A few fresh network namespaces, each with loopback up, made ahead of time by a background
//! thread. Creating one is about half a millisecond of a task's start (the kernel builds a
//! whole network stack); tearing one down is deferred kernel work either way.
//!
//! They are held only as file descriptors, never bind-mounted, so the kernel frees them when
//! this process dies, however it dies. Each is handed out once: the task that joins it is its
//! only user, and it goes away with that task.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

/// How many namespaces wait ready: enough for a burst of starts while the thread catches up.
const READY: usize = 4;

struct Pool {
    ready: Mutex<Vec<OwnedFd>>,
    taken: Condvar,
}

/// A fresh network namespace with loopback up, or `None` when none is ready (the caller then
/// creates one with `CLONE_NEWNET`). The first call starts the thread that makes them. A
/// forked child gets none: the ones it inherited are its parent's to hand out.
pub fn take() -> Option<OwnedFd> {
    static POOL: OnceLock<Option<(u32, &'static Pool)>> = OnceLock::new();
    let (owner, pool) = (*POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            ready: Mutex::new(Vec::with_capacity(READY)),
            taken: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("agentnode-netns".into())
            .spawn(move || refill(pool))
            .ok()
            .map(|_| (std::process::id(), pool))
    }))?;
    if owner != std::process::id() {
        return None;
    }
    let fd = pool
        .ready
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    pool.taken.notify_one();
    fd
}

/// Keeps `READY` namespaces ready; stops (leaving starts to make their own) on any failure.
fn refill(pool: &Pool) {
    crate::sys::lower_thread_priority();
    let Ok(home) = std::fs::File::open("/proc/thread-self/ns/net") else {
        return;
    };
    loop {
        {
            let ready = pool.ready.lock().unwrap_or_else(PoisonError::into_inner);
            let _ready = pool
                .taken
                .wait_while(ready, |r| r.len() >= READY)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let made = create();
        // SAFETY: back into this process's namespace, which only this thread ever leaves.
        if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return;
        }
        match made {
            Some(fd) => pool
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(fd),
            None => return,
        }
    }
}

/// Moves this thread into a new network namespace, brings its loopback up, and returns it.
fn create() -> Option<OwnedFd> {
    // SAFETY: unshare affects this thread only; the caller moves it back.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    // SAFETY: raw syscalls on a socket of this thread's (new) namespace.
    unsafe { super::child::loopback_up() }.ok()?;
    std::fs::File::open("/proc/thread-self/ns/net")
        .ok()
        .map(OwnedFd::from)
}
