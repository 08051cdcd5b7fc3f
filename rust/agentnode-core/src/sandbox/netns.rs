//! A few fresh network namespaces, each with loopback up, made ahead of time (see
//! [`crate::background::ahead`]). Creating one is about half a millisecond of a task's start (the kernel
//! builds a whole network stack); tearing one down is deferred kernel work either way. With
//! each comes, once the template exists, a copy of it with the task's /sys (of that network
//! namespace) and /dev mounts in place ([`super::template::make_copy`]): some 0.1 ms of a start.
//!
//! They are held only as file descriptors, never bind-mounted, so the kernel frees them when
//! this process dies, however it dies. Each is handed out once: the task that joins it is its
//! only user, and it goes away with that task.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

use super::template::{self, MadeCopy};
use crate::background::ahead::{self, Ahead};

/// A task's network namespace made ahead, and its mount namespace when one could be made.
pub struct Ready {
    pub net: OwnedFd,
    pub mounts: Option<MadeCopy>,
}

fn pool() -> &'static Ahead<Ready> {
    static POOL: OnceLock<Ahead<Ready>> = OnceLock::new();
    // A copy made while the template went stale would keep the host's old mounts busy.
    POOL.get_or_init(|| {
        ahead::hold_template_copies(forget_copies);
        Ahead::keeping("agentnode-netns", make, |r| {
            r.mounts
                .as_ref()
                .is_none_or(|m| template::is_current(&m.from))
        })
    })
}

/// Makes a network namespace and, when the template exists, its copy of the template. Call it
/// only from a thread of this process's own namespaces that nothing else uses meanwhile.
pub(super) fn make() -> Option<Ready> {
    static HOME: OnceLock<Option<File>> = OnceLock::new();
    let home = HOME
        .get_or_init(|| File::open("/proc/self/ns/net").ok())
        .as_ref()?;
    let net = create(home)?;
    let mounts = template::make_copy(net.as_fd(), home);
    Some(Ready { net, mounts })
}

/// A fresh network namespace with loopback up, or `None` when none is ready (the caller then
/// creates one with `CLONE_NEWNET`).
pub fn take() -> Option<Ready> {
    pool().take()
}

/// Drops the mount namespaces made ahead from a template the host's mounts no longer match:
/// they hold copies of those mounts, which would keep an unmounted file system busy.
fn forget_copies() {
    pool().with_ready(|ready| {
        for r in ready {
            r.mounts = None;
        }
    });
}

/// Moves this thread into a new network namespace, brings its loopback up, moves it back to
/// `home` and returns the new one.
fn create(home: &File) -> Option<OwnedFd> {
    // SAFETY: unshare affects this thread only; it moves back below.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    // SAFETY: raw syscalls on a socket of this thread's (new) namespace.
    let made = unsafe { super::child::loopback_up() }
        .ok()
        .and_then(|()| File::open("/proc/thread-self/ns/net").ok())
        .map(OwnedFd::from);
    // SAFETY: back into this process's namespace, which only this (pool) thread ever leaves.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    made
}
