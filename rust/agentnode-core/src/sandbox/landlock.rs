//! The Landlock ruleset every task is restricted with: a scope, no file system or network
//! rules (those are the mount plan's and the egress layer's). Abstract unix sockets live in the
//! network namespace, so a task in a namespace of its own cannot reach the host's; a task on the
//! host's network (`--net host`) could reach any (D-Bus, X11, container shims) but for
//! `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET` (ABI 6, Linux 6.12), which limits it to the sockets of
//! its own domain: its own processes'.
//!
//! Landlock up to ABI 7 (Linux 6.18) has no right over connecting to a pathname socket; that
//! class is closed by the mount plan (see `plan::push_run` and `template`'s socket masks).
//!
//! Made once per process and kept open (close-on-exec): the child only calls
//! `landlock_restrict_self` on it, after `no_new_privs`.

use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::sync::OnceLock;

/// `struct landlock_ruleset_attr` of ABI 6.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

const CREATE_RULESET_VERSION: libc::c_ulong = 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
/// The first ABI with scopes.
const SCOPED_ABI: libc::c_long = 6;

/// This kernel's Landlock ABI version (0 when Landlock is absent or disabled at boot).
#[must_use]
pub fn abi() -> i64 {
    // SAFETY: the version query takes no attribute and returns a number or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    v.max(0)
}

/// The ruleset's descriptor, or `None` when the kernel has no scoped Landlock: then a task on
/// the host's network keeps the host's abstract sockets within reach (see the module's notes).
pub fn ruleset() -> Option<RawFd> {
    static RULESET: OnceLock<Option<OwnedFd>> = OnceLock::new();
    RULESET
        .get_or_init(|| {
            if abi() < SCOPED_ABI {
                return None;
            }
            let attr = RulesetAttr {
                handled_access_fs: 0,
                handled_access_net: 0,
                scoped: SCOPE_ABSTRACT_UNIX_SOCKET,
            };
            // SAFETY: a valid attribute of the size given; the result is a new descriptor or -1.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_landlock_create_ruleset,
                    &raw const attr,
                    std::mem::size_of::<RulesetAttr>(),
                    0usize,
                )
            };
            // SAFETY: a fresh descriptor we own (Landlock makes it close-on-exec).
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        })
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}
