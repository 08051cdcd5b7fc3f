//! The filesystem plan: every mount, directory and link the child makes to build its root,
//! computed with allocations in the parent so the child only walks a finished list. Two ways:
//! the whole root on a staging tmpfs, entered with `pivot_root` ([`build`]), or a copy of the
//! template namespace with only the task's own mounts on top ([`from_template`]); that copy may
//! have been made ahead with /sys and /dev's mounts in it ([`made_ahead`]).

use std::ffi::CString;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::fresh::{is_fresh, under_fresh};
use super::{Bind, Error, Result, Spec};

/// One step the child takes. Every string is ready-made.
#[derive(Debug)]
pub enum Op {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    MkDir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    /// `mount_setattr(MOUNT_ATTR_RDONLY)`, recursively or not.
    ReadOnly {
        path: CString,
        recursive: bool,
    },
    /// Hides a /proc or /sys path as runc does: /dev/null over files, read-only tmpfs over dirs.
    /// `dir` is the kind the host's path has, tried first (the other one if the task's differs).
    Mask {
        path: CString,
        dir: bool,
    },
    PivotRoot(CString),
    /// `setns` into a template mount namespace, then `unshare` a private copy of it.
    EnterCopy(RawFd),
    /// `setns` into a copy of the template made ahead for this task alone.
    EnterMade(RawFd),
    /// `move_mount` of a detached mount tree onto `dst`.
    Attach {
        tree: RawFd,
        dst: CString,
    },
}

impl Op {
    /// What this step does, for the error message when it fails.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mount {
                src, dst, fstype, ..
            } => format!(
                "mount {} ({}) on {}",
                src.as_ref().map_or_else(|| "-".to_owned(), s),
                fstype.as_ref().map_or_else(|| "bind".to_owned(), s),
                s(dst)
            ),
            Op::MkDir(p) => format!("create mount point {}", s(p)),
            Op::Touch(p) => format!("create file mount point {}", s(p)),
            Op::Symlink { path, .. } => format!("create symlink {}", s(path)),
            Op::ReadOnly { path, .. } => format!("make {} read-only", s(path)),
            Op::Mask { path, .. } => format!("mask {}", s(path)),
            Op::PivotRoot(p) => format!("pivot_root into {}", s(p)),
            Op::EnterCopy(_) => "enter a copy of the template mount namespace".to_owned(),
            Op::EnterMade(_) => "enter the mount namespace made ahead for the task".to_owned(),
            Op::Attach { dst, .. } => format!("move a bind's mount tree onto {}", s(dst)),
        }
    }
}

pub(crate) fn cstr(p: impl AsRef<Path>) -> Result<CString> {
    CString::new(p.as_ref().as_os_str().as_bytes()).map_err(|_| Error::BadPath {
        what: "path",
        path: p.as_ref().to_owned(),
        why: "contains a NUL byte",
    })
}

fn bind(src: &Path, dst: &Path) -> Result<Op> {
    Ok(Op::Mount {
        src: Some(cstr(src)?),
        dst: cstr(dst)?,
        fstype: None,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
    })
}

fn fs(fstype: &str, dst: &Path, flags: libc::c_ulong, data: &str) -> Result<Op> {
    Ok(Op::Mount {
        src: Some(cstr(fstype)?),
        dst: cstr(dst)?,
        fstype: Some(cstr(fstype)?),
        flags,
        data: (!data.is_empty()).then(|| cstr(data)).transpose()?,
    })
}

/// Paths runc masks in /proc and /sys.
const MASKED: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "proc/sysrq-trigger",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];
/// Which `MASKED` paths are directories on the host, read once: the task's /proc and /sys are
/// fresh mounts of the same kernel, so the task's paths have the same kinds.
fn masked_dirs() -> &'static [bool] {
    static DIRS: OnceLock<Vec<bool>> = OnceLock::new();
    DIRS.get_or_init(|| {
        MASKED
            .iter()
            .map(|p| Path::new("/").join(p).is_dir())
            .collect()
    })
}
/// Paths runc makes read-only in /proc.
const READ_ONLY: &[&str] = &["proc/bus", "proc/fs", "proc/irq", "proc/sys"];
/// Where the node binds its task socket and a task's checkpoint: a tmpfs of each task's own in
/// the read-only /run, so those binds have mount points to land on.
const NODE_RUN: &str = "run/agentnode";
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// Builds the plan that turns `spec.stage` into the task's root and pivots into it.
pub fn build(spec: &Spec) -> Result<Vec<Op>> {
    let stage = spec.stage.as_path();
    let mut ops = skeleton(&spec.rootfs, stage, spec.workspace.is_some())?;
    // A bind into /tmp or /workspace needs its mount point on that fresh mount, so it is made
    // after the mount; every other one now, before the root turns read-only.
    let mut points = Vec::new();
    for b in &spec.binds {
        points.push(if on_fresh(spec, b) {
            None
        } else {
            Some(push_bind_point(&mut ops, stage, b)?)
        });
    }
    ops.push(Op::ReadOnly {
        path: cstr(stage)?,
        recursive: true,
    });
    let mut attach = |ops: &mut Vec<Op>, src: &Path, point: &Path, writable: bool| {
        ops.push(bind(src, point)?);
        if !writable {
            ops.push(Op::ReadOnly {
                path: cstr(point)?,
                recursive: true,
            });
        }
        Ok(())
    };
    push_task_fs(&mut ops, stage, spec, points, Ahead::Nothing, &mut attach)?;
    ops.push(Op::PivotRoot(cstr(stage)?));
    Ok(ops)
}

/// The plan that turns `stage` into the read-only root of the host shared by every task that
/// starts from a template namespace (see [`super::template`]), and pivots into it.
pub fn template(stage: &Path) -> Result<Vec<Op>> {
    let mut ops = skeleton(Path::new("/"), stage, true)?;
    ops.push(Op::ReadOnly {
        path: cstr(stage)?,
        recursive: true,
    });
    ops.push(Op::PivotRoot(cstr(stage)?));
    Ok(ops)
}

/// How a task that starts from the template gets its copy of it.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    /// It copies the template namespace itself.
    Own(RawFd),
    /// It enters a copy made ahead, whose /sys and /dev mounts are in place ([`made_ahead`]).
    Made(RawFd),
    /// It is a zygote already in such a copy, with its /proc mounted too ([`zygote_boot`]).
    Booted,
}

/// The plan of a task that starts from the template namespace: a private copy of it, then
/// only the task's own mounts. `trees` are detached mount trees for the workspace (when there
/// is one) then each bind, in order, moved into place.
pub fn from_template(spec: &Spec, start: Start, trees: &[RawFd]) -> Result<Vec<Op>> {
    let root = Path::new("/");
    let (mut ops, ahead) = match start {
        Start::Own(ns) => (vec![Op::EnterCopy(ns)], Ahead::Nothing),
        Start::Made(ns) => (vec![Op::EnterMade(ns)], Ahead::SysDev),
        Start::Booted => (Vec::new(), Ahead::SysDevProc),
    };
    let points = spec
        .binds
        .iter()
        .map(|b| (!on_fresh(spec, b)).then(|| b.dest.clone()))
        .collect();
    let mut trees = trees.iter();
    let mut attach = |ops: &mut Vec<Op>, _: &Path, point: &Path, _: bool| {
        let fd = *trees.next().ok_or_else(|| Error::Invalid {
            what: "mount plan",
            why: "a bind has no detached tree".to_owned(),
        })?;
        ops.push(Op::Attach {
            tree: fd,
            dst: cstr(point)?,
        });
        Ok(())
    };
    push_task_fs(&mut ops, root, spec, points, ahead, &mut attach)?;
    Ok(ops)
}

/// What a zygote does before it waits for its task: enter the copy made ahead for it (`copy`)
/// and mount its /proc, which only a process in the task's pid namespace can.
pub fn zygote_boot(copy: RawFd) -> Result<Vec<Op>> {
    let mut ops = vec![Op::EnterMade(copy)];
    push_proc(&mut ops, Path::new("/"))?;
    Ok(ops)
}

/// What a copy of the template made ahead gets before any task enters it: /sys (made while in
/// the task's network namespace, whose devices it shows) and /dev's devpts and shm, the mounts
/// of a task's own that need neither its pid namespace nor its spec.
pub fn made_ahead() -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    push_sys_dev(&mut ops, Path::new("/"))?;
    Ok(ops)
}

/// Whether a bind lands on one of the task's fresh mounts (its mount point is made after it).
pub fn on_fresh(spec: &Spec, b: &Bind) -> bool {
    b.dest.starts_with("/tmp")
        || b.dest.starts_with(Path::new("/").join(NODE_RUN))
        || spec.workspace.is_some() && b.dest.starts_with("/workspace")
}

/// Which of a task's own mounts were made before it started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ahead {
    Nothing,
    /// [`made_ahead`]'s.
    SysDev,
    /// [`made_ahead`]'s and [`zygote_boot`]'s.
    SysDevProc,
}

/// Puts `attach(ops, source, mount point, writable)` for one bind in the plan.
type AttachFn<'a> = dyn FnMut(&mut Vec<Op>, &Path, &Path, bool) -> Result<()> + 'a;

/// The staging tmpfs with `rootfs`'s entries bound in, the mount points of the fresh file
/// systems and the skeleton of /dev, everything still writable.
fn skeleton(rootfs: &Path, stage: &Path, workspace: bool) -> Result<Vec<Op>> {
    let at = |rel: &str| stage.join(rel);
    let mut ops = vec![
        // Nothing the task mounts may leak back to the host, nor host mounts into the task.
        Op::Mount {
            src: None,
            dst: cstr("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        fs("tmpfs", stage, NOSUID_NODEV, "size=1m,mode=755")?,
        // The stage sits under a root entry (/var with the default data dir): unbindable, it is
        // left out of that entry's recursive bind, which would otherwise copy the half-built
        // stage into the task's /var (some 20 more mounts to make, make read-only and tear down).
        Op::Mount {
            src: None,
            dst: cstr(stage)?,
            fstype: None,
            flags: libc::MS_UNBINDABLE,
            data: None,
        },
    ];
    let entries = std::fs::read_dir(rootfs).map_err(|_| Error::BadPath {
        what: "rootfs",
        path: rootfs.to_owned(),
        why: "is not a readable directory",
    })?;
    let mut names: Vec<_> = entries.filter_map(std::result::Result::ok).collect();
    names.sort_by_key(std::fs::DirEntry::file_name);
    for entry in names {
        let name = entry.file_name();
        if is_fresh(&name) {
            continue;
        }
        let (src, dst) = (entry.path(), stage.join(&name));
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(|_| Error::BadPath {
                what: "rootfs entry",
                path: src.clone(),
                why: "is an unreadable symlink",
            })?;
            ops.push(Op::Symlink {
                target: cstr(target)?,
                path: cstr(&dst)?,
            });
            continue;
        }
        ops.push(if kind.is_dir() {
            Op::MkDir(cstr(&dst)?)
        } else {
            Op::Touch(cstr(&dst)?)
        });
        ops.push(bind(&src, &dst)?);
    }
    // Every mount point on the staging tmpfs first, so that one recursive read-only pass covers
    // the root, the host binds and /dev (about 30 fewer steps than one per entry); the mounts
    // made after it (/proc, /tmp, /workspace, --rw) are new and keep their own modes.
    for fresh in ["proc", "sys", "dev", "tmp"] {
        ops.push(Op::MkDir(cstr(at(fresh))?));
    }
    if workspace {
        ops.push(Op::MkDir(cstr(at("workspace"))?));
    }
    push_dev(&mut ops, stage)?;
    push_run(&mut ops, rootfs, stage)?;
    push_socket_masks(&mut ops, rootfs, stage)?;
    push_data_dir_mask(&mut ops, rootfs, stage)?;
    Ok(ops)
}

/// The node's data dir, the stage's parent, under an empty read-only tmpfs: it holds every
/// tenant's stores and workspaces, and a task sees the host's root. A task's own workspace and
/// binds come from the host's paths, which the mask (on the stage) leaves as they are.
fn push_data_dir_mask(ops: &mut Vec<Op>, rootfs: &Path, stage: &Path) -> Result<()> {
    if rootfs != Path::new("/") {
        return Ok(());
    }
    let Some(data) = stage.parent().and_then(|d| std::fs::canonicalize(d).ok()) else {
        return Ok(());
    };
    let Ok(rel) = data.strip_prefix("/") else {
        return Ok(());
    };
    if rel.as_os_str().is_empty() || under_fresh(&data) {
        return Ok(());
    }
    ops.push(Op::Mask {
        path: cstr(stage.join(rel))?,
        dir: true,
    });
    Ok(())
}

/// An empty /run (read-only with the root) but for the node's own directory and what the host's
/// /etc/resolv.conf leads to when that lies in /run (systemd-resolved's stub file): a task
/// resolves names as on the host, and reaches none of the host's runtime sockets.
fn push_run(ops: &mut Vec<Op>, rootfs: &Path, stage: &Path) -> Result<()> {
    let at = |rel: &str| stage.join(rel);
    ops.push(Op::MkDir(cstr(at("run"))?));
    ops.push(fs(
        "tmpfs",
        &at("run"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        "size=64k,mode=755",
    )?);
    ops.push(Op::MkDir(cstr(at(NODE_RUN))?));
    if rootfs != Path::new("/") {
        return Ok(());
    }
    let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") else {
        return Ok(());
    };
    let Ok(rel) = resolv.strip_prefix("/run") else {
        return Ok(());
    };
    if !resolv.is_file() {
        return Ok(());
    }
    let mut cur = at("run");
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        ops.push(if i + 1 < comps.len() {
            Op::MkDir(cstr(&cur)?)
        } else {
            Op::Touch(cstr(&cur)?)
        });
    }
    ops.push(bind(&resolv, &cur)?);
    Ok(())
}

/// /dev/null over every host socket under `rootfs` that the root shows (not those under its
/// fresh entries), before the root turns read-only (see [`super::sockets`]).
fn push_socket_masks(ops: &mut Vec<Op>, rootfs: &Path, stage: &Path) -> Result<()> {
    let bound = super::sockets::bound();
    for rel in super::sockets::under(&bound, rootfs) {
        if under_fresh(&Path::new("/").join(rel)) {
            continue;
        }
        ops.push(Op::Mask {
            path: cstr(stage.join(rel))?,
            dir: false,
        });
    }
    Ok(())
}

/// The mounts every task gets fresh, on the read-only root at `root`: /proc, /sys, /dev/pts,
/// /dev/shm (unless `made` ahead), /tmp, the workspace, then the binds (`points`: each one's
/// mount point when it exists already, `None` when it is made here).
fn push_task_fs(
    ops: &mut Vec<Op>,
    root: &Path,
    spec: &Spec,
    points: Vec<Option<PathBuf>>,
    ahead: Ahead,
    attach: &mut AttachFn<'_>,
) -> Result<()> {
    let at = |rel: &str| root.join(rel);
    if ahead != Ahead::SysDevProc {
        push_proc(ops, root)?;
    }
    if ahead == Ahead::Nothing {
        push_sys_dev(ops, root)?;
    }
    ops.push(fs(
        "tmpfs",
        &at("tmp"),
        NOSUID_NODEV,
        &format!("size={},mode=1777", spec.tmp_size),
    )?);
    if let Some(ws) = &spec.workspace {
        attach(ops, ws, &at("workspace"), true)?;
    }
    let bound = super::sockets::bound();
    for (b, point) in spec.binds.iter().zip(points) {
        let point = match point {
            Some(point) => point,
            None => push_bind_point(ops, root, b)?,
        };
        attach(ops, &b.src, &point, b.writable)?;
        // A bind shows the host's sockets under its source as well. The node's own binds, in
        // the task's /run/agentnode (which a task's own binds may not reach, see
        // `agentnode.isolation.spec.parse_mount`), are left alone: the directory of the node's
        // task sockets is bound there on purpose.
        if b.dest.starts_with(Path::new("/").join(NODE_RUN)) {
            continue;
        }
        for rel in super::sockets::under(&bound, &b.src) {
            if !rel.as_os_str().is_empty() {
                ops.push(Op::Mask {
                    path: cstr(point.join(rel))?,
                    dir: false,
                });
            }
        }
    }
    Ok(())
}

/// Creates the mount point chain of a bind and returns where it is.
fn push_bind_point(ops: &mut Vec<Op>, stage: &Path, b: &Bind) -> Result<PathBuf> {
    let meta = std::fs::metadata(&b.src).map_err(|_| Error::BadPath {
        what: if b.writable {
            "--rw source"
        } else {
            "--ro source"
        },
        path: b.src.clone(),
        why: "does not exist",
    })?;
    if !b.dest.is_absolute() || b.dest.components().any(|c| c.as_os_str() == "..") {
        return Err(Error::BadPath {
            what: "bind destination",
            path: b.dest.clone(),
            why: "must be an absolute path without '..'",
        });
    }
    let rel = b.dest.strip_prefix("/").unwrap_or(&b.dest);
    let mut cur = PathBuf::from(stage);
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        if i + 1 < comps.len() || meta.is_dir() {
            ops.push(Op::MkDir(cstr(&cur)?));
        } else {
            ops.push(Op::Touch(cstr(&cur)?));
        }
    }
    Ok(cur)
}

/// Fresh /proc with runc's masks. Always the task's own doing: a procfs shows the pid namespace
/// of whoever mounts it (the `pidns=` option that would let another mount it needs a namespace
/// at or above the mounter's on this kernel).
fn push_proc(ops: &mut Vec<Op>, root: &Path) -> Result<()> {
    let at = |rel: &str| root.join(rel);
    ops.push(fs("proc", &at("proc"), NOSUID_NODEV | libc::MS_NOEXEC, "")?);
    for p in READ_ONLY {
        ops.push(bind(&at(p), &at(p))?);
        ops.push(Op::ReadOnly {
            path: cstr(at(p))?,
            recursive: true,
        });
    }
    push_masks(ops, root, "proc/")
}

fn push_masks(ops: &mut Vec<Op>, root: &Path, under: &str) -> Result<()> {
    for (p, dir) in MASKED.iter().zip(masked_dirs()) {
        if p.starts_with(under) {
            ops.push(Op::Mask {
                path: cstr(root.join(p))?,
                dir: *dir,
            });
        }
    }
    Ok(())
}

/// Read-only /sys of the task's network namespace (masked), /dev's own devpts and shm, and the
/// task's own /run/agentnode.
fn push_sys_dev(ops: &mut Vec<Op>, root: &Path) -> Result<()> {
    let at = |rel: &str| root.join(rel);
    ops.push(fs(
        "sysfs",
        &at("sys"),
        NOSUID_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        "",
    )?);
    push_masks(ops, root, "sys/")?;
    ops.push(fs(
        "devpts",
        &at("dev/pts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )?);
    ops.push(fs(
        "tmpfs",
        &at("dev/shm"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        "size=64m,mode=1777",
    )?);
    ops.push(fs(
        "tmpfs",
        &at(NODE_RUN),
        NOSUID_NODEV | libc::MS_NOEXEC,
        "size=64k,mode=755",
    )?);
    Ok(())
}

/// /dev's skeleton: a small tmpfs with the usual device nodes bound from the host and the mount
/// points of devpts and shm. It turns read-only with the root: a task writes to the devices,
/// never to the directory (which a template root shares between all its tasks).
fn push_dev(ops: &mut Vec<Op>, stage: &Path) -> Result<()> {
    let at = |rel: &str| stage.join(rel);
    ops.push(fs(
        "tmpfs",
        &at("dev"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "size=64k,mode=755",
    )?);
    for d in DEVICES {
        ops.push(Op::Touch(cstr(at(&format!("dev/{d}")))?));
        ops.push(bind(&Path::new("/dev").join(d), &at(&format!("dev/{d}")))?);
    }
    ops.push(Op::MkDir(cstr(at("dev/pts"))?));
    ops.push(Op::MkDir(cstr(at("dev/shm"))?));
    for (target, link) in [
        ("pts/ptmx", "dev/ptmx"),
        ("/proc/self/fd", "dev/fd"),
        ("/proc/self/fd/0", "dev/stdin"),
        ("/proc/self/fd/1", "dev/stdout"),
        ("/proc/self/fd/2", "dev/stderr"),
    ] {
        ops.push(Op::Symlink {
            target: cstr(target)?,
            path: cstr(at(link))?,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(workspace: Option<PathBuf>) -> Spec {
        Spec {
            argv: vec!["/bin/true".into()],
            env: Vec::new(),
            cwd: "/".into(),
            hostname: "h".into(),
            rootfs: "/".into(),
            stage: "/nonexistent-stage".into(),
            workspace,
            binds: Vec::new(),
            tmp_size: 1 << 20,
            uid: 0,
            gid: 0,
            userns_base: None,
            netns: None,
            stdio: [None; 3],
            nofile: 1024,
            seccomp: true,
            keep_caps: Vec::new(),
            limits: crate::cgroup::Limits::default(),
            outlive: false,
        }
    }

    fn described(ops: &[Op]) -> Vec<String> {
        ops.iter().map(Op::describe).collect()
    }

    #[test]
    fn a_start_mounts_only_what_was_not_made_ahead_of_it() {
        let has = |ops: &[String], what: &str| ops.iter().any(|d| d.contains(what));
        let spec = spec(Some("/ws".into()));
        let own = described(&from_template(&spec, Start::Own(3), &[4]).unwrap());
        let made = described(&from_template(&spec, Start::Made(3), &[4]).unwrap());
        let booted = described(&from_template(&spec, Start::Booted, &[4]).unwrap());
        let boot = described(&zygote_boot(3).unwrap());
        assert!(has(&own, "(sysfs)") && has(&own, "(proc)") && has(&own, "enter a copy"));
        assert!(!has(&made, "(sysfs)") && has(&made, "(proc)") && has(&made, "made ahead"));
        // A zygote entered its copy and mounted /proc at boot: its start adds only its own.
        assert!(has(&boot, "made ahead") && has(&boot, "(proc)") && has(&boot, "mask /proc/kcore"));
        assert!(!has(&boot, "(tmpfs) on /tmp") && !has(&boot, "/workspace"));
        assert!(!booted
            .iter()
            .any(|d| d.contains("(proc)") || d.contains("enter")));
        assert!(has(&booted, "(tmpfs) on /tmp") && has(&booted, "onto /workspace"));
        for ops in [&own, &made] {
            assert!(
                ops.ends_with(&booted),
                "the task's own mounts come last: {ops:?}"
            );
        }
    }
}
