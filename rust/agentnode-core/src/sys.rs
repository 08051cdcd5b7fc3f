//! Thin, checked wrappers over the Linux syscalls that libc does not wrap: `clone3` (5.3, with
//! `CLONE_INTO_CGROUP` since 5.7) and `pidfd_open` (5.3), plus [`raw`] system calls and
//! [`spawn_vm`], the `CLONE_VM` start of a task.
//!
//! The child side of [`clone3`] runs in a copy of a possibly multi-threaded process, so callers
//! must do only async-signal-safe work there (no allocation, no locks) before `exec` or `_exit`.
//! The child of [`spawn_vm`] runs in the parent's very address space and must do even less: see
//! there.

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

/// System calls that return `-errno` on failure instead of setting `errno`.
///
/// A [`spawn_vm`] child shares the address space and the thread-local storage of the thread
/// that started it, so a libc wrapper there would write that thread's `errno` while it runs on.
pub mod raw {
    /// Makes system call `nr` with up to six arguments; a negative result is `-errno`.
    ///
    /// # Safety
    /// As for the system call itself: pointers must be valid for what the kernel does with them.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[must_use]
    pub unsafe fn call(nr: libc::c_long, args: &[usize]) -> isize {
        let mut a = [0usize; 6];
        a[..args.len()].copy_from_slice(args);
        let ret: isize;
        // SAFETY: the x86_64 syscall convention; the kernel clobbers rcx and r11 only.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
                in("r10") a[3], in("r8") a[4], in("r9") a[5],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// Makes system call `nr` with up to six arguments; a negative result is `-errno`.
    ///
    /// # Safety
    /// As for the system call itself: pointers must be valid for what the kernel does with them.
    #[cfg(not(target_arch = "x86_64"))]
    #[must_use]
    pub unsafe fn call(nr: libc::c_long, args: &[usize]) -> isize {
        let mut a = [0usize; 6];
        a[..args.len()].copy_from_slice(args);
        // SAFETY: forwarded to the caller. Only the fork-style child (see spawn_vm) runs this
        // on other architectures, and there errno is its own.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        if r == -1 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as isize)
        } else {
            r as isize
        }
    }
}

/// The stack a [`spawn_vm`] child runs on: anonymous memory with a guard page below it,
/// unmapped when dropped (only once the child has exec'd or exited).
#[derive(Debug)]
pub struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing else refers to it.
unsafe impl Send for ChildStack {}

impl ChildStack {
    /// Pages are only touched (and allocated) as the child uses them.
    const LEN: usize = 256 << 10;

    pub fn new() -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; the guard page is its own lowest page.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Self {
                base,
                len: Self::LEN,
            };
            if libc::mprotect(base, 4096, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used by any child (see spawn_vm).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Starts a child with `clone3` that calls `child(arg)` and never returns from it; returns the
/// child's pid and pidfd. `flags` must not include `CLONE_VM`, `CLONE_PIDFD` or
/// `CLONE_INTO_CGROUP` (`cgroup` asks for that).
///
/// On `x86_64` the child shares this address space (`CLONE_VM`) and runs on `stack`, as
/// `posix_spawn` does: no page tables are copied, so the cost does not grow with this process's
/// memory, and its exec has no copy to tear down. Elsewhere it is an ordinary fork-style child.
///
/// # Safety
/// Until the child has exec'd or exited (a close-on-exec pipe tells), `stack`, `arg` and
/// everything `child` reads must stay alive and unchanged. `child` may write only to its own
/// stack and must make system calls only through [`raw::call`], never through libc (which
/// would write this thread's `errno`); it must end in `execve` or `exit_group`.
/// All signals must be blocked in the calling thread (see [`block_signals`]), so no handler of
/// this process runs in the child before it has reset them.
pub unsafe fn spawn_vm(
    flags: u64,
    cgroup: Option<BorrowedFd<'_>>,
    stack: &ChildStack,
    child: extern "C" fn(*const libc::c_void) -> !,
    arg: *const libc::c_void,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: flags | CLONE_PIDFD,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    let ret = spawn_vm_raw(&mut args, stack, child, arg);
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    // SAFETY: the kernel wrote a fresh descriptor that nothing else owns.
    Ok((ret as libc::pid_t, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

#[cfg(target_arch = "x86_64")]
fn spawn_vm_raw(
    args: &mut CloneArgs,
    stack: &ChildStack,
    child: extern "C" fn(*const libc::c_void) -> !,
    arg: *const libc::c_void,
) -> isize {
    args.flags |= libc::CLONE_VM as u64;
    args.stack = stack.base as u64;
    args.stack_size = stack.len as u64;
    let ret: isize;
    // SAFETY: clone3 with a fresh stack. The child returns from the syscall with only rax (0)
    // and rsp (the top of `stack`) changed, so it finds `child` and `arg` in r12 and r13 and
    // calls it at once, never returning into this function's frame, which is not on its stack.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "and rsp, -16",
            "mov rdi, r13",
            "call r12",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") std::ptr::from_mut(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child,
            in("r13") arg,
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(not(target_arch = "x86_64"))]
fn spawn_vm_raw(
    args: &mut CloneArgs,
    _stack: &ChildStack,
    child: extern "C" fn(*const libc::c_void) -> !,
    arg: *const libc::c_void,
) -> isize {
    // SAFETY: a fork-style clone3: the child has its own copy of this stack and memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_mut(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        0 => child(arg),
        -1 => {
            -(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as isize)
        }
        pid => pid as isize,
    }
}

/// Blocks every signal in the calling thread; returns the mask to restore (the kernel's
/// 64-bit form, as `rt_sigprocmask` takes it).
#[must_use]
pub fn block_signals() -> u64 {
    let (all, mut old) = (u64::MAX, 0u64);
    // SAFETY: valid in and out masks of the kernel's sigset size.
    unsafe {
        let _ = raw::call(
            libc::SYS_rt_sigprocmask,
            &[
                libc::SIG_SETMASK as usize,
                std::ptr::from_ref(&all) as usize,
                std::ptr::from_mut(&mut old) as usize,
                8,
            ],
        );
    }
    old
}

/// The calling thread's signal mask (the kernel's 64-bit form).
#[must_use]
pub fn signal_mask() -> u64 {
    let mut mask = 0u64;
    // SAFETY: no new mask, a valid out mask of the kernel's sigset size.
    unsafe {
        let _ = raw::call(
            libc::SYS_rt_sigprocmask,
            &[
                libc::SIG_BLOCK as usize,
                0,
                std::ptr::from_mut(&mut mask) as usize,
                8,
            ],
        );
    }
    mask
}

/// Restores a signal mask [`block_signals`] returned.
pub fn restore_signals(mask: u64) {
    // SAFETY: a valid mask of the kernel's sigset size.
    unsafe {
        let _ = raw::call(
            libc::SYS_rt_sigprocmask,
            &[
                libc::SIG_SETMASK as usize,
                std::ptr::from_ref(&mask) as usize,
                0,
                8,
            ],
        );
    }
}

/// Gives the calling thread (only) the lowest CPU priority, for background work that a start
/// can always do itself when the thread falls behind.
pub fn lower_thread_priority() {
    // SAFETY: plain syscalls on this thread's id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
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

/// The identity of process `pid` with its pid: its start time in clock ticks since boot
/// (`/proc/PID/stat` field 22), which a later process given the same pid does not share.
/// `None` when there is no such process.
#[must_use]
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
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
