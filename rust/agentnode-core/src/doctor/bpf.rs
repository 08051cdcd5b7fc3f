//! BPF probes: load the embedded probe object (a `cgroup_skb/egress` program and a ring buffer
//! map), attach it to a scratch cgroup2 node and detach it; BTF; BPF LSM.

use aya::maps::Map;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::Ebpf;

use super::{scratch_name, Checks};
use crate::bpf::PROBE_OBJ;
use crate::cgroup::{Hierarchy, OwnedDir};

pub(super) fn probe(checks: &mut Checks, h: Option<&Hierarchy>) {
    let unified = h.and_then(|h| h.unified.clone());
    let mut ringbuf: Result<String, String> =
        Err("not tried: the probe object did not load".into());
    checks.as_root(
        "bpf.cgroup_skb",
        "BPF cgroup_skb load, attach, detach",
        true,
        "needs CONFIG_CGROUP_BPF and a cgroup2 tree; raise RLIMIT_MEMLOCK on kernels before 5.11",
        || {
            let dir = unified.as_deref().ok_or("no cgroup2 tree to attach to")?;
            let mut obj =
                Ebpf::load(PROBE_OBJ).map_err(|e| format!("loading the probe object: {e}"))?;
            ringbuf = match obj.map("events") {
                Some(Map::RingBuf(_)) => Ok("created a BPF_MAP_TYPE_RINGBUF map".into()),
                _ => Err("the probe's ring buffer map was not created".into()),
            };
            attach_detach(&mut obj, dir)
        },
    );
    checks.as_root(
        "bpf.ringbuf",
        "BPF ring buffer maps",
        true,
        "upgrade to Linux 5.8 or later",
        || ringbuf,
    );

    checks.record(
        "bpf.btf",
        "kernel BTF (/sys/kernel/btf/vmlinux)",
        true,
        match aya::Btf::from_sys_fs() {
            Ok(_) => Ok("parsed".into()),
            Err(e) => Err(e.to_string()),
        },
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    );

    checks.record(
        "bpf.lsm",
        "BPF LSM",
        false,
        match std::fs::read_to_string("/sys/kernel/security/lsm") {
            Ok(s) if s.split(',').any(|m| m.trim() == "bpf") => Ok(s.trim().to_owned()),
            Ok(s) => Err(format!("active LSMs: {}", s.trim())),
            Err(e) => Err(format!("/sys/kernel/security/lsm: {e}")),
        },
        "boot with lsm=...,bpf (optional: agentnode does not need it yet)",
    );
}

fn attach_detach(obj: &mut Ebpf, parent: &std::path::Path) -> Result<String, String> {
    let node = OwnedDir::create(parent, &scratch_name("bpf")).map_err(|e| format!("mkdir: {e}"))?;
    let prog: &mut CgroupSkb = obj
        .program_mut("probe_egress")
        .ok_or("probe_egress missing from the probe object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load()
        .map_err(|e| format!("loading cgroup_skb: {e}"))?;
    let cgroup = std::fs::File::open(node.path())
        .map_err(|e| format!("open {}: {e}", node.path().display()))?;
    // Single: aya passes AllowMultiple into BPF_LINK_CREATE and gets EINVAL (aya#1078).
    let link = prog
        .attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(|e| format!("attaching to {}: {e}", node.path().display()))?;
    prog.detach(link).map_err(|e| format!("detaching: {e}"))?;
    Ok(format!(
        "attached to and detached from {}",
        node.path().display()
    ))
}
