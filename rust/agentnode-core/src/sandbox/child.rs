//! The code that runs in the task between `clone3` and `execve`. It runs in the address space of
//! a possibly multi-threaded parent (shared with it, see [`crate::sys::spawn_vm`]), so it makes
//! raw system calls only, through [`raw::call`]: no allocation, no locks, no panics, no libc
//! (whose wrappers would set the parent thread's `errno`, and some of which take locks: see
//! [`set_ids`]), and it writes nothing but its own stack.
//! On any failure it writes the [`StartStep`] and errno to the error pipe and exits 127; the
//! parent turns that into a [`super::Error::Setup`] naming the step.

use std::ffi::{c_char, CStr, CString};
use std::os::fd::RawFd;

use libc::{c_long, AT_FDCWD};

use super::plan::Op;
use super::start_step::StartStep;
use crate::sys::raw;

/// The whole record of [`StartStep::MountsReady`] on the error pipe.
pub fn mounts_ready() -> [u8; 8] {
    StartStep::MountsReady.record(0)
}

/// The whole record of [`StartStep::ZygoteReady`].
pub fn zygote_ready() -> [u8; 8] {
    StartStep::ZygoteReady.record(0)
}

/// The whole record of [`StartStep::ZygoteGo`].
pub fn zygote_go() -> [u8; 8] {
    StartStep::ZygoteGo.record(0)
}

/// Everything the child needs, prepared by the parent.
pub struct Prepared {
    pub ops: Vec<Op>,
    /// v1 `tasks` files to write `0` to (see `TaskCgroup::join_files`).
    pub join: Vec<RawFd>,
    pub sync_read: RawFd,
    pub sync_write: RawFd,
    pub err_write: RawFd,
    pub netns: Option<RawFd>,
    pub hostname: CString,
    pub cwd: CString,
    pub exe: CString,
    /// Own the strings `argv_ptrs` and `env_ptrs` point into.
    pub _argv: Vec<CString>,
    pub _env: Vec<CString>,
    pub argv_ptrs: Vec<*const c_char>,
    pub env_ptrs: Vec<*const c_char>,
    pub stdio: [Option<RawFd>; 3],
    pub userns: bool,
    pub uid: u32,
    pub gid: u32,
    pub cap_last: u32,
    /// Bit N set: keep capability N.
    pub keep_caps: u64,
    /// No parent-death signal at exec (see `Spec::outlive`).
    pub outlive: bool,
    pub nofile: u64,
    /// A Landlock ruleset to restrict the task with (see [`super::landlock`]), if the kernel
    /// has one.
    pub landlock: Option<RawFd>,
    /// The seccomp filter to install last, if any.
    pub seccomp: Option<&'static super::seccomp::Program>,
    /// The signal mask the task starts with (the parent blocks all signals around the clone).
    pub sigmask: u64,
    /// The nice value a zygote takes for its task (a cloned child has its parent's already).
    pub nice: Option<i32>,
}

/// What a zygote needs to get ready, prepared by the thread that clones it. The zygote shares
/// that thread's descriptor table (`CLONE_FILES`) until it takes a task, so it must close none
/// of these: the parent closes them once the zygote is ready.
pub struct Boot {
    /// [`super::plan::zygote_boot`]'s.
    pub ops: Vec<Op>,
    /// v1 `tasks` files to write `0` to.
    pub join: Vec<RawFd>,
    pub netns: RawFd,
    /// Where it reports a failed boot or that it is ready; a start brings its own.
    pub err_write: RawFd,
    /// Where the address of its task's [`Prepared`] comes (8 bytes, native endian).
    pub cmd_read: RawFd,
    /// A pidfd of this process: the zygote exits when it does, however it dies.
    pub daemon: RawFd,
    pub nice: i32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A failed step's errno.
type StepResult = Result<(), i32>;

/// A raw system call's result: `Err(errno)` when it failed.
unsafe fn sys(nr: c_long, args: &[usize]) -> Result<isize, i32> {
    // SAFETY: forwarded to the caller.
    let r = unsafe { raw::call(nr, args) };
    if r < 0 {
        Err(-r as i32)
    } else {
        Ok(r)
    }
}

fn ptr(c: &CStr) -> usize {
    c.as_ptr() as usize
}

fn opt(c: Option<&CString>) -> usize {
    c.map_or(0, |c| ptr(c))
}

unsafe fn fail(fd: RawFd, step: StartStep, errno: i32) -> ! {
    let buf = step.record(errno);
    // SAFETY: a write from our stack, then exit; neither returns an error we could act on.
    unsafe {
        let _ = raw::call(
            libc::SYS_write,
            &[fd as usize, buf.as_ptr() as usize, buf.len()],
        );
        let _ = raw::call(libc::SYS_exit_group, &[127]);
    }
    unreachable!("exit_group returned")
}

/// On failure, reports `step` with the errno and exits.
unsafe fn step(err: RawFd, step: StartStep, r: StepResult) {
    if let Err(errno) = r {
        // SAFETY: forwarded to the caller.
        unsafe { fail(err, step, errno) }
    }
}

unsafe fn mount(
    src: usize,
    dst: usize,
    fstype: usize,
    flags: libc::c_ulong,
    data: usize,
) -> StepResult {
    // SAFETY: NUL-terminated strings or null, as mount(2) takes them.
    unsafe { sys(libc::SYS_mount, &[src, dst, fstype, flags as usize, data]) }.map(drop)
}

/// Runs one step of a filesystem plan (in the task, or in the thread that builds a template).
pub(super) unsafe fn run_op(op: &Op) -> StepResult {
    // SAFETY: every pointer comes from a CString that outlives this call.
    unsafe {
        match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => mount(
                opt(src.as_ref()),
                ptr(dst),
                opt(fstype.as_ref()),
                *flags,
                opt(data.as_ref()),
            ),
            Op::MkDir(path) => {
                match sys(libc::SYS_mkdirat, &[AT_FDCWD as usize, ptr(path), 0o755]) {
                    Err(libc::EEXIST) => Ok(()),
                    r => r.map(drop),
                }
            }
            Op::Touch(path) => {
                let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC;
                let at = AT_FDCWD as usize;
                match sys(libc::SYS_openat, &[at, ptr(path), flags as usize, 0o644]) {
                    Ok(fd) => sys(libc::SYS_close, &[fd as usize]).map(drop),
                    Err(libc::EEXIST | libc::EISDIR) => Ok(()),
                    Err(libc::EACCES)
                        if sys(libc::SYS_faccessat, &[at, ptr(path), libc::F_OK as usize])
                            .is_ok() =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Symlink { target, path } => {
                match sys(
                    libc::SYS_symlinkat,
                    &[ptr(target), AT_FDCWD as usize, ptr(path)],
                ) {
                    Err(libc::EEXIST) => Ok(()),
                    r => r.map(drop),
                }
            }
            Op::ReadOnly { path, recursive } => {
                let attr = [libc::MOUNT_ATTR_RDONLY, 0, 0, 0];
                let flags = if *recursive { libc::AT_RECURSIVE } else { 0 };
                sys(
                    libc::SYS_mount_setattr,
                    &[
                        AT_FDCWD as usize,
                        ptr(path),
                        flags as usize,
                        attr.as_ptr() as usize,
                        std::mem::size_of_val(&attr),
                    ],
                )
                .map(drop)
            }
            Op::Mask { path, dir } => {
                // (source, fstype, flags, data)
                let null = (ptr(c"/dev/null"), 0, libc::MS_BIND, 0);
                let empty = (
                    ptr(c"tmpfs"),
                    ptr(c"tmpfs"),
                    libc::MS_RDONLY,
                    ptr(c"size=4k,mode=555"),
                );
                // The right kind first: a bind that fails on a directory has already copied
                // its source mount, and dropping the copy waits out an RCU grace period (about
                // 50 us here, twice per start when every mask tried /dev/null first).
                let [first, other] = if *dir { [empty, null] } else { [null, empty] };
                // Gone, or out of this identity's reach (a user-namespace root cannot search
                // an unmapped owner's 0700 directory): the task cannot reach it either.
                match mount(first.0, ptr(path), first.1, first.2, first.3) {
                    Ok(()) | Err(libc::ENOENT | libc::ENOTDIR | libc::EACCES) => Ok(()),
                    Err(_) => mount(other.0, ptr(path), other.1, other.2, other.3),
                }
            }
            Op::PivotRoot(stage) => {
                sys(libc::SYS_chdir, &[ptr(stage)])?;
                sys(libc::SYS_pivot_root, &[ptr(c"."), ptr(c".")])?;
                sys(libc::SYS_umount2, &[ptr(c"."), libc::MNT_DETACH as usize])?;
                sys(libc::SYS_chdir, &[ptr(c"/")]).map(drop)
            }
            // setns also moves root and cwd to the template's root; the copy keeps the task's
            // mounts out of the template and the template's tasks out of each other.
            Op::EnterCopy(ns) => {
                sys(libc::SYS_setns, &[*ns as usize, libc::CLONE_NEWNS as usize])?;
                sys(libc::SYS_unshare, &[libc::CLONE_NEWNS as usize]).map(drop)
            }
            Op::EnterMade(ns) => {
                sys(libc::SYS_setns, &[*ns as usize, libc::CLONE_NEWNS as usize]).map(drop)
            }
            Op::Attach { tree, dst } => sys(
                libc::SYS_move_mount,
                &[
                    *tree as usize,
                    ptr(c""),
                    AT_FDCWD as usize,
                    ptr(dst),
                    libc::MOVE_MOUNT_F_EMPTY_PATH as usize,
                ],
            )
            .map(drop),
        }
    }
}

/// Switches to `uid`/`gid` with no supplementary groups (`groups`: false leaves them).
///
/// Raw system calls, not glibc's setgroups/setresgid/setresuid: glibc still takes the child
/// for the multi-threaded parent it was copied from, so those take the copied thread-list lock
/// and wait on a futex of every thread that was starting at clone time, to change all threads'
/// ids. Neither the lock holder nor those threads exist here, so the task hung before exec
/// (gdb: `__nptl_setxid` → `setxid_mark_thread` → `futex_wait`). The raw calls change this
/// process only, which is all of it.
unsafe fn set_ids(uid: u32, gid: u32, groups: bool) -> StepResult {
    let (uid, gid) = (uid as usize, gid as usize);
    // SAFETY: plain syscalls with integer arguments (setgroups gets an empty list).
    unsafe {
        if groups {
            sys(libc::SYS_setgroups, &[0, 0])?;
        }
        sys(libc::SYS_setresgid, &[gid, gid, gid])?;
        sys(libc::SYS_setresuid, &[uid, uid, uid]).map(drop)
    }
}

/// Checks that the switch took: real, effective and saved uid and gid are exactly the ones
/// asked for, and no supplementary group is left. A kernel or a filter that ignored one of the
/// calls (or an id the kernel reads as "unchanged") must not leave the task with the parent's.
unsafe fn verify_ids(uid: u32, gid: u32) -> StepResult {
    let mut ids = [u32::MAX; 3];
    let mut gids = [u32::MAX; 3];
    // SAFETY: out pointers to our own stack, of the kernel's uid_t/gid_t size.
    unsafe {
        let [r, e, s] = ids.each_mut().map(|i| std::ptr::from_mut(i) as usize);
        sys(libc::SYS_getresuid, &[r, e, s])?;
        let [r, e, s] = gids.each_mut().map(|i| std::ptr::from_mut(i) as usize);
        sys(libc::SYS_getresgid, &[r, e, s])?;
        let groups = sys(libc::SYS_getgroups, &[0, 0])?;
        if ids != [uid; 3] || gids != [gid; 3] || groups != 0 {
            return Err(libc::EPERM);
        }
    }
    Ok(())
}

/// Brings up `lo` in the task's fresh network namespace (it starts down): SIOCSIFFLAGS on a
/// datagram socket, no netlink, nothing allocated.
pub(super) unsafe fn loopback_up() -> Result<(), i32> {
    // SAFETY: ifreq is plain data on our stack.
    unsafe {
        let fd = sys(
            libc::SYS_socket,
            &[
                libc::AF_INET as usize,
                (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize,
                0,
            ],
        )? as usize;
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as c_char;
        req.ifr_name[1] = b'o' as c_char;
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let r = sys(
            libc::SYS_ioctl,
            &[fd, libc::SIOCSIFFLAGS as usize, (&raw mut req) as usize],
        );
        let _ = sys(libc::SYS_close, &[fd]);
        r.map(drop)
    }
}

/// Puts back the default action of every signal: the task must not run the parent's handlers
/// (they would act on the parent's memory), nor inherit what the parent ignores (Python ignores
/// SIGPIPE and SIGXFSZ, so `yes | head` in a task would end in EPIPE errors); then the mask.
unsafe fn reset_signals(mask: u64) -> StepResult {
    // The kernel's struct sigaction starts with the handler; all zeros is SIG_DFL, no flags,
    // an empty mask, whatever the rest of the layout.
    let dfl = [0u64; 4];
    for sig in 1..=64usize {
        if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
            continue;
        }
        let mut old = [0u64; 4];
        // SAFETY: in and out buffers at least as large as the kernel's struct sigaction.
        unsafe {
            let query = [sig, 0, (&raw mut old) as usize, 8];
            if sys(libc::SYS_rt_sigaction, &query).is_err() {
                continue; // not a signal on this kernel
            }
            if old[0] != libc::SIG_DFL as u64 {
                sys(
                    libc::SYS_rt_sigaction,
                    &[sig, (&raw const dfl) as usize, 0, 8],
                )?;
            }
        }
    }
    // SAFETY: a valid mask of the kernel's sigset size.
    unsafe {
        sys(
            libc::SYS_rt_sigprocmask,
            &[libc::SIG_SETMASK as usize, (&raw const mask) as usize, 0, 8],
        )
        .map(drop)
    }
}

/// Entry point of the cloned child (see [`crate::sys::spawn_vm`]): `arg` is the [`Prepared`].
pub extern "C" fn entry(arg: *const libc::c_void) -> ! {
    // SAFETY: the parent passes its Prepared, which lives until we exec or exit.
    unsafe { run(&*arg.cast::<Prepared>()) }
}

/// Moves this process into the v1 cgroups whose `tasks` files `join` are open.
unsafe fn join_cgroups(err: RawFd, join: &[RawFd]) {
    for &fd in join {
        // SAFETY: a one-byte write from a static buffer.
        let zero = unsafe { sys(libc::SYS_write, &[fd as usize, b"0".as_ptr() as usize, 1]) };
        // SAFETY: forwarded to the caller.
        unsafe { step(err, StartStep::Cgroup, zero.map(drop)) };
    }
}

/// Entry point of a zygote (see [`super::zygote`]): `arg` is its [`Boot`].
pub extern "C" fn zygote_entry(arg: *const libc::c_void) -> ! {
    // SAFETY: the pool passes the zygote's Boot, which lives as long as the zygote.
    unsafe { zygote(&*arg.cast::<Boot>()) }
}

/// Gets ready for a task (everything of a start that needs no spec), reports it, and waits.
///
/// # Safety
/// Call only in a freshly cloned zygote; never returns.
unsafe fn zygote(b: &Boot) -> ! {
    let err = b.err_write;
    // SAFETY: raw syscalls on descriptors and pointers the parent prepared.
    unsafe {
        // Every signal stays blocked while it waits; its task gets the spawning thread's mask.
        step(err, StartStep::Sync, reset_signals(u64::MAX));
        // Made by a thread of the lowest priority: it takes the daemon's own before it waits,
        // or a start on a busy host would wait for it to get a CPU.
        let nice = [libc::PRIO_PROCESS as usize, 0, b.nice as usize];
        let _ = sys(libc::SYS_setpriority, &nice);
        join_cgroups(err, &b.join);
        let net = sys(
            libc::SYS_setns,
            &[b.netns as usize, libc::CLONE_NEWNET as usize],
        );
        step(err, StartStep::Netns, net.map(drop));
        for (i, op) in b.ops.iter().enumerate() {
            step(err, StartStep::Plan(i as u32), run_op(op));
        }
        let _ = prctl(&[libc::PR_SET_PDEATHSIG as usize, libc::SIGKILL as usize]);
        let ready = zygote_ready();
        let w = sys(libc::SYS_write, &[err as usize, ready.as_ptr() as usize, 8]);
        step(err, StartStep::Sync, w.map(drop));
        let p = wait_for_task(b);
        // Its own copy of the descriptor table: the task's stdio, trees and pipes in it stay
        // open however the parent's table changes, and closing one closes only its copy.
        let files = sys(libc::SYS_unshare, &[libc::CLONE_FILES as usize]);
        step(p.err_write, StartStep::Files, files.map(drop));
        let _ = sys(libc::SYS_close, &[p.sync_write as usize]);
        step(p.err_write, StartStep::Sync, drop_pending());
        let go = zygote_go();
        let w = sys(
            libc::SYS_write,
            &[p.err_write as usize, go.as_ptr() as usize, 8],
        );
        step(p.err_write, StartStep::Sync, w.map(drop));
        if let Some(nice) = p.nice {
            let _ = sys(
                libc::SYS_setpriority,
                &[libc::PRIO_PROCESS as usize, 0, nice as usize],
            );
        }
        let mask = [
            libc::SIG_SETMASK as usize,
            (&raw const p.sigmask) as usize,
            0,
            8,
        ];
        step(
            p.err_write,
            StartStep::Sync,
            sys(libc::SYS_rt_sigprocmask, &mask).map(drop),
        );
        finish(p)
    }
}

/// Discards the signals that came while it waited (all blocked): they were sent to the
/// daemon's process group, before its task existed.
unsafe fn drop_pending() -> StepResult {
    let all = u64::MAX;
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: raw syscalls with buffers on our stack, of the kernel's sigset size.
    unsafe {
        // Each pass takes one signal (queued real-time ones may repeat): bounded all the same.
        for _ in 0..1024 {
            let mut pending = 0u64;
            sys(libc::SYS_rt_sigpending, &[(&raw mut pending) as usize, 8])?;
            if pending == 0 {
                return Ok(());
            }
            let take = [(&raw const all) as usize, 0, (&raw const zero) as usize, 8];
            match sys(libc::SYS_rt_sigtimedwait, &take) {
                Ok(_) | Err(libc::EAGAIN | libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Err(libc::EAGAIN)
    }
}

/// Blocks until the parent sends the address of a task's [`Prepared`]; exits when the pool
/// closes its end or this process dies.
unsafe fn wait_for_task(b: &Boot) -> &Prepared {
    let mut fds = [
        libc::pollfd {
            fd: b.cmd_read,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.daemon,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: raw syscalls on our own stack's buffers.
    unsafe {
        loop {
            let poll = [fds.as_mut_ptr() as usize, 2, 0, 0, 8];
            match sys(libc::SYS_ppoll, &poll) {
                Err(libc::EINTR) => continue,
                Err(_) => break,
                Ok(_) if fds[1].revents != 0 => break,
                Ok(_) => {}
            }
            let mut addr = 0usize;
            let read = sys(
                libc::SYS_read,
                &[b.cmd_read as usize, (&raw mut addr) as usize, 8],
            );
            match read {
                Err(libc::EINTR | libc::EAGAIN) => {}
                // SAFETY: the parent sent the address of a Prepared it keeps until we exec.
                Ok(8) => return &*(addr as *const Prepared),
                _ => break,
            }
        }
        let _ = raw::call(libc::SYS_exit_group, &[0]);
    }
    unreachable!("exit_group returned")
}

/// Runs in the child after `clone3`: waits for the parent, builds the sandbox, execs.
///
/// # Safety
/// Call only in a freshly cloned child; never returns.
unsafe fn run(p: &Prepared) -> ! {
    let err = p.err_write;
    // SAFETY: raw syscalls on descriptors and pointers the parent prepared.
    unsafe {
        step(err, StartStep::Sync, reset_signals(p.sigmask));
        let _ = sys(libc::SYS_close, &[p.sync_write as usize]);
        join_cgroups(err, &p.join);
        // In a new user namespace this process is still host root, which the namespace does
        // not map: wait for the parent to write the id maps, then become the namespace's root
        // (the mapped host id) before creating any file.
        if p.userns {
            let mut byte = 0u8;
            let read = sys(
                libc::SYS_read,
                &[p.sync_read as usize, (&raw mut byte) as usize, 1],
            );
            step(
                err,
                StartStep::Sync,
                read.and_then(|n| if n == 1 { Ok(()) } else { Err(libc::EPIPE) }),
            );
            step(err, StartStep::Ids, set_ids(0, 0, false));
        }
        if let Some(fd) = p.netns {
            let r = sys(libc::SYS_setns, &[fd as usize, libc::CLONE_NEWNET as usize]);
            step(err, StartStep::Netns, r.map(drop));
            let _ = sys(libc::SYS_close, &[fd as usize]);
        } else {
            step(err, StartStep::Loopback, loopback_up());
        }
        finish(p)
    }
}

/// The task's own mounts, hostname, working directory and privileges, then exec: the part of a
/// start a cloned child and a zygote share.
unsafe fn finish(p: &Prepared) -> ! {
    let err = p.err_write;
    // SAFETY: raw syscalls on descriptors and pointers the parent prepared.
    unsafe {
        for (i, op) in p.ops.iter().enumerate() {
            step(err, StartStep::Plan(i as u32), run_op(op));
            if matches!(op, Op::EnterCopy(_)) {
                let ready = mounts_ready();
                let w = sys(libc::SYS_write, &[err as usize, ready.as_ptr() as usize, 8]);
                step(err, StartStep::Sync, w.map(drop));
            }
        }
        let host = [ptr(&p.hostname), p.hostname.as_bytes().len()];
        step(
            err,
            StartStep::Hostname,
            sys(libc::SYS_sethostname, &host).map(drop),
        );
        step(
            err,
            StartStep::Cwd,
            sys(libc::SYS_chdir, &[ptr(&p.cwd)]).map(drop),
        );
        drop_privileges(p);
        let r = sys(
            libc::SYS_execve,
            &[
                ptr(&p.exe),
                p.argv_ptrs.as_ptr() as usize,
                p.env_ptrs.as_ptr() as usize,
            ],
        );
        fail(err, StartStep::Exec, r.err().unwrap_or(libc::EIO))
    }
}

unsafe fn prctl(args: &[usize]) -> Result<isize, i32> {
    // SAFETY: forwarded to the caller.
    unsafe { sys(libc::SYS_prctl, args) }
}

/// rlimits and the task's stdio.
unsafe fn limits_and_stdio(p: &Prepared) {
    let err = p.err_write;
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let nofile = libc::rlimit {
        rlim_cur: p.nofile,
        rlim_max: p.nofile,
    };
    // SAFETY: raw syscalls on values the parent prepared and buffers on our stack.
    unsafe {
        for (resource, limit) in [(libc::RLIMIT_CORE, &core), (libc::RLIMIT_NOFILE, &nofile)] {
            let args = [0, resource as usize, std::ptr::from_ref(limit) as usize, 0];
            step(
                err,
                StartStep::Rlimit,
                sys(libc::SYS_prlimit64, &args).map(drop),
            );
        }
        for (target, fd) in p.stdio.iter().enumerate() {
            if let Some(fd) = *fd {
                // dup3 refuses equal descriptors; then the descriptor only loses close-on-exec.
                let r = if fd as usize == target {
                    sys(libc::SYS_fcntl, &[target, libc::F_SETFD as usize, 0])
                } else {
                    sys(libc::SYS_dup3, &[fd as usize, target, 0])
                };
                step(err, StartStep::Stdio, r.map(drop));
            }
        }
    }
}

/// Leaves the task exactly the kept capabilities (none by default), ambient so they survive
/// exec: uid 0 would otherwise keep all of them, and a non-zero uid with KEEPCAPS keeps its
/// permitted set.
unsafe fn keep_caps(p: &Prepared) {
    let err = p.err_write;
    // SAFETY: raw syscalls on buffers on our stack.
    unsafe {
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let (lo, hi) = (p.keep_caps as u32, (p.keep_caps >> 32) as u32);
        let data = [
            CapData {
                effective: lo,
                permitted: lo,
                inheritable: lo,
            },
            CapData {
                effective: hi,
                permitted: hi,
                inheritable: hi,
            },
        ];
        let caps = [(&raw const header) as usize, data.as_ptr() as usize];
        step(err, StartStep::Caps, sys(libc::SYS_capset, &caps).map(drop));
        for cap in (0..=p.cap_last).filter(|c| p.keep_caps & (1u64 << c) != 0) {
            let raise = [
                libc::PR_CAP_AMBIENT as usize,
                libc::PR_CAP_AMBIENT_RAISE as usize,
                cap as usize,
                0,
                0,
            ];
            step(err, StartStep::Caps, prctl(&raise).map(drop));
        }
    }
}

/// rlimits, stdio, capabilities, ids, `no_new_privs`, parent-death signal, seccomp: the last
/// steps before exec, in the order the kernel requires (bounding set before the uid change,
/// seccomp after `no_new_privs`).
pub(super) unsafe fn drop_privileges(p: &Prepared) {
    let err = p.err_write;
    // SAFETY: raw syscalls on values the parent prepared and buffers on our stack.
    unsafe {
        limits_and_stdio(p);
        for cap in (0..=p.cap_last).filter(|c| p.keep_caps & (1u64 << c) == 0) {
            match prctl(&[libc::PR_CAPBSET_DROP as usize, cap as usize]) {
                Ok(_) | Err(libc::EINVAL) => {}
                Err(e) => fail(err, StartStep::Caps, e),
            }
        }
        let _ = prctl(&[
            libc::PR_CAP_AMBIENT as usize,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as usize,
        ]);
        // Kept capabilities must survive the uid change (then exec, as ambient capabilities).
        if p.keep_caps != 0 {
            step(
                err,
                StartStep::Caps,
                prctl(&[libc::PR_SET_KEEPCAPS as usize, 1]).map(drop),
            );
        }
        step(err, StartStep::Ids, set_ids(p.uid, p.gid, true));
        step(err, StartStep::VerifyIds, verify_ids(p.uid, p.gid));
        keep_caps(p);
        step(
            err,
            StartStep::Nnp,
            prctl(&[libc::PR_SET_NO_NEW_PRIVS as usize, 1, 0, 0, 0]).map(drop),
        );
        if let Some(ruleset) = p.landlock {
            let restrict = [ruleset as usize, 0];
            step(
                err,
                StartStep::Landlock,
                sys(libc::SYS_landlock_restrict_self, &restrict).map(drop),
            );
        }
        // The task dies with the thread that spawned it, unless it is to outlive it: then the
        // signal a zygote armed for itself is cleared. Either is set after the uid change, which
        // clears it; the parent holds the sync pipe open until exec, so a hang-up here means it
        // died before this point, and the task must not start (an outliving one would be
        // nobody's: no record of it, so its node's next start could run it again).
        let death = if p.outlive { 0 } else { libc::SIGKILL as usize };
        let _ = prctl(&[libc::PR_SET_PDEATHSIG as usize, death]);
        let mut pfd = libc::pollfd {
            fd: p.sync_read,
            events: 0,
            revents: 0,
        };
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let poll = [(&raw mut pfd) as usize, 1, (&raw const zero) as usize, 0, 8];
        match sys(libc::SYS_ppoll, &poll) {
            Ok(0) => {}
            Ok(_) => fail(err, StartStep::Sync, libc::EPIPE),
            Err(e) => fail(err, StartStep::Sync, e),
        }
        // Everything but stdio closes at exec; the error pipe is already close-on-exec.
        let _ = sys(
            libc::SYS_close_range,
            &[3, u32::MAX as usize, libc::CLOSE_RANGE_CLOEXEC as usize],
        );
        if let Some(prog) = p.seccomp {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr().cast_mut(),
            };
            let args = [
                libc::SECCOMP_SET_MODE_FILTER as usize,
                0,
                (&raw const fprog) as usize,
            ];
            step(
                err,
                StartStep::Seccomp,
                sys(libc::SYS_seccomp, &args).map(drop),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_ids_accepts_only_the_ids_asked_for() {
        // SAFETY: a forked child switches ids, checks them and returns a code.
        let code = unsafe {
            crate::sys::fork_and_wait(0, None, || {
                if set_ids(1234, 5678, true).is_err() {
                    return 10;
                }
                let exact = verify_ids(1234, 5678) == Ok(());
                let uid_refused = verify_ids(1235, 5678) == Err(libc::EPERM);
                let gid_refused = verify_ids(1234, 5679) == Err(libc::EPERM);
                i32::from(!(exact && uid_refused && gid_refused))
            })
        }
        .unwrap();
        assert_eq!(code, 0);
    }
}
