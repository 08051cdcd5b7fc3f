//! Thin, checked wrappers over the Linux syscalls that libc does not wrap: `clone3` (5.3, with
//! `CLONE_INTO_CGROUP` since 5.7) and `pidfd_open` (5.3).
//!
//! The child side of [`clone3`] runs in a copy of a possibly multi-threaded process, so callers
//! must do only async-signal-safe work there (no allocation, no locks) before `exec` or `_exit`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `struct clone_args` from `<linux/sched.h>` (version 2, 88 bytes: includes `cgroup`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

pub const CLONE_PIDFD: u64 = 0x1000;
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What `clone3` returned on this side of the fork.
#[derive(Debug)]
pub enum Forked {
    /// We are the child.
    Child,
    /// We are the parent; the child's pid and, when `CLONE_PIDFD` was asked for, its pidfd.
    Parent {
        pid: libc::pid_t,
        pidfd: Option<OwnedFd>,
    },
}

/// Forks with `clone3`, like `fork()` (no new stack): namespace flags, an optional target cgroup
/// (`CLONE_INTO_CGROUP`), and a pidfd for the child.
///
/// # Safety
/// The child must restrict itself to async-signal-safe calls and end in `exec` or `_exit`.
pub unsafe fn clone3(
    flags: u64,
    cgroup: Option<BorrowedFd<'_>>,
    want_pidfd: bool,
) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if want_pidfd {
        args.flags |= CLONE_PIDFD;
        args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    }
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: args is a valid clone_args of the size passed; the caller upholds the child rules.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent {
            pid: pid as libc::pid_t,
            // SAFETY: the kernel wrote a fresh descriptor that nothing else owns.
            pidfd: want_pidfd.then(|| unsafe { OwnedFd::from_raw_fd(pidfd) }),
        }),
    }
}

/// Opens a pidfd for `pid` (a pollable handle that cannot be confused by pid reuse).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Waits for a child and returns its raw wait status.
pub fn wait_pid(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if r == pid {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Forks a child that runs `child` (which must be async-signal-safe and return an exit code),
/// waits for it, and returns its exit code. Used by probes that must try a thing in a separate
/// process: new namespaces, seccomp filters.
///
/// # Safety
/// `child` runs in the forked child: no allocation, no locks.
pub unsafe fn fork_and_wait(
    flags: u64,
    cgroup: Option<BorrowedFd<'_>>,
    child: impl FnOnce() -> i32,
) -> io::Result<i32> {
    // SAFETY: forwarded to the caller.
    match unsafe { clone3(flags, cgroup, false)? } {
        Forked::Child => {
            let code = child();
            // SAFETY: _exit is async-signal-safe and never returns.
            unsafe { libc::_exit(code) }
        }
        Forked::Parent { pid, .. } => {
            let status = wait_pid(pid)?;
            if libc::WIFEXITED(status) {
                Ok(libc::WEXITSTATUS(status))
            } else {
                Ok(128 + libc::WTERMSIG(status))
            }
        }
    }
}

/// The effective uid of this process.
#[must_use]
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// `uname -r`.
#[must_use]
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return String::from("unknown");
    }
    // SAFETY: the kernel NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Parses "6.18.44-fc-v657" into (6, 18, 44).
#[must_use]
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18, 44)));
        assert_eq!(parse_kernel_version("5.10"), Some((5, 10, 0)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn fork_and_wait_returns_child_code() {
        // SAFETY: the closure only returns a constant.
        let code = unsafe { fork_and_wait(0, None, || 7) }.unwrap();
        assert_eq!(code, 7);
    }
}
