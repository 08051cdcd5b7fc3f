//! `agentnode doctor`: probes this host for every capability the node needs by trying each one
//! for real (a child cgroup with a limit, a process in each namespace, a BPF program attached to
//! a scratch cgroup, a scratch netns with a veth pair and a bridge) and cleaning up after itself.
//!
//! The report is plain data; Python renders it as a table or as JSON (schema
//! `docs/doctor.schema.json`).

mod bpf;
mod cgroups;
mod net;
mod process;

use serde::Serialize;

use crate::cgroup::Hierarchy;
use crate::sys;

/// The oldest kernel with everything the node relies on: cgroup BPF links and
/// `CLONE_INTO_CGROUP` (5.7), BPF ring buffers (5.8), `cgroup.kill` (5.14, with a fallback).
pub const MIN_KERNEL: (u32, u32, u32) = (5, 8, 0);

/// The identifier of the report's JSON schema (`docs/doctor.schema.json`).
pub const SCHEMA: &str = "agentnode.doctor/v1";

/// The outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Missing,
    /// Not tried: the probe needs root and this process is not root.
    NeedsRoot,
}

/// One row of the doctor's table.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable dotted identifier, e.g. `cgroup.controller.memory`.
    pub id: &'static str,
    pub feature: String,
    pub status: Status,
    /// Whether the node refuses to run without it.
    pub required: bool,
    pub detail: String,
    /// What to do when it is missing; empty when ok.
    pub fix: String,
}

/// Everything the doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Schema identifier; bumped only on incompatible changes.
    pub schema: &'static str,
    /// True when every required check passed.
    pub ok: bool,
    pub kernel: String,
    pub root: bool,
    pub hierarchy: Option<Hierarchy>,
    pub checks: Vec<Check>,
}

/// Collects checks with less ceremony at each probe.
pub(crate) struct Checks {
    root: bool,
    out: Vec<Check>,
}

impl Checks {
    pub(crate) fn ok(&mut self, id: &'static str, feature: &str, required: bool, detail: String) {
        self.push(id, feature, Status::Ok, required, detail, String::new());
    }

    pub(crate) fn missing(
        &mut self,
        id: &'static str,
        feature: &str,
        required: bool,
        detail: String,
        fix: &str,
    ) {
        self.push(
            id,
            feature,
            Status::Missing,
            required,
            detail,
            fix.to_owned(),
        );
    }

    /// Records `result` as ok or missing.
    pub(crate) fn record(
        &mut self,
        id: &'static str,
        feature: &str,
        required: bool,
        result: Result<String, String>,
        fix: &str,
    ) {
        match result {
            Ok(detail) => self.ok(id, feature, required, detail),
            Err(detail) => self.missing(id, feature, required, detail, fix),
        }
    }

    /// Runs `probe` as root, or records that it needs root.
    pub(crate) fn as_root(
        &mut self,
        id: &'static str,
        feature: &str,
        required: bool,
        fix: &str,
        probe: impl FnOnce() -> Result<String, String>,
    ) {
        if self.root {
            let result = probe();
            self.record(id, feature, required, result, fix);
        } else {
            self.push(
                id,
                feature,
                Status::NeedsRoot,
                required,
                "not tried: needs root".into(),
                "run as root: sudo agentnode doctor".into(),
            );
        }
    }

    fn push(
        &mut self,
        id: &'static str,
        feature: &str,
        status: Status,
        required: bool,
        detail: String,
        fix: String,
    ) {
        self.out.push(Check {
            id,
            feature: feature.to_owned(),
            status,
            required,
            detail,
            fix,
        });
    }
}

/// Runs every probe. Safe to call unprivileged: probes that need root are reported as such.
#[must_use]
pub fn run() -> Report {
    let kernel = sys::kernel_release();
    let root = sys::euid() == 0;
    let mut checks = Checks {
        root,
        out: Vec::new(),
    };

    let version = sys::parse_kernel_version(&kernel);
    let fix = "upgrade to Linux 5.8 or later";
    match version {
        Some(v) if v >= MIN_KERNEL => {
            checks.ok("kernel.version", "kernel version", true, kernel.clone());
        }
        Some(_) => checks.missing(
            "kernel.version",
            "kernel version",
            true,
            format!("{kernel} is older than 5.8"),
            fix,
        ),
        None => checks.missing(
            "kernel.version",
            "kernel version",
            true,
            format!("cannot parse {kernel:?}"),
            fix,
        ),
    }

    let hierarchy = cgroups::probe(&mut checks);
    process::probe(&mut checks, hierarchy.as_ref());
    bpf::probe(&mut checks, hierarchy.as_ref());
    net::probe(&mut checks);

    let ok = checks
        .out
        .iter()
        .all(|c| !c.required || c.status == Status::Ok);
    Report {
        schema: SCHEMA,
        ok,
        kernel,
        root,
        hierarchy,
        checks: checks.out,
    }
}

/// A name for scratch objects that cannot collide with another doctor running at once.
pub(crate) fn scratch_name(what: &str) -> String {
    format!("agentnode-doctor-{what}-{}", std::process::id())
}
