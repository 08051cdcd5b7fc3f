//! The default seccomp filter, modelled on Docker's default profile: everything is allowed
//! except the calls that reach past the sandbox (mounting, loading code into the kernel, tracing
//! other processes, creating namespaces, ...), which fail with `EPERM`. `clone3` fails with
//! `ENOSYS` instead, as in Docker, because its flags live in memory a filter cannot inspect and
//! libc falls back to `clone`, whose namespace flags the filter does check.
//!
//! Built with `seccompiler` before the fork; the child only installs the finished programs.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

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

fn arch() -> Result<seccompiler::TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(|e| Error::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

/// The default filter, compiled once per process (it never changes), as programs to install
/// in order.
pub fn default_programs() -> Result<&'static [BpfProgram]> {
    static PROGRAMS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();
    if let Some(p) = PROGRAMS.get() {
        return Ok(p);
    }
    let built = build()?;
    Ok(PROGRAMS.get_or_init(|| built))
}

fn build() -> Result<Vec<BpfProgram>> {
    let seccomp = |e: seccompiler::BackendError| Error::Seccomp(e.to_string());
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NS_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .map_err(seccomp)?])
            .map_err(seccomp)
        })
        .collect::<Result<Vec<_>>>()?;
    eperm.insert(libc::SYS_clone, clone_rules);
    let enosys = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    Ok(vec![
        compile(eperm, libc::EPERM)?,
        compile(enosys, libc::ENOSYS)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_compile() {
        let progs = default_programs().unwrap();
        assert_eq!(progs.len(), 2);
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
                let r = libc::unshare(libc::CLONE_NEWUTS);
                let e = *libc::__errno_location();
                i32::from(!(r == -1 && e == libc::EPERM))
            })
        }
        .unwrap();
        assert_eq!(code, 0);
    }
}
