//! The default seccomp filter, modelled on Docker's default profile: everything is allowed
//! except the calls that reach past the sandbox (mounting, loading code into the kernel, tracing
//! other processes, creating namespaces, ...), which fail with `EPERM`. `clone3` fails with
//! `ENOSYS` instead, as in Docker, because its flags live in memory a filter cannot inspect and
//! libc falls back to `clone`, whose namespace flags the filter does check.
//!
//! Written out as one classic BPF program before the clone; the child only installs it. Calls
//! through another ABI than the native one (x32 on `x86_64` included) kill the task.

use seccompiler::BpfProgram;

use super::{Error, Result};

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

/// `AUDIT_ARCH_*` of the native system call ABI: the filter kills a task that makes a call
/// through any other (whose numbers mean other calls).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 0xC000_00F3;

/// Calls numbered from here on are x32 calls, which share the `AUDIT_ARCH` of `x86_64`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (`<linux/bpf_common.h>`) and `struct seccomp_data` offsets.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
#[cfg(target_arch = "x86_64")]
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of the first argument, where every namespace flag of `clone` lives.
const ARG0_LO: u32 = if cfg!(target_endian = "little") {
    16
} else {
    20
};

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// Where a jump goes: the next instruction, or one of the returns at the end.
#[derive(Clone, Copy, PartialEq)]
enum To {
    Next,
    Kill,
    Eperm,
    Enosys,
    Clone,
}

/// The default filter, built once per process (it never changes), as programs to install in
/// order (one).
pub fn default_programs() -> Result<&'static [BpfProgram]> {
    static PROGRAMS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();
    if let Some(p) = PROGRAMS.get() {
        return Ok(p);
    }
    let built = vec![build()?];
    Ok(PROGRAMS.get_or_init(|| built))
}

/// One program, written out: seccompiler makes one program per action (here `EPERM` and
/// `ENOSYS`), and installing a filter costs about 0.1 ms here whatever its length (strace:
/// 130 us per call for 285 and for 10 instructions). A check of the ABI, then one comparison per
/// denied call; the allowed path falls through to the end.
fn build() -> Result<BpfProgram> {
    let ns_mask = NS_FLAGS.iter().fold(0u32, |m, &f| m | f as u32);
    // (opcode, k, where to jump when true); false always goes on to the next instruction.
    let mut code: Vec<(u16, u32, To)> = vec![
        (LD_W_ABS, ARCH, To::Next),
        (JEQ_K, AUDIT_ARCH, To::Next), // patched below: true skips the kill
        (RET_K, RET_KILL_PROCESS, To::Next),
        (LD_W_ABS, NR, To::Next),
    ];
    #[cfg(target_arch = "x86_64")]
    code.push((JGE_K, X32_SYSCALL_BIT, To::Kill));
    code.extend(DENIED.iter().map(|&nr| (JEQ_K, nr as u32, To::Eperm)));
    code.push((JEQ_K, libc::SYS_clone as u32, To::Clone));
    code.push((JEQ_K, libc::SYS_clone3 as u32, To::Enosys));
    code.push((RET_K, RET_ALLOW, To::Next));
    let clone_at = code.len();
    code.push((LD_W_ABS, ARG0_LO, To::Next));
    code.push((JSET_K, ns_mask, To::Eperm));
    code.push((RET_K, RET_ALLOW, To::Next));
    let ret_at = |to: To| match to {
        To::Enosys => clone_at + 3,
        To::Eperm => clone_at + 4,
        To::Kill => clone_at + 5,
        To::Clone => clone_at,
        To::Next => 0,
    };
    code.push((RET_K, RET_ERRNO | libc::ENOSYS as u32, To::Next));
    code.push((RET_K, RET_ERRNO | libc::EPERM as u32, To::Next));
    code.push((RET_K, RET_KILL_PROCESS, To::Next));
    code.iter()
        .enumerate()
        .map(|(i, &(op, k, to))| {
            let jt = match (i, to) {
                (1, _) => 1, // the arch matches: over the kill
                (_, To::Next) => 0,
                (_, to) => u8::try_from(ret_at(to) - i - 1)
                    .map_err(|_| Error::Seccomp("a jump is too long".to_owned()))?,
            };
            Ok(seccompiler::sock_filter {
                code: op,
                jt,
                jf: 0,
                k,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_compile() {
        let progs = default_programs().unwrap();
        assert_eq!(progs.len(), 1);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn filter_denies_unshare_in_a_child() {
        let progs = default_programs().unwrap();
        // SAFETY: the child only makes raw syscalls and returns.
        let code = unsafe {
            crate::sys::fork_and_wait(0, None, || {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return 10;
                }
                for p in progs {
                    if seccompiler::apply_filter(p).is_err() {
                        return 11;
                    }
                }
                let fails_with =
                    |r: libc::c_long, errno: i32| r == -1 && *libc::__errno_location() == errno;
                let null = std::ptr::null::<libc::c_void>();
                let checks = [
                    fails_with(libc::unshare(libc::CLONE_NEWUTS).into(), libc::EPERM),
                    fails_with(
                        libc::syscall(libc::SYS_mount, null, null, null, 0, null),
                        libc::EPERM,
                    ),
                    fails_with(libc::syscall(libc::SYS_bpf, 0, null, 0), libc::EPERM),
                    fails_with(
                        libc::syscall(libc::SYS_clone, libc::CLONE_NEWNET | libc::SIGCHLD, 0),
                        libc::EPERM,
                    ),
                    fails_with(libc::syscall(libc::SYS_clone3, null, 0), libc::ENOSYS),
                    libc::syscall(libc::SYS_getppid) > 0,
                ];
                checks
                    .iter()
                    .position(|ok| !ok)
                    .map_or(0, |i| 20 + i as i32)
            })
        }
        .unwrap();
        assert_eq!(code, 0);
    }
}
