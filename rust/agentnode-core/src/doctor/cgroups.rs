//! cgroup probes: layout, this process's cgroup, usable controllers, creating a child with a
//! limit, and the cgroup2 core files (kill, freeze) that task lifecycle relies on.

use std::path::Path;

use super::{scratch_name, Checks};
use crate::cgroup::{Hierarchy, Layout, OwnedDir};

/// (controller, check id, required)
const CONTROLLERS: [(&str, &str, bool); 5] = [
    ("cpu", "cgroup.controller.cpu", true),
    ("memory", "cgroup.controller.memory", true),
    ("pids", "cgroup.controller.pids", true),
    ("io", "cgroup.controller.io", false),
    ("freezer", "cgroup.controller.freezer", true),
];

pub(super) fn probe(checks: &mut Checks) -> Option<Hierarchy> {
    let h = match Hierarchy::detect() {
        Ok(h) => h,
        Err(e) => {
            checks.missing(
                "cgroup.layout",
                "cgroup layout",
                true,
                e.to_string(),
                "mount cgroup2 at /sys/fs/cgroup (systemd does this on boot)",
            );
            return None;
        }
    };
    let layout = match h.layout {
        Layout::Unified => format!("pure v2 at {}", show(h.unified.as_deref())),
        Layout::Hybrid => format!(
            "hybrid: cgroup2 at {}, v1 controllers {}",
            show(h.unified.as_deref()),
            h.v1.iter()
                .map(|c| c.controllers.join(","))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Layout::Legacy => "v1 only: no cgroup2 tree, so no cgroup BPF".into(),
    };
    let legacy = h.layout == Layout::Legacy;
    checks.record(
        "cgroup.layout",
        "cgroup layout",
        true,
        if legacy { Err(layout) } else { Ok(layout) },
        "boot with systemd.unified_cgroup_hierarchy=1 (or mount cgroup2 at /sys/fs/cgroup/unified)",
    );
    let mut own = Vec::new();
    if let Some(p) = &h.unified_path {
        own.push(format!("v2 {p}"));
    }
    for c in &h.v1 {
        own.push(format!("{} {}", c.controllers.join(","), c.dir.display()));
    }
    checks.ok(
        "cgroup.self",
        "cgroup of this process",
        false,
        own.join("; "),
    );

    let v2_available = v2_controllers(&h);
    for (name, id, required) in CONTROLLERS {
        let found = controller_place(&h, name, &v2_available);
        let fix = if h.layout == Layout::Unified {
            "enable it in the parent's cgroup.subtree_control (or delegate it to this service)"
        } else {
            "mount the v1 controller under /sys/fs/cgroup or move to cgroup v2"
        };
        checks.record(id, &format!("controller {name}"), required, found, fix);
    }

    checks.as_root(
        "cgroup.create",
        "create a child cgroup and set a limit",
        true,
        "run as root with a writable cgroup tree (in a container: delegate the cgroup)",
        || create_with_limit(&h),
    );
    if let Some(unified) = h.unified.as_deref() {
        checks.as_root(
            "cgroup.kill_freeze",
            "cgroup2 cgroup.kill and cgroup.freeze",
            false,
            "Linux 5.14 has cgroup.kill; without it tasks are killed by freeze + SIGKILL each pid",
            || kill_freeze(unified),
        );
    }
    Some(h)
}

fn show(p: Option<&Path>) -> String {
    p.map_or_else(|| "-".into(), |p| p.display().to_string())
}

/// The controllers this process's cgroup2 node can hand to its children.
fn v2_controllers(h: &Hierarchy) -> Vec<String> {
    h.unified
        .as_deref()
        .and_then(|d| std::fs::read_to_string(d.join("cgroup.controllers")).ok())
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn controller_place(h: &Hierarchy, name: &str, v2: &[String]) -> Result<String, String> {
    if v2.iter().any(|c| c == name) {
        return Ok(format!("cgroup v2 at {}", show(h.unified.as_deref())));
    }
    if name == "freezer" && h.unified.is_some() {
        // cgroup2 freezes through cgroup.freeze in every non-root node (5.2+).
        return Ok("cgroup v2 cgroup.freeze".into());
    }
    let v1_name = if name == "io" { "blkio" } else { name };
    match h.v1_dir(v1_name) {
        Some(d) => Ok(format!("cgroup v1 at {}", d.display())),
        None => Err(format!(
            "{name} is neither in cgroup.controllers nor mounted as v1"
        )),
    }
}

fn create_with_limit(h: &Hierarchy) -> Result<String, String> {
    let mut done = Vec::new();
    if h.layout == Layout::Unified {
        let dir = h.unified.as_deref().ok_or("no cgroup2 directory")?;
        let child = OwnedDir::create(dir, &scratch_name("cg"))
            .map_err(|e| format!("mkdir in {}: {e}", dir.display()))?;
        child.write("pids.max", "64").map_err(|e| {
            format!(
                "{}/pids.max: {e} (is +pids in cgroup.subtree_control?)",
                child.path().display()
            )
        })?;
        done.push(format!("{} pids.max=64", child.path().display()));
    } else {
        for (ctrl, file, value) in [
            ("pids", "pids.max", "64"),
            ("memory", "memory.limit_in_bytes", "67108864"),
        ] {
            let Some(dir) = h.v1_dir(ctrl) else { continue };
            let child = OwnedDir::create(dir, &scratch_name("cg"))
                .map_err(|e| format!("mkdir in {}: {e}", dir.display()))?;
            child
                .write(file, value)
                .map_err(|e| format!("{}/{file}: {e}", child.path().display()))?;
            done.push(format!("{}/{file}={value}", child.path().display()));
        }
    }
    if done.is_empty() {
        return Err("no controller to set a limit with".into());
    }
    Ok(done.join("; "))
}

fn kill_freeze(unified: &Path) -> Result<String, String> {
    let child = OwnedDir::create(unified, &scratch_name("kf"))
        .map_err(|e| format!("mkdir in {}: {e}", unified.display()))?;
    let has = |f: &str| child.path().join(f).exists();
    match (has("cgroup.kill"), has("cgroup.freeze")) {
        (true, true) => Ok("both present".into()),
        (kill, freeze) => Err(format!("cgroup.kill {kill}, cgroup.freeze {freeze}")),
    }
}
