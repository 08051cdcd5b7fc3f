//! The per-node-instance subtree `<own cgroup>/agentnode/<instance>` in every hierarchy, and the
//! start-up sweep that releases what dead instances left behind.
//!
//! An instance is named `n<pid>-<starttime>` after the process that owns it, so a sweep can tell
//! a live instance (never touched) from a dead one (its tasks killed, its dirs removed) even when
//! the pid has been reused. Parallel node processes therefore never touch each other's cgroups.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::manager::{self, Hybrid, TaskCgroup, V1_CONTROLLERS, V2};
use super::{remove_when_empty, Error, Hierarchy, Layout, Limits, Result};
use crate::background::ahead::Ahead;
use crate::sys::start_ticks;

/// Makes one task cgroup of the instance.
pub type Make = dyn Fn() -> Result<Box<dyn TaskCgroup>> + Send + Sync;

/// The name of the subtree agentnode creates in each hierarchy.
pub const SUBTREE: &str = "agentnode";

/// The cgroups of one node instance; creates task cgroups and removes its subtree when dropped.
pub struct Manager {
    name: String,
    unified: PathBuf,
    v1: Vec<PathBuf>,
    make: Arc<Make>,
    /// Task cgroups made ahead, so a start only writes its limits: on a hybrid host a task's
    /// cgroups are five `mkdir`s, about 0.2 ms. Each is an ordinary, never-used `t<N>` of the
    /// instance, so it goes with the instance: at close, or in the next start's sweep.
    spares: Ahead<Box<dyn TaskCgroup>>,
}

fn instance_name() -> String {
    let pid = std::process::id();
    format!("n{pid}-{}", start_ticks(pid).unwrap_or(0))
}

/// Whether the instance named `name` (`n<pid>-<starttime>`) still has its owner running.
fn is_alive(name: &str) -> bool {
    let Some((pid, start)) = name
        .strip_prefix('n')
        .and_then(|s| s.split_once('-'))
        .and_then(|(p, s)| Some((p.parse::<u32>().ok()?, s.parse::<u64>().ok()?)))
    else {
        return true; // not ours to judge: leave unknown names alone
    };
    start_ticks(pid) == Some(start)
}

fn ensure_dir(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

impl Manager {
    /// Sweeps dead instances' leftovers (see [`sweep`]), then creates this instance's subtree
    /// in every hierarchy. The instance is `n<pid>-<starttime>`, or with a `node` name (a node
    /// daemon's, one per data dir), `k<node>`: its tasks may outlive this process, and no other
    /// instance's sweep removes them; this one's removes what an earlier process of the node
    /// left there, but the task cgroups named in `spare` (`TASK`: re-adopted now).
    pub fn new(hierarchy: &Hierarchy, node: &str, spare: &[String]) -> Result<Self> {
        let unified_base = hierarchy.unified.clone().ok_or(Error::NoUnified)?;
        let mut v1_bases = Vec::new();
        if hierarchy.layout == Layout::Hybrid {
            for c in V1_CONTROLLERS {
                let dir = hierarchy
                    .v1_dir(c)
                    .ok_or(Error::MissingController { controller: c })?;
                v1_bases.push(dir.join(SUBTREE));
            }
        }
        let unified_sub = unified_base.join(SUBTREE);
        let name = if node.is_empty() {
            instance_name()
        } else {
            format!("k{node}")
        };
        sweep(&unified_sub, &v1_bases, &name, spare);
        let mut v1 = Vec::new();
        for base in &v1_bases {
            v1.push(base.join(&name));
        }
        let unified = unified_sub.join(&name);
        // Another instance may remove an empty `agentnode` dir between our two mkdirs; retry.
        let create_all = || {
            ensure_dir(&unified_sub)?;
            ensure_dir(&unified)?;
            v1_bases
                .iter()
                .zip(&v1)
                .try_for_each(|(b, d)| ensure_dir(b).and_then(|()| ensure_dir(d)))
        };
        let mut made = create_all();
        for _ in 0..3 {
            match &made {
                Err(Error::Create { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    made = create_all();
                }
                _ => break,
            }
        }
        made?;
        if hierarchy.layout == Layout::Unified {
            enable_controllers(&unified_base);
            enable_controllers(&unified_sub);
        }
        // Past the names of the tasks an earlier process of the node left running here.
        let first = children(&unified)
            .iter()
            .filter_map(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_prefix('t')?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .map_or(0, |n| n + 1);
        let (layout, next) = (hierarchy.layout, AtomicU64::new(first));
        let (unified_dir, v1_dirs) = (unified.clone(), v1.clone());
        let maker: Arc<Make> = Arc::new(move || {
            let name = format!("t{}", next.fetch_add(1, Ordering::Relaxed));
            Ok(match layout {
                Layout::Hybrid => Box::new(Hybrid::create(&unified_dir, &v1_dirs, &name)?),
                _ => Box::new(V2::create(&unified_dir, &name)?),
            })
        });
        let ahead = maker.clone();
        Ok(Self {
            name,
            unified,
            v1,
            make: maker,
            spares: Ahead::new("agentnode-cgroups", move || ahead().ok()),
        })
    }

    /// What makes a fresh, empty task cgroup of this instance (for the zygotes, whose pool
    /// lives beside the manager and must close before it).
    #[must_use]
    pub fn maker(&self) -> Arc<Make> {
        self.make.clone()
    }

    /// This instance's name (`n<pid>-<starttime>`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This instance's cgroup2 directory.
    #[must_use]
    pub fn unified_dir(&self) -> &Path {
        &self.unified
    }

    /// Takes over task cgroup `name` (`TASK`) an earlier process of this node left running, one
    /// the sweep spared: it is then this manager's to kill, read and (on drop) remove, like one
    /// it made.
    pub fn adopt(&self, name: &str) -> Result<Box<dyn TaskCgroup>> {
        let rel = Path::new(name);
        let plain = rel.components().count() == 1
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        let under = |instance: &Path| instance.join(rel);
        let unified = under(&self.unified);
        if !plain || !unified.is_dir() {
            return Err(Error::Read {
                path: unified,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        if self.v1.is_empty() {
            return Ok(Box::new(V2::adopt(unified)));
        }
        Ok(Box::new(Hybrid::adopt(
            unified,
            self.v1.iter().map(|d| under(d)).collect(),
        )))
    }

    /// This instance's directories in every hierarchy (cgroup2 first).
    #[must_use]
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut all = vec![self.unified.clone()];
        all.extend(self.v1.iter().cloned());
        all.dedup();
        all
    }

    /// The names (`t<N>`) of the task cgroups made ahead of time and not yet handed out.
    #[must_use]
    pub fn spares(&self) -> Vec<String> {
        self.spares.with_ready(|ready| {
            ready
                .iter()
                .filter_map(|t| t.placement().file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect()
        })
    }

    /// A fresh task cgroup (made ahead of time when a spare is ready) with `limits` applied;
    /// removed again on any error.
    pub fn create(&self, limits: &Limits) -> Result<Box<dyn TaskCgroup>> {
        let task = match self.spares.take() {
            Some(task) => task,
            None => (self.make)()?,
        };
        task.apply(limits)?;
        Ok(task)
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("name", &self.name)
            .field("unified", &self.unified)
            .field("v1", &self.v1)
            .finish_non_exhaustive()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.spares.close();
        if self.spares.forked() {
            // A forked child's copy: the instance, and the thread `flush` waits on, are the
            // parent's.
            return;
        }
        // Ended tasks' cgroups are removed on the background thread: they go first.
        crate::background::later::flush();
        for dir in self.dirs() {
            let _ = std::fs::remove_dir(&dir);
            if let Some(parent) = dir.parent() {
                // Fails harmlessly while another instance lives under it.
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Delegates cpu, memory, pids and io from `parent` to its children (cgroup v2).
fn enable_controllers(parent: &Path) {
    let Ok(available) = std::fs::read_to_string(parent.join("cgroup.controllers")) else {
        return;
    };
    for c in available.split_whitespace() {
        if ["cpu", "memory", "pids", "io"].contains(&c) {
            // Best effort: a controller the parent cannot delegate shows up later as a clear
            // "limit not supported" error when a task asks for it.
            let _ = manager::write(parent, "cgroup.subtree_control", &format!("+{c}"));
        }
    }
}

fn children(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(std::result::Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process listed in a cgroup's `cgroup.procs`.
fn kill_listed(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: plain syscall; these pids are in a dead instance's cgroup, ours to kill.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Releases every dead instance under `unified_sub` and `v1_subs`: kills what still runs in its
/// task cgroups, removes them and the instance dir. A node's instance (`k<node>`) is alive for
/// every other one (its tasks outlive its processes); `own` is the instance being made, whose
/// earlier process's task cgroups go too, but those named in `spare` (`TASK`). Returns how
/// many directories were removed.
pub fn sweep(unified_sub: &Path, v1_subs: &[PathBuf], own: &str, spare: &[String]) -> usize {
    let mut removed = 0;
    let mut roots = vec![unified_sub.to_owned()];
    roots.extend(v1_subs.iter().cloned());
    roots.dedup();
    for (i, root) in roots.iter().enumerate() {
        for inst in children(root) {
            let name = inst.file_name().map(|n| n.to_string_lossy().into_owned());
            let mine = name.as_deref() == Some(own);
            if !mine && name.as_deref().is_none_or(is_alive) {
                continue;
            }
            let mut kept = false;
            for task in children(&inst) {
                let spared = mine
                    && task
                        .file_name()
                        .is_some_and(|n| spare.iter().any(|s| n == s.as_str()));
                if spared {
                    kept = true;
                    continue;
                }
                if i == 0 {
                    let _ = manager::write(&task, "cgroup.kill", "1");
                }
                kill_listed(&task);
                removed += usize::from(remove_when_empty(&task));
            }
            if !kept && !mine {
                removed += usize::from(remove_when_empty(&inst));
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_pid_and_start_time() {
        let me = std::process::id();
        let start = start_ticks(me).unwrap();
        assert!(is_alive(&format!("n{me}-{start}")));
        assert!(!is_alive(&format!("n{me}-{}", start + 1)));
        assert!(!is_alive("n4194304-1"));
        assert!(is_alive("somebody-else"));
    }

    #[test]
    fn sweep_removes_only_dead_instances() {
        let root = std::env::temp_dir().join(format!("agentnode-sweep-{}", std::process::id()));
        let live = root.join(instance_name());
        let dead = root.join("n4194304-1");
        std::fs::create_dir_all(live.join("t0")).unwrap();
        std::fs::create_dir_all(dead.join("t0")).unwrap();
        assert_eq!(sweep(&root, &[], "n0-0", &[]), 2);
        assert!(live.join("t0").exists());
        assert!(!dead.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}

#[cfg(test)]
mod spare_tests {
    use super::*;

    #[test]
    fn sweep_spares_named_task_cgroups() {
        let root = std::env::temp_dir().join(format!("agentnode-spare-{}", std::process::id()));
        let own = root.join("kme");
        let other = root.join("kother");
        std::fs::create_dir_all(own.join("t0")).unwrap();
        std::fs::create_dir_all(own.join("t1")).unwrap();
        std::fs::create_dir_all(other.join("t0")).unwrap();
        assert_eq!(sweep(&root, &[], "kme", &["t1".to_owned()]), 1);
        assert!(!own.join("t0").exists());
        assert!(own.join("t1").exists());
        assert!(
            other.join("t0").exists(),
            "another node's kept tasks are not ours to sweep"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
