//! A task's network for `--net egress`, made with rtnetlink instead of `ip` processes: its own
//! network namespace, named under `/run/netns`, joined to the node's bridge by a veth pair
//! (`eth0` inside, an isolated bridge port outside), with an address and a default route via
//! the bridge. Policy (names, addresses, owners, the bridge and its nftables rules) stays in
//! `agentnode.egress.network`; this module makes and removes the kernel objects. Needs
//! Linux ≥ 4.18 (isolated bridge ports) and `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`.
//!
//! Every step is made so that a crash at any point leaves only what the node's sweep finds:
//! the namespace is held by a descriptor, never named, until its veth carries the alias that
//! records its owner, so a process killed before that takes the namespace, and the veth pair
//! in it, down with it; the name is made last. Removal unnames the namespace first: a crash
//! then leaves at most the veth, which the sweep finds by its alias.

mod named;
mod rtnl;

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rtnl::Rtnl;

/// Errors from making or removing a task's network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("task networking: cannot enter the node's network namespace {path}: {source}")]
    NodeNetns { path: PathBuf, source: io::Error },
    #[error("task networking: cannot make a network namespace: {0} (run as root)")]
    Unshare(io::Error),
    #[error("task networking: the network namespace {0} exists")]
    NetnsExists(String),
    #[error(
        "task networking: the node's bridge {0} does not exist (the node network is not set \
         up: start the egress service first)"
    )]
    NoBridge(String),
    #[error(
        "task networking: {step} failed: {source} (run as root; `agentnode doctor` checks \
         the kernel)"
    )]
    Step { step: String, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

trait Context<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn step(self, step: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Step {
            step: step(),
            source,
        })
    }
}

/// A link of the node's namespace, as [`NodeSide::links`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub alias: Option<String>,
    /// The name of the link this one is a port of (a bridge).
    pub master: Option<String>,
}

/// One task's network, as [`NodeSide::add_task`] makes it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// The namespace's name under `/run/netns`.
    pub netns: String,
    /// The node side of the veth pair (the task side is `eth0`).
    pub veth: String,
    /// The veth's alias: what the node's sweep and allocation read.
    pub alias: String,
    pub bridge: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// The name of the task side of every veth pair.
pub const TASK_LINK: &str = "eth0";

/// What a name under `/run/netns` holds, as [`netns_state`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsState {
    /// No such name.
    Absent,
    /// A file that is no namespace: a crash between making the name and mounting the
    /// namespace on it left it (or another process is naming one right now).
    Unmounted,
    /// A namespace without [`TASK_LINK`]: its veth pair is gone (deleted by hand, or with the
    /// node's namespace when that was not the host's), so nothing of the node uses it.
    Orphaned,
    /// A namespace with its task link.
    Live,
}

/// What the name `netns` under `/run/netns` holds. The name is made last, once the veth pair
/// is up, and removed first: a named namespace without its task link is never one being made
/// or removed.
pub fn netns_state(netns: &str) -> Result<NetnsState> {
    let file = match File::open(named::path(netns)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(NetnsState::Absent),
        Err(e) => return Err(e).step(|| format!("opening the network namespace {netns}")),
    };
    on_own_thread(|| {
        // SAFETY: moves only this thread, which ends right after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(NetnsState::Unmounted);
            }
            return Err(e).step(|| format!("entering the network namespace {netns}"));
        }
        let mut rtnl = Rtnl::open().step(|| "opening an rtnetlink socket".into())?;
        let link = rtnl
            .index(TASK_LINK)
            .step(|| format!("looking up {TASK_LINK} in {netns}"))?;
        Ok(if link.is_some() {
            NetnsState::Live
        } else {
            NetnsState::Orphaned
        })
    })
}

/// The node's side: rtnetlink sockets in the namespace the bridge is in, one per call at a
/// time (a veth's removal waits tens of ms for the kernel; a task starting meanwhile must not
/// wait for it), kept for the next calls.
pub struct NodeSide {
    /// The node's namespace, when it is not this process's.
    netns: Option<File>,
    spare: Mutex<Vec<Rtnl>>,
}

/// A socket of [`NodeSide`], given back when dropped.
struct Lent<'a> {
    rtnl: Option<Rtnl>,
    to: &'a NodeSide,
}

impl std::ops::Deref for Lent<'_> {
    type Target = Rtnl;
    fn deref(&self) -> &Rtnl {
        self.rtnl.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Rtnl {
        self.rtnl.as_mut().expect("held until dropped")
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(rtnl) = self.rtnl.take() {
            self.to.spare().push(rtnl);
        }
    }
}

/// Runs `f` on a thread of its own, which may move into other network namespaces (the caller's
/// thread never does: a thread left in a task's namespace would make every later socket there)
/// and ends with `f`.
fn on_own_thread<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("agentnode-netns".into())
            .spawn_scoped(s, f)
            .map_err(Error::Unshare)?
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

impl NodeSide {
    /// The node side in the namespace at `node_netns` (a path like `/run/netns/NAME`), or in
    /// this process's when `None`.
    pub fn open(node_netns: Option<&Path>) -> Result<Self> {
        let netns = node_netns
            .map(|path| {
                File::open(path).map_err(|source| Error::NodeNetns {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?;
        let node = Self {
            netns,
            spare: Mutex::new(Vec::new()),
        };
        let first = node.connect()?;
        node.spare().push(first);
        Ok(node)
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Vec<Rtnl>> {
        self.spare.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new socket in the node's namespace.
    fn connect(&self) -> Result<Rtnl> {
        let opened = || Rtnl::open().step(|| "opening an rtnetlink socket".into());
        let Some(ns) = &self.netns else {
            return opened();
        };
        on_own_thread(|| {
            // SAFETY: moves only this thread, which ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::NodeNetns {
                    path: PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd())),
                    source: io::Error::last_os_error(),
                });
            }
            opened()
        })
    }

    /// A socket of the node's namespace for this call alone.
    fn rtnl(&self) -> Result<Lent<'_>> {
        let spare = self.spare().pop();
        let rtnl = match spare {
            Some(rtnl) => rtnl,
            None => self.connect()?,
        };
        Ok(Lent {
            rtnl: Some(rtnl),
            to: self,
        })
    }

    /// Every link of the node's namespace, with its alias and its master's name.
    pub fn links(&self) -> Result<Vec<Link>> {
        let links = self.rtnl()?.links().step(|| "listing links".into())?;
        let name = |index| {
            links
                .iter()
                .find(|l| l.index == index)
                .map(|l| l.name.clone())
        };
        Ok(links
            .iter()
            .map(|l| Link {
                name: l.name.clone(),
                alias: l.alias.clone(),
                master: l.master.and_then(name),
            })
            .collect())
    }

    /// Makes the task's network namespace, named `spec.netns`, with loopback up and `eth0`
    /// (its address, up, the default route via the gateway), the other end of which is
    /// `spec.veth` here: an isolated port of the bridge, up, with its alias. On any error,
    /// nothing of it is left.
    pub fn add_task(&self, spec: &TaskSpec) -> Result<()> {
        if named::path(&spec.netns).symlink_metadata().is_ok() {
            // Never a namespace another attempt may still hold (an undo would remove it).
            return Err(Error::NetnsExists(spec.netns.clone()));
        }
        let mut node = self.rtnl()?;
        let bridge = node
            .index(&spec.bridge)
            .step(|| format!("looking up the bridge {}", spec.bridge))?
            .ok_or_else(|| Error::NoBridge(spec.bridge.clone()))?;
        let (mut inside, netns) = on_own_thread(|| {
            // SAFETY: moves only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Unshare(io::Error::last_os_error()));
            }
            let rtnl = Rtnl::open().step(|| "opening an rtnetlink socket".into())?;
            let ns = File::open("/proc/thread-self/ns/net").map_err(Error::Unshare)?;
            Ok((rtnl, OwnedFd::from(ns)))
        })?;
        // Until it is named, the namespace lives by `netns` alone: an error (or a crash) from
        // here takes it, and the veth pair in it, down.
        inside
            .loopback_up()
            .step(|| format!("bringing up lo in {}", spec.netns))?;
        node.add_veth(&spec.veth, bridge, TASK_LINK, netns.as_raw_fd())
            .step(|| {
                format!(
                    "creating the veth {} (peer {TASK_LINK} in {}) on {}",
                    spec.veth, spec.netns, spec.bridge
                )
            })?;
        let made = Self::configure(&mut node, &mut inside, spec).and_then(|()| {
            named::bind(&spec.netns, netns.as_fd()).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::NetnsExists(spec.netns.clone())
                } else {
                    Error::Step {
                        step: format!("naming the network namespace {}", spec.netns),
                        source: e,
                    }
                }
            })
        });
        if made.is_err() {
            // The namespace goes with `netns`, but its veth pair only with the kernel's
            // deferred namespace cleanup: delete it now, so its name and address are free.
            let _ = node.delete(&spec.veth);
        }
        made
    }

    fn configure(node: &mut Rtnl, inside: &mut Rtnl, spec: &TaskSpec) -> Result<()> {
        // An isolated port forwards only to non-isolated ones (the bridge itself): no frame
        // goes from one task to another. The alias records the address and owner: allocation
        // and sweeps need no state file.
        node.isolate_up(&spec.veth, &spec.alias)
            .step(|| format!("isolating and bringing up {}", spec.veth))?;
        let eth0 = inside
            .index(TASK_LINK)
            .step(|| format!("looking up {TASK_LINK} in {}", spec.netns))?
            .ok_or_else(|| Error::Step {
                step: format!("looking up {TASK_LINK} in {}", spec.netns),
                source: io::Error::from_raw_os_error(libc::ENODEV),
            })?;
        inside
            .add_address(eth0, spec.address, spec.prefix)
            .step(|| {
                format!(
                    "adding {}/{} to {TASK_LINK} in {}",
                    spec.address, spec.prefix, spec.netns
                )
            })?;
        inside
            .up(eth0)
            .step(|| format!("bringing up {TASK_LINK} in {}", spec.netns))?;
        inside.add_default_route(spec.gateway).step(|| {
            format!(
                "adding the default route via {} in {}",
                spec.gateway, spec.netns
            )
        })
    }

    /// Removes the task's namespace name alone (idempotent; `false` when there was none). The
    /// namespace, and the veth pair with it, go in the kernel's namespace cleanup once nothing
    /// holds it, batched with the other namespaces ending then; deleting the veth here would
    /// wait for the network's readers (an RCU grace period, ~25 ms) with the rtnl lock held,
    /// which every task start's veth waits for.
    pub fn release_task(&self, netns: &str) -> Result<bool> {
        named::remove(netns).step(|| format!("removing the network namespace {netns}"))
    }

    /// Removes the task's namespace name and its veth (idempotent); says which of the two
    /// were there. Both are tried whatever the other's outcome.
    pub fn remove_task(&self, veth: &str, netns: &str) -> Result<(bool, bool)> {
        let unnamed =
            named::remove(netns).step(|| format!("removing the network namespace {netns}"));
        let deleted = self
            .rtnl()?
            .delete(veth)
            .step(|| format!("deleting the veth {veth}"));
        Ok((deleted?, unnamed?))
    }
}
