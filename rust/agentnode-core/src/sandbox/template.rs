//! The template mount namespace: the host's read-only task root, built once ([`plan::template`])
//! in a namespace of its own that holds nothing else, and held only as a descriptor. A task
//! that fits it enters a private copy of it and adds only its own mounts ([`plan::from_template`]):
//! about 30 mount operations instead of 95, and no host mounts to copy and detach. Most enter a
//! copy made ahead ([`make_copy`], by the thread that makes network namespaces ahead), which
//! already has the task's /sys and /dev mounts: some 0.1 ms less of a start.
//!
//! The template is a snapshot of the host's mount table: `/proc/self/mountinfo` signals when
//! that changes, and the next start rebuilds it. A watcher thread drops a stale template at
//! once, as its copies of the host's mounts would keep an unmounted file system busy until then;
//! the copies made ahead of it go with it.
//! Nothing of it is mounted in the host's namespace, so the kernel frees it with the last
//! descriptor, when this process dies.
//! Tasks that do not fit (a user namespace, another rootfs, a bind whose mount point the
//! read-only template lacks) get the whole plan, as does every task when building fails.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::plan::{self, Op, Start};
use super::{child, sockets, Bind, Error, Result, Spec};

/// A task that kept it could remount the shared skeleton read-write.
const CAP_SYS_ADMIN: u32 = 21;

struct State {
    /// `None`: building failed; starts use the whole plan until the mount table changes.
    ns: Option<Arc<OwnedFd>>,
    /// Opened before the template was built; polls POLLPRI once the host's mounts change.
    mountinfo: File,
    /// The host's mounts the template was built from (see [`mounts`]).
    mounts: Option<String>,
    /// The host's sockets it masks (see [`sockets`]): a new one makes it stale.
    sockets: Arc<Vec<PathBuf>>,
    /// The stage it was built on, whose parent (the node's data dir) it hides.
    stage: PathBuf,
}

/// The host's mount table as far as the template is concerned: every line of mountinfo but the
/// nsfs mounts. `ip netns add` pins each egress task's network namespace with one, so tasks
/// coming and going would otherwise make the template stale at every start; the template
/// leaves them out (see [`unpin_namespaces`]), which also keeps one task from seeing another's.
fn mounts() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(
        text.lines()
            .filter(|l| !is_nsfs(l))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn is_nsfs(mountinfo_line: &str) -> bool {
    mountinfo_line
        .split_once(" - ")
        .is_some_and(|(_, rest)| rest.starts_with("nsfs "))
}

/// Whether the template in `state` no longer matches the host's mounts.
fn stale(state: &State) -> bool {
    if !Arc::ptr_eq(&state.sockets, &sockets::in_root()) {
        return true;
    }
    match changed(&state.mountinfo, 0) {
        Ok(false) => false,
        _ => state.mounts.is_none() || mounts() != state.mounts,
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// A task's filesystem plan and the descriptors its steps name, which must stay open until
/// the task is cloned.
pub struct Planned {
    pub ops: Vec<Op>,
    /// The plan starts in a copy of the template, so the clone makes no mount namespace.
    pub from_template: bool,
    /// The copy made ahead that the task enters, for it to hold once started (see
    /// [`crate::background::later`]); when `None`, a template task announces its own copy.
    pub made: Option<OwnedFd>,
    _held: Vec<OwnedFd>,
    _ns: Option<Arc<OwnedFd>>,
}

/// A copy of the template made ahead for one task, with [`plan::made_ahead`]'s mounts in it.
pub struct MadeCopy {
    pub(super) ns: OwnedFd,
    /// The template it copies: a task started after the template was rebuilt cannot use it.
    pub(super) from: Arc<OwnedFd>,
}

/// The plan for `spec`: from the template when the task fits it (in `made`, when that copy is
/// of the current template), the whole plan otherwise.
pub fn plan(spec: &Spec, made: Option<MadeCopy>) -> Result<Planned> {
    let Some(ns) = serving(spec) else {
        return Ok(Planned {
            ops: plan::build(spec)?,
            from_template: false,
            made: None,
            _held: Vec::new(),
            _ns: None,
        });
    };
    let made = made.filter(|m| Arc::ptr_eq(&m.from, &ns)).map(|m| m.ns);
    let trees = trees(spec)?;
    let raw: Vec<RawFd> = trees.iter().map(AsRawFd::as_raw_fd).collect();
    let start = match &made {
        Some(copy) => Start::Made(copy.as_raw_fd()),
        None => Start::Own(ns.as_raw_fd()),
    };
    Ok(Planned {
        ops: plan::from_template(spec, start, &raw)?,
        from_template: true,
        made,
        _held: trees,
        _ns: Some(ns),
    })
}

/// Detached trees of the task's workspace (when it has one) then of each bind, in order, for
/// [`plan::from_template`].
pub(super) fn trees(spec: &Spec) -> Result<Vec<OwnedFd>> {
    let mut trees = Vec::new();
    if let Some(ws) = &spec.workspace {
        trees.push(detach(ws, true, "workspace")?);
    }
    for b in &spec.binds {
        let what = if b.writable {
            "--rw source"
        } else {
            "--ro source"
        };
        trees.push(detach(&b.src, b.writable, what)?);
    }
    Ok(trees)
}

/// The template namespace `spec` can start from (built first when there is none, or the host's
/// mounts changed), or `None` when the task does not fit it or there is none.
pub(super) fn serving(spec: &Spec) -> Option<Arc<OwnedFd>> {
    fits(spec).then(|| current(&spec.stage)).flatten()
}

/// A copy of the current template (none while there is none or the host's mounts changed)
/// with [`plan::made_ahead`]'s mounts, its /sys showing the network namespace `net`. Made on
/// the thread that makes network namespaces ahead (see [`super::netns`]), which leaves its
/// namespaces to do it and returns to its mount namespace and to `home_net`.
pub fn make_copy(net: BorrowedFd<'_>, home_net: &File) -> Option<MadeCopy> {
    // The same steps for every copy: planned once.
    static MADE_AHEAD: OnceLock<Option<Vec<Op>>> = OnceLock::new();
    let from = {
        let guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
        let state = guard.as_ref()?;
        if stale(state) {
            return None;
        }
        state.ns.clone()?
    };
    let ops = MADE_AHEAD
        .get_or_init(|| plan::made_ahead().ok())
        .as_ref()?;
    let me = File::open("/proc/thread-self").ok()?;
    let home_mnt = File::open("/proc/thread-self/ns/mnt").ok()?;
    // SAFETY: these affect this thread only (its own fs_struct first, as a thread that shares
    // one may not change mount namespace), and it returns to its namespaces below.
    let entered = unsafe {
        libc::unshare(libc::CLONE_FS) == 0
            && libc::setns(from.as_raw_fd(), libc::CLONE_NEWNS) == 0
            && libc::unshare(libc::CLONE_NEWNS) == 0
    };
    // Only in a copy of its own: a failure above may have left the thread in the template.
    let ns = entered
        .then(|| {
            // SAFETY: as above; the ops are the plan's, run in the copy.
            let made = unsafe { libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) } == 0
                && ops.iter().all(|op| unsafe { child::run_op(op) }.is_ok());
            made.then(|| open_ns(&me)).flatten()
        })
        .flatten();
    // SAFETY: back into the namespaces this thread started in.
    let back = unsafe {
        libc::setns(home_net.as_raw_fd(), libc::CLONE_NEWNET) == 0
            && libc::setns(home_mnt.as_raw_fd(), libc::CLONE_NEWNS) == 0
    };
    // A thread stranded in a task's namespaces must make nothing more.
    assert!(back, "cannot return to this process's namespaces");
    // The watcher forgets the copies ready when the template goes stale; this one was not
    // ready yet, so it checks for itself.
    is_current(&from).then_some(MadeCopy { ns: ns?, from })
}

/// Whether `template` is the current template (not dropped for a change of the host's mounts).
pub(super) fn is_current(template: &Arc<OwnedFd>) -> bool {
    STATE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|s| s.ns.as_ref())
        .is_some_and(|ns| Arc::ptr_eq(ns, template))
}

/// This thread's mount namespace, through its /proc directory opened before it left.
fn open_ns(thread_dir: &File) -> Option<OwnedFd> {
    // SAFETY: a valid directory descriptor and C string; the result is checked.
    let fd = unsafe {
        libc::openat(
            thread_dir.as_raw_fd(),
            c"ns/mnt".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a fresh descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn fits(spec: &Spec) -> bool {
    // A mount namespace owned by this user namespace cannot be entered from a new one.
    spec.rootfs == Path::new("/")
        && spec.userns_base.is_none()
        && !spec.keep_caps.contains(&CAP_SYS_ADMIN)
        && spec
            .binds
            .iter()
            .all(|b| plan::on_fresh(spec, b) || has_point(b))
}

/// Whether the template has the bind's mount point: a host path of the source's kind, reached
/// without symlinks (which could lead onto the task's own /proc), outside the fresh mounts.
fn has_point(b: &Bind) -> bool {
    // The template's /run is an empty tmpfs but for the node's own directory.
    if ["/proc", "/sys", "/dev", "/run"]
        .iter()
        .any(|f| b.dest.starts_with(f))
    {
        return false;
    }
    let Ok(real) = std::fs::canonicalize(&b.dest) else {
        return false;
    };
    match (std::fs::metadata(&real), std::fs::metadata(&b.src)) {
        (Ok(d), Ok(s)) => real == b.dest && real != Path::new("/") && d.is_dir() == s.is_dir(),
        _ => false,
    }
}

/// The template namespace, rebuilt first when the host's mounts changed since it was built.
pub(super) fn current(stage: &Path) -> Option<Arc<OwnedFd>> {
    static WATCHER: OnceLock<()> = OnceLock::new();
    WATCHER.get_or_init(|| {
        // Without it, a stale template lives until the next start: nothing worse.
        let _ = std::thread::Builder::new()
            .name("agentnode-mounts".into())
            .spawn(watch);
    });
    let mut guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.as_ref().is_none_or(|s| stale(s) || s.stage != stage) {
        // Opened first, so a change while the template is built shows at the next start.
        let mountinfo = File::open("/proc/self/mountinfo").ok()?;
        let mounts = mounts();
        let sockets = sockets::in_root();
        *guard = Some(State {
            ns: build(stage).ok().map(Arc::new),
            mountinfo,
            mounts,
            sockets,
            stage: stage.to_owned(),
        });
    }
    guard.as_ref()?.ns.clone()
}

/// Drops the template whenever the host's mounts or bound sockets change (the next start builds
/// a new one).
fn watch() {
    let Ok(mountinfo) = File::open("/proc/self/mountinfo") else {
        return;
    };
    let refresh = i32::try_from(sockets::REFRESH.as_millis()).unwrap_or(1000);
    let mut refreshed = std::time::Instant::now();
    loop {
        let change = changed(&mountinfo, refresh);
        // On a busy host the mount table changes more often than the refresh period: the
        // sockets are read on the clock, whatever woke the watcher.
        if refreshed.elapsed() >= sockets::REFRESH {
            refreshed = std::time::Instant::now();
            if sockets::refresh() {
                drop_template(STATE.lock().unwrap_or_else(PoisonError::into_inner));
            }
        }
        match change {
            Ok(true) => {
                let guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
                if guard
                    .as_ref()
                    .is_some_and(|s| s.mounts.is_none() || mounts() != s.mounts)
                {
                    drop_template(guard);
                }
            }
            Ok(false) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Drops the template and the copies and zygotes made from it.
fn drop_template(mut guard: std::sync::MutexGuard<'_, Option<State>>) {
    *guard = None;
    drop(guard);
    crate::background::ahead::template_changed();
}

/// Whether the mount table changed since `mountinfo` was opened or last reported a change,
/// waiting up to `timeout_ms` (-1: until it does).
fn changed(mountinfo: &File, timeout_ms: libc::c_int) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: mountinfo.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&raw mut pfd, 1, timeout_ms) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pfd.revents & (libc::POLLPRI | libc::POLLERR) != 0)
}

/// Builds the template on `stage` in a thread of its own (its namespace and root change, then
/// it ends) and returns the namespace.
pub(super) fn build(stage: &Path) -> Result<OwnedFd> {
    let ops = plan::template(stage)?;
    std::thread::scope(|s| s.spawn(|| build_here(&ops)).join()).unwrap_or_else(|_| {
        Err(Error::Invalid {
            what: "template build",
            why: "its thread panicked".to_owned(),
        })
    })
}

fn build_here(ops: &[Op]) -> Result<OwnedFd> {
    let setup = |step: String| move |source| Error::Setup { step, source };
    // SAFETY: affects this thread only, which ends after the build.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(setup("unshare the template's mount namespace".to_owned())(
            e,
        ));
    }
    let ns = File::open("/proc/thread-self/ns/mnt")
        .map_err(setup("open the template's mount namespace".to_owned()))?;
    for op in ops {
        if let Op::PivotRoot(stage) = op {
            // The last moment this thread still sees the host's /proc to list them.
            let stage = Path::new(std::ffi::OsStr::from_bytes(stage.as_bytes()));
            unpin_namespaces(stage)
                .map_err(setup("unmount namespace pins in the template".to_owned()))?;
        }
        // SAFETY: raw syscalls on the plan's strings, in this thread's own namespace.
        unsafe { child::run_op(op) }
            .map_err(|e| setup(op.describe())(std::io::Error::from_raw_os_error(e)))?;
    }
    Ok(ns.into())
}

/// Unmounts the nsfs mounts under `stage` that the template copied from the host
/// (`/run/netns/*`): each pins a namespace (another task's network, say) for as long as the
/// template lives.
fn unpin_namespaces(stage: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
    for line in text.lines().filter(|l| is_nsfs(l)) {
        // Field 5 is the mount point, with spaces and the like octal-escaped.
        let Some(point) = line.split(' ').nth(4).map(unescape) else {
            continue;
        };
        if !point.starts_with(stage) {
            continue;
        }
        let path = plan::cstr(point)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        // SAFETY: a valid C string; in this thread's own namespace.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A mountinfo path with its `\ooo` octal escapes decoded.
fn unescape(field: &str) -> std::path::PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out).into()
}

/// A detached copy of the mount tree at `src` (read-only unless `writable`), to be moved into
/// a task's namespace.
fn detach(src: &Path, writable: bool, what: &'static str) -> Result<OwnedFd> {
    let path = plan::cstr(src)?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: a valid C string; the result is a fresh descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::BadPath {
            what,
            path: src.to_owned(),
            why: "cannot be bound (does it exist?)",
        });
    }
    // SAFETY: the fresh descriptor open_tree returned.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    if !writable {
        let attr = [libc::MOUNT_ATTR_RDONLY, 0, 0, 0];
        // SAFETY: the tree's descriptor, an empty path and a mount_attr of the kernel's size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if r != 0 {
            let source = std::io::Error::last_os_error();
            return Err(Error::Io {
                what: "make a bind read-only",
                source,
            });
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsfs_lines_and_escaped_paths() {
        let pin = "612 27 0:4 net:[4026532512] /run/netns/a\\040b rw shared:5 - nsfs nsfs rw";
        let root = "25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw";
        assert!(is_nsfs(pin));
        assert!(!is_nsfs(root));
        assert_eq!(unescape("/run/netns/a\\040b"), Path::new("/run/netns/a b"));
        assert_eq!(unescape("/plain\\9"), Path::new("/plain\\9"));
    }
}
