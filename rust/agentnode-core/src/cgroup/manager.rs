//! One [`TaskCgroup`] trait over the two ways a host can give a task its cgroups.
//!
//! - [`V2`]: one cgroup2 node holds placement, limits, accounting, kill and freeze.
//! - [`Hybrid`]: a cgroup2 node (no controllers) for placement, `cgroup.kill`, `cgroup.freeze`
//!   and BPF, plus v1 cpu, cpuacct, memory and pids nodes for limits and accounting.
//!
//! Every node lives at `<this process's cgroup>/agentnode/<instance>/<task>` in its hierarchy.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Error, OwnedDir, Result};

/// Resource limits of one task. `None` leaves the kernel default (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period in microseconds (`--cpus 0.5` = 50000 of 100000).
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    /// Relative CPU weight, 1..=10000 (100 is the default share).
    pub cpu_weight: Option<u64>,
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    pub swap_max: Option<u64>,
    pub pids_max: Option<u64>,
}

/// Accounting of one task's cgroup, live or final.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub memory_current: u64,
    pub memory_peak: u64,
    pub pids_current: u64,
    pub pids_peak: u64,
    pub oom_kills: u64,
    /// How many forks failed on the pids limit.
    pub pids_limit_hits: u64,
}

/// The two figures a tool call's accounting takes before and after the call: CPU time (user +
/// system) and the memory peak, from one file each (`stats` reads eight, ~0.3 ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_us: u64,
    pub memory_peak: u64,
}

/// The cgroups of one task, removed when dropped.
pub trait TaskCgroup: Send + Sync + std::fmt::Debug {
    /// The cgroup2 node: target of `CLONE_INTO_CGROUP`, `cgroup.kill`, freeze and BPF.
    fn placement(&self) -> &Path;
    /// The `tasks` files of the nodes `CLONE_INTO_CGROUP` does not reach (v1 hierarchies),
    /// open for writing: the task joins them itself by writing `0` to each. A thread that moves
    /// itself skips the global lock a write of a pid takes, whose RCU grace period cost a
    /// start up to 20 ms; the file's opener, not the writer, must have the right to move it.
    fn join_files(&self) -> Result<Vec<OwnedFd>>;
    /// Sets the limits.
    fn apply(&self, limits: &Limits) -> Result<()>;
    fn stats(&self) -> Result<CgroupStats>;
    /// CPU time and memory peak only (see [`Usage`]).
    fn usage(&self) -> Result<Usage>;
    /// Freezes (`true`) or thaws every process in the task.
    fn set_frozen(&self, frozen: bool) -> Result<()> {
        write(
            self.placement(),
            "cgroup.freeze",
            if frozen { "1" } else { "0" },
        )
    }
    /// SIGKILLs every process in the task (`cgroup.kill`, 5.14).
    fn kill(&self) -> Result<()> {
        write(self.placement(), "cgroup.kill", "1")
    }
}

pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    use std::io::Write as _;
    let path = dir.join(file);
    // Never create: a missing control file means a missing controller, not a file to make.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| Error::Write {
            path,
            value: value.to_owned(),
            source,
        })
}

/// A control file's text. Control files are short and kernfs hands over all of a file's text in
/// one read that has room for it, so this skips `read_to_string`'s size query and its second
/// read: a reap reads eight of them.
fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    let text = std::fs::File::open(&path).and_then(|f| read_from_start(&f));
    text.map_err(|source| Error::Read { path, source })
}

/// The two files [`TaskCgroup::usage`] reads (the CPU file, and the memory peak's when the
/// kernel has one), opened at its first call and kept: a read from offset 0 of an open cgroup
/// file is one syscall, where opening it by path is three and a walk of the path (~30 us of
/// each tool call's two readings).
#[derive(Debug, Default)]
struct UsageFiles(std::sync::OnceLock<(PathBuf, std::fs::File, Option<std::fs::File>)>);

impl UsageFiles {
    /// The texts of the CPU file and of the memory peak's (None when it cannot be opened), at
    /// the paths `paths` gives, asked for at the first call only.
    fn read(&self, paths: impl FnOnce() -> (PathBuf, PathBuf)) -> Result<(String, Option<String>)> {
        let (path, cpu, peak) = if let Some(files) = self.0.get() {
            files
        } else {
            let (path, peak) = paths();
            let cpu = match std::fs::File::open(&path) {
                Ok(cpu) => cpu,
                Err(source) => return Err(Error::Read { path, source }),
            };
            self.0
                .get_or_init(|| (path, cpu, std::fs::File::open(peak).ok()))
        };
        let text = read_from_start(cpu).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        Ok((text, peak.as_ref().and_then(|f| read_from_start(f).ok())))
    }
}

/// A control file's whole text, from its start whatever was read of it before: one read
/// when it fits the buffer (all of them but the longest), more only when it filled it.
fn read_from_start(file: &std::fs::File) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = [0u8; 4096];
    let mut bytes = Vec::new();
    loop {
        let n = file.read_at(&mut buf, bytes.len() as u64)?;
        bytes.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}

fn read_u64(dir: &Path, file: &str) -> Result<u64> {
    Ok(read(dir, file)?.trim().parse().unwrap_or(0))
}

/// The value of `key` in a flat-keyed file such as `memory.events` or `cpu.stat`.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What the v2 control files say for `limits`, in the order they are written.
#[must_use]
pub fn v2_files(limits: &Limits) -> Vec<(&'static str, String)> {
    let max = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |n| n.to_string());
    let mut out = Vec::new();
    if limits.cpu_quota_us.is_some() {
        out.push((
            "cpu.max",
            format!("{} {}", max(limits.cpu_quota_us), limits.cpu_period_us),
        ));
    }
    if let Some(w) = limits.cpu_weight {
        out.push(("cpu.weight", w.to_string()));
    }
    if limits.memory_max.is_some() {
        out.push(("memory.max", max(limits.memory_max)));
    }
    if limits.memory_high.is_some() {
        out.push(("memory.high", max(limits.memory_high)));
    }
    if limits.swap_max.is_some() {
        out.push(("memory.swap.max", max(limits.swap_max)));
    }
    if limits.pids_max.is_some() {
        out.push(("pids.max", max(limits.pids_max)));
    }
    out
}

/// A task on a cgroup2-only host.
#[derive(Debug)]
pub struct V2 {
    /// Closed before the dir goes (fields drop in order).
    usage: UsageFiles,
    dir: OwnedDir,
}

impl V2 {
    /// Creates `parent/name` (controllers must be enabled in `parent`'s `subtree_control`).
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        Ok(Self {
            dir: mkdir(parent, name)?,
            usage: UsageFiles::default(),
        })
    }
}

impl V2 {
    /// Takes over the existing task cgroup `dir` (see [`OwnedDir::adopt`]).
    #[must_use]
    pub fn adopt(dir: PathBuf) -> Self {
        Self {
            dir: OwnedDir::adopt(dir),
            usage: UsageFiles::default(),
        }
    }
}

impl TaskCgroup for V2 {
    fn placement(&self) -> &Path {
        self.dir.path()
    }

    fn join_files(&self) -> Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        for (file, value) in v2_files(limits) {
            if !self.dir.path().join(file).exists() {
                return Err(Error::Unsupported {
                    what: file,
                    dir: self.dir.path().to_owned(),
                });
            }
            write(self.dir.path(), file, &value)?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats> {
        let d = self.dir.path();
        let cpu = read(d, "cpu.stat").unwrap_or_default();
        let events = read(d, "memory.events").unwrap_or_default();
        let pids_events = read(d, "pids.events").unwrap_or_default();
        Ok(CgroupStats {
            cpu_user_us: keyed(&cpu, "user_usec"),
            cpu_system_us: keyed(&cpu, "system_usec"),
            memory_current: read_u64(d, "memory.current").unwrap_or(0),
            memory_peak: read_u64(d, "memory.peak").unwrap_or(0),
            pids_current: read_u64(d, "pids.current").unwrap_or(0),
            pids_peak: read_u64(d, "pids.peak").unwrap_or(0),
            oom_kills: keyed(&events, "oom_kill"),
            pids_limit_hits: keyed(&pids_events, "max"),
        })
    }

    fn usage(&self) -> Result<Usage> {
        let d = self.dir.path();
        let (cpu, peak) = self
            .usage
            .read(|| (d.join("cpu.stat"), d.join("memory.peak")))?;
        Ok(Usage {
            cpu_us: keyed(&cpu, "usage_usec"),
            memory_peak: peak.and_then(|p| p.trim().parse().ok()).unwrap_or(0),
        })
    }
}

/// Whether v1 memory cgroups have `memory.memsw.*`: swap accounting is on or off for the whole
/// host, so it is asked once.
static MEMSW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// `cpu.cfs_period_us` of a new v1 cgroup.
const V1_DEFAULT_PERIOD_US: u64 = 100_000;

/// The v1 hierarchies a hybrid task needs, by the controller that names each.
pub const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// A task on a hybrid host: a cgroup2 node plus one node per v1 hierarchy.
#[derive(Debug)]
pub struct Hybrid {
    unified: OwnedDir,
    /// Indexed like [`V1_CONTROLLERS`]; a hierarchy co-mounting two of them appears twice.
    v1: Vec<PathBuf>,
    owned_v1: Vec<OwnedDir>,
    /// The `tasks` files, opened with the dirs (for a spare, ahead of its start) and handed
    /// to the first [`TaskCgroup::join_files`].
    joins: std::sync::Mutex<Vec<OwnedFd>>,
    usage: UsageFiles,
}

impl Hybrid {
    /// Creates `name` under `unified_parent` and under each parent in `v1_parents`
    /// (ordered like [`V1_CONTROLLERS`]).
    pub fn create(unified_parent: &Path, v1_parents: &[PathBuf], name: &str) -> Result<Self> {
        let unified = mkdir(unified_parent, name)?;
        let mut owned_v1: Vec<OwnedDir> = Vec::new();
        let mut v1 = Vec::new();
        for parent in v1_parents {
            let path = parent.join(name);
            if !owned_v1.iter().any(|d| d.path() == path) {
                owned_v1.push(mkdir(parent, name)?);
            }
            v1.push(path);
        }
        let joins = open_joins(&owned_v1)?;
        Ok(Self {
            unified,
            v1,
            owned_v1,
            joins: std::sync::Mutex::new(joins),
            usage: UsageFiles::default(),
        })
    }

    /// Takes over an existing task cgroup: `unified`, and `v1` indexed like
    /// [`V1_CONTROLLERS`] (see [`OwnedDir::adopt`]).
    #[must_use]
    pub fn adopt(unified: PathBuf, v1: Vec<PathBuf>) -> Self {
        let mut owned_v1: Vec<OwnedDir> = Vec::new();
        for path in &v1 {
            if !owned_v1.iter().any(|d| d.path() == path) {
                owned_v1.push(OwnedDir::adopt(path.clone()));
            }
        }
        Self {
            unified: OwnedDir::adopt(unified),
            v1,
            owned_v1,
            joins: std::sync::Mutex::new(Vec::new()),
            usage: UsageFiles::default(),
        }
    }

    fn v1(&self, controller: &str) -> &Path {
        let i = V1_CONTROLLERS
            .iter()
            .position(|c| *c == controller)
            .unwrap_or(0);
        &self.v1[i]
    }
}

impl Drop for Hybrid {
    fn drop(&mut self) {
        // The usage files close first; v1 dirs go before the cgroup2 node (a field dropped
        // after this), so a cgroup2 node that is gone means the whole task is released.
        self.usage = UsageFiles::default();
        self.owned_v1.clear();
    }
}

impl TaskCgroup for Hybrid {
    fn placement(&self) -> &Path {
        self.unified.path()
    }

    fn join_files(&self) -> Result<Vec<OwnedFd>> {
        let opened = std::mem::take(
            &mut *self
                .joins
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if opened.is_empty() {
            open_joins(&self.owned_v1)
        } else {
            Ok(opened)
        }
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        if limits.memory_high.is_some() {
            return Err(Error::Unsupported {
                what: "memory.high (a soft memory limit needs cgroup v2)",
                dir: self.v1("memory").to_owned(),
            });
        }
        let cpu = self.v1("cpu");
        if let Some(q) = limits.cpu_quota_us {
            // Limits go to a fresh cgroup, which has the kernel's default period.
            if limits.cpu_period_us != V1_DEFAULT_PERIOD_US {
                write(cpu, "cpu.cfs_period_us", &limits.cpu_period_us.to_string())?;
            }
            write(cpu, "cpu.cfs_quota_us", &q.to_string())?;
        }
        if let Some(w) = limits.cpu_weight {
            // cgroup v2 maps weight 100 to v1's 1024 shares; keep the same ratio.
            write(cpu, "cpu.shares", &(w * 1024 / 100).max(2).to_string())?;
        }
        let mem = self.v1("memory");
        if let Some(m) = limits.memory_max {
            write(mem, "memory.limit_in_bytes", &m.to_string())?;
            // memsw = memory + swap; without a swap limit, no swap at all beyond memory.max.
            let memsw = m.saturating_add(limits.swap_max.unwrap_or(0));
            if *MEMSW.get_or_init(|| mem.join("memory.memsw.limit_in_bytes").exists()) {
                write(mem, "memory.memsw.limit_in_bytes", &memsw.to_string())?;
            } else if limits.swap_max.is_some() {
                return Err(Error::Unsupported {
                    what: "memory.memsw.limit_in_bytes (swap accounting is off)",
                    dir: mem.to_owned(),
                });
            }
        } else if limits.swap_max.is_some() {
            return Err(Error::Unsupported {
                what: "a swap limit without a memory limit on cgroup v1",
                dir: mem.to_owned(),
            });
        }
        if let Some(p) = limits.pids_max {
            write(self.v1("pids"), "pids.max", &p.to_string())?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<CgroupStats> {
        let acct = self.v1("cpuacct");
        let mem = self.v1("memory");
        let pids = self.v1("pids");
        let oom = read(mem, "memory.oom_control").unwrap_or_default();
        let pids_events = read(pids, "pids.events").unwrap_or_default();
        // cpuacct.stat's user and system times are tick-sampled; cpuacct.usage is exact. Split
        // the exact total in their proportion so user + system adds up to the real CPU time.
        let ticks = read(acct, "cpuacct.stat")?;
        let (user, sys) = (keyed(&ticks, "user"), keyed(&ticks, "system"));
        let total = read_u64(acct, "cpuacct.usage")?;
        let user_ns = if user + sys == 0 {
            total
        } else {
            (u128::from(total) * u128::from(user) / u128::from(user + sys)) as u64
        };
        Ok(CgroupStats {
            cpu_user_us: user_ns / 1000,
            cpu_system_us: (total - user_ns) / 1000,
            memory_current: read_u64(mem, "memory.usage_in_bytes")?,
            memory_peak: read_u64(mem, "memory.max_usage_in_bytes")?,
            pids_current: read_u64(pids, "pids.current")?,
            pids_peak: read_u64(pids, "pids.peak").unwrap_or(0),
            oom_kills: keyed(&oom, "oom_kill"),
            pids_limit_hits: keyed(&pids_events, "max"),
        })
    }

    fn usage(&self) -> Result<Usage> {
        let (cpu, peak) = self.usage.read(|| {
            (
                self.v1("cpuacct").join("cpuacct.usage"),
                self.v1("memory").join("memory.max_usage_in_bytes"),
            )
        })?;
        Ok(Usage {
            // cpuacct.usage is exact (ns): the total `stats` splits into user and system.
            cpu_us: cpu.trim().parse::<u64>().unwrap_or(0) / 1000,
            memory_peak: peak.and_then(|p| p.trim().parse().ok()).unwrap_or(0),
        })
    }
}

/// The `tasks` file of each v1 dir, open for writing.
fn open_joins(dirs: &[OwnedDir]) -> Result<Vec<OwnedFd>> {
    dirs.iter()
        .map(|dir| {
            let path = dir.path().join("tasks");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map(OwnedFd::from)
                .map_err(|source| Error::Write {
                    path,
                    value: "0".to_owned(),
                    source,
                })
        })
        .collect()
}

fn mkdir(parent: &Path, name: &str) -> Result<OwnedDir> {
    OwnedDir::create(parent, name).map_err(|source| Error::Create {
        path: parent.join(name),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agentnode-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn v2_limit_files_are_written() {
        let root = tmpdir("v2");
        let task = V2::create(&root, "t1").unwrap();
        for f in [
            "cpu.max",
            "cpu.weight",
            "memory.max",
            "memory.high",
            "memory.swap.max",
            "pids.max",
        ] {
            std::fs::write(task.placement().join(f), "").unwrap();
        }
        let limits = Limits {
            cpu_quota_us: Some(50_000),
            cpu_period_us: 100_000,
            cpu_weight: Some(200),
            memory_max: Some(64 << 20),
            memory_high: Some(32 << 20),
            swap_max: Some(0),
            pids_max: Some(64),
        };
        task.apply(&limits).unwrap();
        let got = |f: &str| std::fs::read_to_string(task.placement().join(f)).unwrap();
        assert_eq!(got("cpu.max"), "50000 100000");
        assert_eq!(got("cpu.weight"), "200");
        assert_eq!(got("memory.max"), (64u64 << 20).to_string());
        assert_eq!(got("memory.high"), (32u64 << 20).to_string());
        assert_eq!(got("memory.swap.max"), "0");
        assert_eq!(got("pids.max"), "64");
        std::fs::write(
            task.placement().join("cpu.stat"),
            "usage_usec 9\nuser_usec 7\nsystem_usec 2\n",
        )
        .unwrap();
        std::fs::write(
            task.placement().join("memory.events"),
            "low 0\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(task.placement().join("memory.peak"), "4096\n").unwrap();
        let s = task.stats().unwrap();
        assert_eq!(
            (s.cpu_user_us, s.cpu_system_us, s.oom_kills, s.memory_peak),
            (7, 2, 1, 4096)
        );
        drop(task);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_missing_controller_is_reported() {
        let root = tmpdir("v2missing");
        let task = V2::create(&root, "t1").unwrap();
        let limits = Limits {
            memory_max: Some(1 << 20),
            ..Limits::default()
        };
        let err = task.apply(&limits).unwrap_err().to_string();
        assert!(err.contains("memory.max"), "{err}");
        drop(task);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unset_limits_write_nothing() {
        assert!(v2_files(&Limits::default()).is_empty());
    }
}
