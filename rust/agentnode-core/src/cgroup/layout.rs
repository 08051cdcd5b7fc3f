//! Detection of the cgroup layout from `/proc/self/mountinfo` and `/proc/self/cgroup`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Error, Result};

/// Which cgroup hierarchies a host mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Only cgroup2: controllers, placement and BPF in one tree.
    Unified,
    /// v1 controllers plus a cgroup2 tree for placement, kill, freeze and BPF.
    Hybrid,
    /// v1 only: no cgroup2 tree, so no cgroup BPF.
    Legacy,
}

/// A v1 controller hierarchy and this process's place in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V1Controller {
    /// The controller names co-mounted on this hierarchy (e.g. `["cpu", "cpuacct"]`).
    pub controllers: Vec<String>,
    /// Where this process's cgroup is on disk.
    pub dir: PathBuf,
}

/// The cgroup hierarchies of this host and this process's cgroup in each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy {
    pub layout: Layout,
    /// This process's cgroup2 directory, when a cgroup2 tree is mounted.
    pub unified: Option<PathBuf>,
    /// This process's cgroup path as `/proc/self/cgroup` names it in the cgroup2 tree.
    pub unified_path: Option<String>,
    pub v1: Vec<V1Controller>,
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_opts: String,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <point> <opts> [optional...] - <fstype> <src> <super>"
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            let fstype = post.next()?.to_owned();
            let _source = post.next()?;
            let super_opts = post.next().unwrap_or("").to_owned();
            Some(Mount {
                root: unescape(pre.get(3)?),
                point: PathBuf::from(unescape(pre.get(4)?)),
                fstype,
                super_opts,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Joins a mount point and a cgroup path, removing the mount's root (non-`/` inside containers).
fn on_disk(mount: &Mount, cgroup_path: &str) -> PathBuf {
    let rel = if mount.root == "/" {
        cgroup_path
    } else {
        cgroup_path
            .strip_prefix(mount.root.as_str())
            .unwrap_or(cgroup_path)
    };
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(rel)
    }
}

impl Hierarchy {
    /// Reads this process's cgroup layout from procfs.
    pub fn detect() -> Result<Self> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| Error::Read {
                path: PathBuf::from(p),
                source,
            })
        };
        Self::from_proc(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
    }

    /// Builds the hierarchy from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn from_proc(mountinfo: &str, proc_cgroup: &str) -> Result<Self> {
        let mounts = parse_mountinfo(mountinfo);
        let mut unified = None;
        let mut unified_path = None;
        let mut v1 = Vec::new();
        for line in proc_cgroup.lines() {
            // "<id>:<controllers>:<path>"; the v2 line is "0::<path>".
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && ctrls.is_empty() {
                if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
                    unified = Some(on_disk(m, path));
                    unified_path = Some(path.to_owned());
                }
                continue;
            }
            let names: Vec<String> = ctrls
                .split(',')
                .filter(|c| !c.is_empty() && !c.starts_with("name="))
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                continue; // named hierarchies (name=systemd) carry no controller
            }
            let mount = mounts.iter().find(|m| {
                m.fstype == "cgroup" && {
                    let opts: Vec<&str> = m.super_opts.split(',').collect();
                    names.iter().all(|n| opts.contains(&n.as_str()))
                }
            });
            if let Some(m) = mount {
                v1.push(V1Controller {
                    controllers: names,
                    dir: on_disk(m, path),
                });
            }
        }
        let layout = match (unified.is_some(), v1.is_empty()) {
            (true, true) => Layout::Unified,
            (true, false) => Layout::Hybrid,
            (false, false) => Layout::Legacy,
            (false, true) => return Err(Error::NotMounted),
        };
        Ok(Self {
            layout,
            unified,
            unified_path,
            v1,
        })
    }

    /// This process's directory in the v1 hierarchy that carries `controller`, if any.
    #[must_use]
    pub fn v1_dir(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|c| c.controllers.iter().any(|n| n == controller))
            .map(|c| c.dir.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn hybrid_host() {
        let h = Hierarchy::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP).unwrap();
        assert_eq!(h.layout, Layout::Hybrid);
        assert_eq!(
            h.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            h.v1_dir("memory"),
            Some(Path::new("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(h.v1_dir("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(h.v1_dir("io"), None);
    }

    #[test]
    fn unified_host_in_a_container_with_a_mount_root() {
        let mi = "30 25 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = Hierarchy::from_proc(mi, "0::/kubepods/pod1/ctr\n").unwrap();
        assert_eq!(h.layout, Layout::Unified);
        assert_eq!(h.unified.as_deref(), Some(Path::new("/sys/fs/cgroup/ctr")));
        assert_eq!(h.unified_path.as_deref(), Some("/kubepods/pod1/ctr"));
    }

    #[test]
    fn legacy_host_and_comounted_controllers() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let h = Hierarchy::from_proc(mi, "2:cpu,cpuacct:/a\n").unwrap();
        assert_eq!(h.layout, Layout::Legacy);
        assert_eq!(
            h.v1_dir("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct/a"))
        );
    }

    #[test]
    fn no_cgroups_is_an_error() {
        assert!(matches!(
            Hierarchy::from_proc("", "0::/\n"),
            Err(Error::NotMounted)
        ));
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
