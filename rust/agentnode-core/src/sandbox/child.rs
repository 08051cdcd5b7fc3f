//! The code that runs in the task between `clone3` and `execve`. It is a copy of a possibly
//! multi-threaded parent, so it makes raw syscalls only: no allocation, no locks, no panics,
//! and no libc wrapper that does more than its syscall (see [`set_ids`]).
//! On any failure it writes `(step, errno)` to the error pipe and exits 127; the parent turns
//! that into a [`super::Error::Setup`] naming the step.

use std::ffi::{c_char, CString};
use std::os::fd::RawFd;
use std::ptr::null;

use seccompiler::BpfProgram;

use super::plan::Op;

/// Steps after the filesystem plan (whose steps are its indices).
pub const STEP_SYNC: u32 = 10_000;
pub const STEP_NETNS: u32 = 10_001;
pub const STEP_HOSTNAME: u32 = 10_002;
pub const STEP_CWD: u32 = 10_003;
pub const STEP_RLIMIT: u32 = 10_004;
pub const STEP_STDIO: u32 = 10_005;
pub const STEP_IDS: u32 = 10_006;
pub const STEP_CAPS: u32 = 10_007;
pub const STEP_NNP: u32 = 10_008;
pub const STEP_SECCOMP: u32 = 10_009;
pub const STEP_EXEC: u32 = 10_010;
pub const STEP_LOOPBACK: u32 = 10_011;

/// Everything the child needs, prepared by the parent.
pub struct Prepared {
    pub ops: Vec<Op>,
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
    pub nofile: u64,
    pub seccomp: &'static [BpfProgram],
    pub dev_null: CString,
    pub mask_data: CString,
    pub tmpfs: CString,
    pub dot: CString,
    pub slash: CString,
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

fn opt(c: Option<&CString>) -> *const c_char {
    c.map_or(null(), |c| c.as_ptr())
}

unsafe fn fail(fd: RawFd, step: u32) -> ! {
    // SAFETY: errno location is thread-local and valid; write/_exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(fd, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

unsafe fn run_op(p: &Prepared, op: &Op) -> bool {
    // SAFETY: every pointer comes from a CString that outlives this call.
    unsafe {
        match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => {
                libc::mount(
                    opt(src.as_ref()),
                    dst.as_ptr(),
                    opt(fstype.as_ref()),
                    *flags,
                    opt(data.as_ref()).cast(),
                ) == 0
            }
            Op::MkDir(path) => {
                libc::mkdir(path.as_ptr(), 0o755) == 0 || *libc::__errno_location() == libc::EEXIST
            }
            Op::Touch(path) => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                    true
                } else {
                    *libc::__errno_location() == libc::EEXIST
                        || *libc::__errno_location() == libc::EISDIR
                        || *libc::__errno_location() == libc::EACCES
                            && libc::access(path.as_ptr(), libc::F_OK) == 0
                }
            }
            Op::Symlink { target, path } => {
                libc::symlink(target.as_ptr(), path.as_ptr()) == 0
                    || *libc::__errno_location() == libc::EEXIST
            }
            Op::ReadOnly { path, recursive } => {
                let attr = [libc::MOUNT_ATTR_RDONLY, 0, 0, 0];
                let flags = if *recursive { libc::AT_RECURSIVE } else { 0 };
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    flags as libc::c_uint,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                ) == 0
            }
            Op::Mask(path) => {
                if libc::mount(
                    p.dev_null.as_ptr(),
                    path.as_ptr(),
                    null(),
                    libc::MS_BIND,
                    null(),
                ) == 0
                {
                    return true;
                }
                match *libc::__errno_location() {
                    libc::ENOENT => true,
                    _ => {
                        libc::mount(
                            p.tmpfs.as_ptr(),
                            path.as_ptr(),
                            p.tmpfs.as_ptr(),
                            libc::MS_RDONLY,
                            p.mask_data.as_ptr().cast(),
                        ) == 0
                    }
                }
            }
            Op::PivotRoot(stage) => {
                libc::chdir(stage.as_ptr()) == 0
                    && libc::syscall(libc::SYS_pivot_root, p.dot.as_ptr(), p.dot.as_ptr()) == 0
                    && libc::umount2(p.dot.as_ptr(), libc::MNT_DETACH) == 0
                    && libc::chdir(p.slash.as_ptr()) == 0
            }
        }
    }
}

/// Switches to `uid`/`gid` with no supplementary groups (`groups`: false leaves them).
///
/// Through syscall(2), not glibc's setgroups/setresgid/setresuid: glibc still takes the child
/// for the multi-threaded parent it was copied from, so those take the copied thread-list lock
/// and wait on a futex of every thread that was starting at clone time, to change all threads'
/// ids. Neither the lock holder nor those threads exist here, so the task hung before exec
/// (gdb: `__nptl_setxid` → `setxid_mark_thread` → `futex_wait`). The raw calls change this
/// process only, which is all of it.
unsafe fn set_ids(uid: u32, gid: u32, groups: bool) -> bool {
    let (uid, gid) = (libc::c_long::from(uid), libc::c_long::from(gid));
    // SAFETY: plain syscalls with integer arguments (setgroups gets an empty list).
    unsafe {
        (!groups || libc::syscall(libc::SYS_setgroups, 0, null::<libc::gid_t>()) == 0)
            && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
            && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
    }
}

/// Brings up `lo` in the task's fresh network namespace (it starts down): SIOCSIFFLAGS on a
/// datagram socket, no netlink, nothing allocated.
unsafe fn loopback_up() -> bool {
    // SAFETY: ifreq is plain data; socket/ioctl/close are async-signal-safe.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as c_char;
        req.ifr_name[1] = b'o' as c_char;
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let ok = libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req) == 0;
        libc::close(fd);
        ok
    }
}

/// Runs in the child after `clone3`: waits for the parent, builds the sandbox, execs.
///
/// # Safety
/// Call only in a freshly cloned child; never returns.
pub unsafe fn run(p: &Prepared) -> ! {
    let err = p.err_write;
    // SAFETY: raw syscalls on descriptors and pointers the parent prepared.
    unsafe {
        libc::close(p.sync_write);
        let mut byte = 0u8;
        if libc::read(p.sync_read, (&raw mut byte).cast(), 1) != 1 {
            fail(err, STEP_SYNC);
        }
        // In a new user namespace this process is still host root, which the namespace does
        // not map; become the namespace's root (the mapped host id) before creating any file.
        if p.userns && !set_ids(0, 0, false) {
            fail(err, STEP_IDS);
        }
        if let Some(fd) = p.netns {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                fail(err, STEP_NETNS);
            }
            libc::close(fd);
        }
        if p.netns.is_none() && !loopback_up() {
            fail(err, STEP_LOOPBACK);
        }
        for (i, op) in p.ops.iter().enumerate() {
            if !run_op(p, op) {
                fail(err, i as u32);
            }
        }
        if libc::sethostname(p.hostname.as_ptr(), p.hostname.as_bytes().len()) != 0 {
            fail(err, STEP_HOSTNAME);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            fail(err, STEP_CWD);
        }
        drop_privileges(p);
        libc::execve(p.exe.as_ptr(), p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr());
        fail(err, STEP_EXEC)
    }
}

/// rlimits, stdio, capabilities, ids, `no_new_privs`, parent-death signal, seccomp: the last
/// steps before exec, in the order the kernel requires (bounding set before the uid change,
/// seccomp after `no_new_privs`).
unsafe fn drop_privileges(p: &Prepared) {
    let err = p.err_write;
    // SAFETY: raw syscalls on values the parent prepared.
    unsafe {
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let nofile = libc::rlimit {
            rlim_cur: p.nofile,
            rlim_max: p.nofile,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &raw const core) != 0
            || libc::setrlimit(libc::RLIMIT_NOFILE, &raw const nofile) != 0
        {
            fail(err, STEP_RLIMIT);
        }
        for (target, fd) in p.stdio.iter().enumerate() {
            if let Some(fd) = *fd {
                if libc::dup2(fd, target as RawFd) < 0 {
                    fail(err, STEP_STDIO);
                }
            }
        }
        for cap in (0..=p.cap_last).filter(|c| p.keep_caps & (1u64 << c) == 0) {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                fail(err, STEP_CAPS);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        // Kept capabilities must survive the uid change (then exec, as ambient capabilities).
        if p.keep_caps != 0 && libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            fail(err, STEP_CAPS);
        }
        if !set_ids(p.uid, p.gid, true) {
            fail(err, STEP_IDS);
        }
        // Exactly the kept capabilities remain (none by default): uid 0 would otherwise keep
        // all of them, and a non-zero uid with KEEPCAPS keeps its permitted set.
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
        if libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) != 0 {
            fail(err, STEP_CAPS);
        }
        for cap in (0..=p.cap_last).filter(|c| p.keep_caps & (1u64 << c) != 0) {
            if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0 {
                fail(err, STEP_CAPS);
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(err, STEP_NNP);
        }
        // The task dies with the thread that spawned it. Set after the uid change, which clears
        // it; the parent holds the sync pipe open until exec, so a hang-up here means it died
        // before the signal was armed.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut pfd = libc::pollfd {
            fd: p.sync_read,
            events: 0,
            revents: 0,
        };
        if libc::poll(&raw mut pfd, 1, 0) != 0 {
            fail(err, STEP_SYNC);
        }
        // Everything but stdio closes at exec; the error pipe is already close-on-exec.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        for prog in p.seccomp {
            if seccompiler::apply_filter(prog).is_err() {
                fail(err, STEP_SECCOMP);
            }
        }
    }
}
