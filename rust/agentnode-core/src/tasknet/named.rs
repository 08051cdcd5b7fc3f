//! Network namespaces named under `/run/netns`, the way iproute2 names them (so `ip netns`,
//! `ip -n` and `nsenter --net=/run/netns/NAME` see ours): a bind mount of the namespace's
//! nsfs file on an empty file there, with `/run/netns` itself a shared mount, so a mount
//! namespace copied from ours later still sees the names made since and loses those removed.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where named network namespaces live.
const RUN_NETNS: &str = "/run/netns";

/// The path of the namespace named `name`.
pub(super) fn path(name: &str) -> PathBuf {
    Path::new(RUN_NETNS).join(name)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn mount(source: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (source, target) = (cstring(source)?, cstring(target)?);
    // SAFETY: two NUL-terminated paths and a literal; no data argument.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"none".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `/run/netns` and makes it a shared mount (a bind mount on itself first when it is
/// not a mount point), as `ip netns add` does; once per process.
fn shared_dir() -> io::Result<()> {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let dir = Path::new(RUN_NETNS);
    match fs::DirBuilder::new()
        .mode(0o755)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let shared = libc::MS_SHARED | libc::MS_REC;
    match mount(Path::new("none"), dir, shared) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(dir, dir, libc::MS_BIND | libc::MS_REC)?;
            mount(Path::new("none"), dir, shared)?;
        }
        r => r?,
    }
    DONE.store(true, Ordering::Relaxed);
    Ok(())
}

/// Names the network namespace `netns` (a descriptor of it) `name`; `AlreadyExists` when
/// the name is taken (nothing is changed then).
pub(super) fn bind(name: &str, netns: BorrowedFd<'_>) -> io::Result<()> {
    shared_dir()?;
    let target = path(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&target)?;
    let source = PathBuf::from(format!("/proc/self/fd/{}", netns.as_raw_fd()));
    if let Err(e) = mount(&source, &target, libc::MS_BIND) {
        let _ = fs::remove_file(&target);
        return Err(e);
    }
    Ok(())
}

/// Removes the name `name` (the namespace goes when nothing else holds it); `false` when
/// there was none.
pub(super) fn remove(name: &str) -> io::Result<bool> {
    let target = path(name);
    let c = cstring(&target)?;
    // SAFETY: a NUL-terminated path. Detached: a process that still has it open keeps its
    // descriptor, as with `ip netns del`.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: a file that is no mount point (a name whose mount never happened).
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(e);
        }
    }
    match fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
