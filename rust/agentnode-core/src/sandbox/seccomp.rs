//! The default seccomp filter, modelled on Docker's default profile: everything is allowed
//! except the calls that reach past the sandbox (mounting, loading code into the kernel, tracing
//! other processes, creating namespaces, ...), which fail with `EPERM`. `clone3` fails with
//! `ENOSYS` instead, as in Docker, because its flags live in memory a filter cannot inspect and
//! libc falls back to `clone`, whose namespace flags the filter does check.
//!
//! Built with libseccomp before the fork, as one program laid out as a binary tree of syscall
//! numbers; the child only installs it. The size and shape matter: since Linux 5.11 installing a
//! filter runs it for every syscall number to cache the constant answers, so the install cost
//! follows the length of the path to each answer. seccompiler's two linear programs (285 and 10
//! instructions) took about 0.25 ms to install; this one (about 90) about 0.06 ms. The socket
//! family rules and `io_uring`'s three calls made it 118 and some 4 us longer to install
//! (libseccomp 2.5, 6.18, measured in forked children); a masked-compare encoding of the families
//! came out no shorter.

use std::io::Read as _;
use std::os::fd::{FromRawFd as _, OwnedFd};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

use super::{Error, Result};

/// A classic BPF program, as `seccomp(SECCOMP_SET_MODE_FILTER)` takes it.
pub type Program = Vec<libc::sock_filter>;

/// Syscalls that always fail with `EPERM` inside a task.
const DENIED: &[libc::c_long] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_chroot,
    libc::SYS_lookup_dcookie,
    libc::SYS_fanotify_init,
    libc::SYS_vhangup,
    // io_uring creates sockets (IORING_OP_SOCKET), opens files and does their I/O in kernel
    // threads that no seccomp filter sees: its rings would bypass every rule here, as Docker's
    // profile also judges.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The address families a task may open sockets of: its own unix sockets, IP through its
/// network namespace, and netlink for route and address queries. Everything else (`AF_VSOCK` to
/// the hypervisor, `AF_PACKET` around the egress hooks, `AF_ALG`, `AF_KEY`, Bluetooth, ...) fails
/// with `EAFNOSUPPORT`, as if the kernel lacked it, so programs fall back as they would there.
pub const FAMILIES: [libc::c_int; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// `clone` flags that create namespaces.
const NS_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// Installs `prog` on the calling thread (which must have `no_new_privs` or `CAP_SYS_ADMIN`), then
/// checks that it denies `unshare`: 0 when it does, 1 when it did not, 2 when it would not
/// install. For a forked probe, not for tasks (their child makes raw syscalls only).
///
/// # Safety
/// Irreversible for the calling process: call it in a throwaway child.
#[must_use]
pub unsafe fn install_and_probe(prog: &Program) -> i32 {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: a valid sock_fprog pointing at a program that outlives the call.
    let installed = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const fprog,
        )
    };
    if installed != 0 {
        return 2;
    }
    // SAFETY: plain syscalls; errno is this thread's.
    unsafe {
        let r = libc::unshare(libc::CLONE_NEWUTS);
        i32::from(!(r == -1 && *libc::__errno_location() == libc::EPERM))
    }
}

#[allow(clippy::needless_pass_by_value)] // map_err hands the error over by value
fn scmp(e: libseccomp::error::SeccompError) -> Error {
    Error::Seccomp(e.to_string())
}

/// The default filter, compiled once per process (it never changes).
pub fn default_program() -> Result<&'static Program> {
    static PROGRAM: std::sync::OnceLock<Program> = std::sync::OnceLock::new();
    if let Some(p) = PROGRAM.get() {
        return Ok(p);
    }
    let built = build()?;
    Ok(PROGRAM.get_or_init(|| built))
}

fn build() -> Result<Program> {
    let mut filter = ScmpFilterContext::new(ScmpAction::Allow).map_err(scmp)?;
    // 2 = a binary tree of syscall numbers rather than a list.
    filter.set_ctl_optimize(2).map_err(scmp)?;
    // Syscalls of another ABI (i386's int 0x80, x32) would bypass a filter keyed on x86-64's
    // numbers: they end the whole task, not just the thread (libseccomp's default).
    filter
        .set_act_badarch(ScmpAction::KillProcess)
        .map_err(scmp)?;
    let eperm = ScmpAction::Errno(libc::EPERM);
    for &nr in DENIED {
        filter
            .add_rule(eperm, ScmpSyscall::from(nr as i32))
            .map_err(scmp)?;
    }
    for flag in NS_FLAGS {
        let flag = flag as u64;
        filter
            .add_rule_conditional(
                eperm,
                ScmpSyscall::from(libc::SYS_clone as i32),
                &[ScmpArgCompare::new(
                    0,
                    ScmpCompareOp::MaskedEqual(flag),
                    flag,
                )],
            )
            .map_err(scmp)?;
    }
    filter
        .add_rule(
            ScmpAction::Errno(libc::ENOSYS),
            ScmpSyscall::from(libc::SYS_clone3 as i32),
        )
        .map_err(scmp)?;
    refuse_families(&mut filter)?;
    export(&filter)
}

/// Makes `socket` and `socketpair` fail for every family but [`FAMILIES`]. libseccomp takes one
/// comparison per argument and rule, so the refused values below the highest allowed one are
/// listed and everything above it (a 64-bit compare, which also catches garbage in the upper
/// half of the register) is one rule.
fn refuse_families(filter: &mut ScmpFilterContext) -> Result<()> {
    let refuse = ScmpAction::Errno(libc::EAFNOSUPPORT);
    let highest = FAMILIES.iter().copied().max().unwrap_or(0) as u64;
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        let call = ScmpSyscall::from(nr as i32);
        let above = ScmpArgCompare::new(0, ScmpCompareOp::Greater, highest);
        filter
            .add_rule_conditional(refuse, call, &[above])
            .map_err(scmp)?;
        for family in (0..highest).filter(|f| !FAMILIES.contains(&(*f as libc::c_int))) {
            let is = ScmpArgCompare::new(0, ScmpCompareOp::Equal, family);
            filter
                .add_rule_conditional(refuse, call, &[is])
                .map_err(scmp)?;
        }
    }
    Ok(())
}

/// The filter as BPF instructions: libseccomp 2.5 exports only to a file descriptor.
fn export(filter: &ScmpFilterContext) -> Result<Program> {
    let io = |e: std::io::Error| Error::Seccomp(format!("cannot export the filter: {e}"));
    // SAFETY: a plain syscall with a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"agentnode-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    filter.export_bpf(&mut file).map_err(scmp)?;
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut file).map_err(io)?;
    file.read_to_end(&mut bytes).map_err(io)?;
    let size = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 || bytes.len() / size > usize::from(u16::MAX) {
        return Err(Error::Seccomp(format!(
            "libseccomp exported {} bytes, not a program",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_is_one_short_tree() {
        let prog = default_program().unwrap();
        assert!(
            (20..150).contains(&prog.len()),
            "{} instructions",
            prog.len()
        );
    }

    #[test]
    fn filter_denies_unshare_in_a_child() {
        let prog = default_program().unwrap();
        // SAFETY: the child sets no_new_privs, installs the prebuilt filter and returns.
        let code = unsafe {
            crate::sys::fork_and_wait(0, None, || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return 10;
                }
                install_and_probe(prog)
            })
        }
        .unwrap();
        assert_eq!(code, 0);
    }
}
