//! Networking probes, run in a scratch network namespace that exists only while one thread
//! lives: a veth pair enslaved to a bridge, and an nftables table. When the thread ends, the
//! kernel destroys the namespace and everything in it, so nothing can leak.

use std::process::Command;

use super::Checks;

pub(super) fn probe(checks: &mut Checks) {
    let mut nft: Result<String, String> = Err("not tried: no scratch network namespace".into());
    checks.as_root(
        "net.veth_bridge",
        "netns with a veth pair and a bridge",
        true,
        "enable CONFIG_VETH and CONFIG_BRIDGE; install iproute2",
        || {
            let (links, tables) = std::thread::spawn(in_scratch_netns)
                .join()
                .map_err(|_| "the probe thread panicked".to_string())?;
            nft = tables;
            links
        },
    );
    checks.as_root(
        "net.nftables",
        "nftables",
        true,
        "install nftables (apt-get install nftables) and enable CONFIG_NF_TABLES",
        || nft,
    );
}

type Probe = Result<String, String>;

fn in_scratch_netns() -> (Probe, Probe) {
    // SAFETY: unshare affects only this thread, which exits right after the probe.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return (
            Err(format!("unshare(CLONE_NEWNET): {e}")),
            Err("no netns".into()),
        );
    }
    let links = run(&[
        &[
            "ip", "link", "add", "an-dv0", "type", "veth", "peer", "name", "an-dv1",
        ],
        &["ip", "link", "add", "an-dbr0", "type", "bridge"],
        &["ip", "link", "set", "an-dv0", "master", "an-dbr0"],
        &["ip", "link", "set", "an-dbr0", "up"],
    ])
    .map(|()| "veth pair on a bridge in a scratch netns".into());
    let tables = run(&[
        &["nft", "add", "table", "inet", "agentnode_doctor"],
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "agentnode_doctor",
            "post",
            "{ type nat hook postrouting priority 100 ; }",
        ],
        &["nft", "delete", "table", "inet", "agentnode_doctor"],
    ])
    .map(|()| "created a nat chain in a scratch netns".into());
    (links, tables)
}

fn run(commands: &[&[&str]]) -> Result<(), String> {
    for argv in commands {
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("{}: {e}", argv[0]))?;
        if !out.status.success() {
            return Err(format!(
                "`{}` failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}
