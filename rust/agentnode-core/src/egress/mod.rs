//! Kernel-enforced egress for a node's tasks: [`Programs`] loads `ebpf/egress.bpf.c` once per
//! node (the verifier's cost, tens of ms, paid once), and each task's [`Egress`] attaches those
//! programs to its cgroup2 node and keeps its policy in the node's maps under its own id.
//!
//! A task's id is its cgroup's id. Its config, clocks and id live in the cgroup storage of the
//! cgroup its programs are attached to, its counters in the per-CPU one, and its rules in
//! node-wide maps under keys that start with its id: the programs only ever look up the id
//! their own attachment's storage names, so two tasks' policies, clocks and counters never
//! mix. A cgroup with no id written (or withdrawn) is denied everything. Denials of every task
//! share one ring buffer; each record names its task.
//!
//! Links are held by file descriptor, so when the owner exits — even on SIGKILL — the kernel
//! detaches them; unless they are pinned ([`Egress::attach`] with a pin directory, and
//! [`Programs::load`] with the node's): then the policy stays enforced with no owner at all,
//! until a later owner [`Egress::open`]s the task again and [`Egress::unpin`]s it at its end.

mod maps;
mod policy;
mod sys;

pub use maps::{Counters, Denial, DenialReason};
pub use policy::{CidrRule, Limits, PortRange, PROTO_TCP, PROTO_UDP};

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, IterableMap, Map, MapData, RingBuf};
use aya::programs::{CgroupSkb, CgroupSockAddr, SockOps};
use aya::Ebpf;

use crate::bpf::EGRESS_OBJ;
use maps::{Batch, HostKey, NetKey, RawConfig, RawExact, RawPorts, RawTask};

/// Errors from loading, attaching or updating egress enforcement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid egress policy: {0}")]
    Policy(String),
    #[error("cannot load the egress BPF object: {0} (run `agentnode doctor` as root)")]
    Load(#[from] aya::EbpfError),
    #[error("cannot load or attach egress program {name}: {source} (run `agentnode doctor`)")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach egress program {name} to {path}: {source}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("egress map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("egress map {name}: {source}")]
    Syscall {
        name: &'static str,
        source: std::io::Error,
    },
    #[error(
        "egress map {name} is full ({TASK_ENTRIES} entries for one task): an update holds the \
         old and the new entries at once, so change a policy this large in steps (the old \
         policy stays in force)"
    )]
    Full { name: &'static str },
    #[error(
        "the node's egress map {name} is full (its tasks' entries together): the change was not \
         made (the old policy stays in force)"
    )]
    NodeFull { name: &'static str },
    #[error(
        "the task has {TASK_LEARNED} addresses learned from DNS in force: no more until some \
         expire"
    )]
    Learned,
    #[error("the task's egress entry was withdrawn: it is denied everything until it ends")]
    Withdrawn,
    #[error("{path} has this node's egress enforcement already (one per cgroup)")]
    Taken { path: PathBuf },
    #[error("cannot open cgroup2 directory {path}: {source} (pass an existing cgroup2 node)")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot pin the egress enforcement at {path}: {detail} (is it on a bpffs?)")]
    Pin { path: PathBuf, detail: String },
    #[error("no pinned egress enforcement at {path}: {detail}")]
    Pinned { path: PathBuf, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The node maps user space reads and writes, pinned by these names with the programs (the
/// others are the programs' alone, held through them).
const NODE_MAPS: [&str; 6] = [
    "allow",
    "allow_host",
    "exact",
    "tasks",
    "counters",
    "denials",
];

/// The programs and where each attaches, in attach order (the backstop first, so no packet
/// leaves between the hooks' attach and its own); pinned programs and a task's pinned links
/// are named for them.
/// (`enum bpf_attach_type` values, from the kernel's UAPI.)
const PROGRAMS: [(&str, u32); 9] = [
    ("egress_skb", 1),       // BPF_CGROUP_INET_EGRESS
    ("egress_skb_in", 0),    // BPF_CGROUP_INET_INGRESS
    ("egress_connect4", 10), // BPF_CGROUP_INET4_CONNECT
    ("egress_connect6", 11), // BPF_CGROUP_INET6_CONNECT
    ("egress_sendmsg4", 14), // BPF_CGROUP_UDP4_SENDMSG
    ("egress_sendmsg6", 15), // BPF_CGROUP_UDP6_SENDMSG
    ("egress_recvmsg4", 19), // BPF_CGROUP_UDP4_RECVMSG
    ("egress_recvmsg6", 20), // BPF_CGROUP_UDP6_RECVMSG
    ("egress_sockops", 3),   // BPF_CGROUP_SOCK_OPS
];

/// At most this many entries of one task in `allow`, and as many in `allow_host` (what each
/// task's own maps held before they were shared); the node maps hold 16 times as many.
pub const TASK_ENTRIES: usize = 65536;

/// At most this many addresses learned from DNS per task (the node's `exact` map holds 16
/// times as many), so one task's lookups cannot fill it for the others.
pub const TASK_LEARNED: usize = 16384;

/// Rules for one address (all 128 bits) go to the `allow_host` hash, the rest to the trie.
const HOST_PREFIX: u8 = 128;

/// Where port-53 traffic of the task goes instead: the node's DNS forwarder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsRedirect {
    pub v4: Option<[u8; 4]>,
    pub v6: Option<[u8; 16]>,
    pub port: u16,
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| match &source {
        // A full hash answers E2BIG, a full LPM trie ENOSPC.
        aya::maps::MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
        {
            Error::NodeFull { name }
        }
        _ => Error::Map { name, source },
    }
}

fn sys_error(name: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Syscall { name, source }
}

/// Whether a batch call did the work; `false`: this kernel has none for the map type (LPM
/// tries got theirs later than hashes), so the caller goes one element at a time.
fn batched(
    name: &'static str,
    r: std::result::Result<Batch, aya::sys::SyscallError>,
) -> Result<bool> {
    match r {
        Ok(Batch::Done) => Ok(true),
        Ok(Batch::Unsupported) => Ok(false),
        Err(e) => Err(map_error(name)(e.into())),
    }
}

fn pin_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |detail| Error::Pin {
        path: path.to_owned(),
        detail,
    }
}

fn pinned_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |detail| Error::Pinned {
        path: path.to_owned(),
        detail,
    }
}

fn from_pin<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T> {
    let path = dir.join(name);
    let pinned = |e: aya::maps::MapError| pinned_error(&path)(e.to_string());
    let map = Map::from_map_data(MapData::from_pin(&path).map_err(&pinned)?).map_err(&pinned)?;
    T::try_from(map).map_err(pinned)
}

fn take<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// A map of a type aya has no typed API for (cgroup storage), by its `MapData`.
fn take_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData> {
    let invalid = || Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    };
    match ebpf.take_map(name).ok_or_else(invalid)? {
        Map::CgroupStorage(m) | Map::PerCpuCgroupStorage(m) | Map::Unsupported(m) => Ok(m),
        _ => Err(invalid()),
    }
}

/// Removes the pin directory `dir` and what is pinned in it (whoever pinned it); returns
/// whether it existed. The kernel frees the objects once no one holds them.
pub fn remove_pins(dir: &Path) -> Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(pin_error(dir)(e.to_string())),
    };
    for entry in entries {
        let path = entry.map_err(|e| pin_error(dir)(e.to_string()))?.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(pin_error(&path)(e.to_string())),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
        Err(e) => Err(pin_error(dir)(e.to_string())),
    }
}

/// A name for this build's programs (a hash of the object): pinned programs are named for it,
/// so a daemon of another build never takes over programs whose maps it would misread.
#[must_use]
pub fn programs_tag() -> String {
    // FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
    let hash = EGRESS_OBJ.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The node maps, behind one lock: every task's updates go through it.
struct Maps {
    allow: LpmTrie<MapData, NetKey, RawPorts>,
    allow_host: HashMap<MapData, HostKey, RawPorts>,
    exact: HashMap<MapData, HostKey, RawExact>,
    tasks: MapData,
    counters: MapData,
}

/// The node's egress programs and maps, loaded (and verified) once; every task's [`Egress`]
/// attaches these.
pub struct Programs {
    progs: Vec<OwnedFd>,
    /// The kernel's ids of `progs`: an adopted task's links must be to these.
    prog_ids: Vec<u32>,
    maps: Mutex<Maps>,
    denials: Mutex<RingBuf<MapData>>,
    /// Where the programs and node maps are pinned (None: not pinned, or unpinned).
    pinned: Mutex<Option<PathBuf>>,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs")
            .field("prog_ids", &self.prog_ids)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Programs {
    /// Loads the programs and the node maps. With `pin` (a directory on a bpffs): takes over
    /// what is pinned there if it is all there, else loads afresh and pins it there (for the
    /// tasks' pinned links to outlive this process and a later owner to find their maps).
    pub fn load(pin: Option<&Path>) -> Result<Self> {
        if let Some(dir) = pin {
            if dir.exists() {
                if let Ok(me) = Self::open(dir) {
                    return Ok(me);
                }
                // Part of a pinning a killed owner never finished: no task can be using it.
                remove_pins(dir)?;
            }
        }
        let mut ebpf = Ebpf::load(EGRESS_OBJ)?;
        let mut progs = Vec::with_capacity(PROGRAMS.len());
        for (name, _) in PROGRAMS {
            progs.push(load_program(&mut ebpf, name)?);
        }
        let maps = Maps {
            allow: take(&mut ebpf, "allow")?,
            allow_host: take(&mut ebpf, "allow_host")?,
            exact: take(&mut ebpf, "exact")?,
            tasks: take_data(&mut ebpf, "tasks")?,
            counters: take_data(&mut ebpf, "counters")?,
        };
        let denials = take(&mut ebpf, "denials")?;
        // The programs hold the maps they use (dns_orig, active_open) from here on.
        drop(ebpf);
        let me = Self::new(progs, maps, denials)?;
        if let Some(dir) = pin {
            std::fs::create_dir(dir).map_err(|e| pin_error(dir)(e.to_string()))?;
            if let Err(e) = me.pin(dir) {
                let _ = remove_pins(dir);
                return Err(e);
            }
            *lock(&me.pinned) = Some(dir.to_owned());
        }
        Ok(me)
    }

    fn new(progs: Vec<OwnedFd>, maps: Maps, denials: RingBuf<MapData>) -> Result<Self> {
        let prog_ids = progs
            .iter()
            .zip(PROGRAMS)
            .map(|(fd, (name, _))| {
                sys::ids(fd.as_fd())
                    .map(|(id, _)| id)
                    .map_err(|source| Error::Attach {
                        name,
                        path: PathBuf::new(),
                        source,
                    })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            progs,
            prog_ids,
            maps: Mutex::new(maps),
            denials: Mutex::new(denials),
            pinned: Mutex::new(None),
        })
    }

    fn pin(&self, dir: &Path) -> Result<()> {
        let pin = |fd: std::os::fd::BorrowedFd<'_>, name: &str| {
            let path = dir.join(name);
            sys::pin(fd, &path).map_err(|e| pin_error(&path)(e.to_string()))
        };
        for (fd, (name, _)) in self.progs.iter().zip(PROGRAMS) {
            pin(fd.as_fd(), name)?;
        }
        let maps = lock(&self.maps);
        pin(maps.allow.map().fd().as_fd(), "allow")?;
        pin(maps.allow_host.map().fd().as_fd(), "allow_host")?;
        pin(maps.exact.map().fd().as_fd(), "exact")?;
        pin(maps.tasks.fd().as_fd(), "tasks")?;
        pin(maps.counters.fd().as_fd(), "counters")?;
        pin(lock(&self.denials).as_fd(), "denials")
    }

    /// Takes over the programs and node maps pinned at `dir` (by [`Programs::load`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let mut progs = Vec::with_capacity(PROGRAMS.len());
        for (name, _) in PROGRAMS {
            let path = dir.join(name);
            progs.push(sys::get_pinned(&path).map_err(|e| pinned_error(&path)(e.to_string()))?);
        }
        let data = |name: &'static str| {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|e| pinned_error(&path)(e.to_string()))
        };
        let maps = Maps {
            allow: from_pin(dir, "allow")?,
            allow_host: from_pin(dir, "allow_host")?,
            exact: from_pin(dir, "exact")?,
            tasks: data("tasks")?,
            counters: data("counters")?,
        };
        debug_assert!(NODE_MAPS.iter().all(|m| dir.join(m).exists()));
        let me = Self::new(progs, maps, from_pin(dir, "denials")?)?;
        *lock(&me.pinned) = Some(dir.to_owned());
        Ok(me)
    }

    /// Removes the node's pins (nothing may need them: no task outlives this process). The
    /// kernel frees the programs and maps once no one holds them. Idempotent.
    pub fn unpin(&self) -> Result<()> {
        if let Some(dir) = lock(&self.pinned).take() {
            remove_pins(&dir)?;
        }
        Ok(())
    }

    /// Every denial event queued since the last call, of every task (non-blocking).
    pub fn denials(&self) -> Vec<Denial> {
        let mut ring = lock(&self.denials);
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(d) = Denial::parse(&item) {
                out.push(d);
            }
        }
        out
    }

    /// Becomes readable when denial events are queued (for an event loop's reader).
    #[must_use]
    pub fn events_fd(&self) -> RawFd {
        lock(&self.denials).as_raw_fd()
    }

    /// Removes the rules and learned addresses of every task but those in `keep` (what
    /// tasks that ended while no owner ran left behind); returns how many entries went.
    pub fn purge(&self, keep: &HashSet<u64>) -> Result<usize> {
        let mut maps = lock(&self.maps);
        let nets: Vec<Key<NetKey>> = maps
            .allow
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !keep.contains(&maps::split_net_key(&k.data()).0))
            .collect();
        let hosts: Vec<HostKey> = maps
            .allow_host
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !keep.contains(&k.id))
            .collect();
        let learned: Vec<HostKey> = maps
            .exact
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| !keep.contains(&k.id))
            .collect();
        for k in &nets {
            maps.allow.remove(k).map_err(map_error("allow"))?;
        }
        for k in &hosts {
            maps.allow_host.remove(k).map_err(map_error("allow_host"))?;
        }
        for k in &learned {
            maps.exact.remove(k).map_err(map_error("exact"))?;
        }
        Ok(nets.len() + hosts.len() + learned.len())
    }
}

/// Loads program `name` of `ebpf` into the kernel; returns its fd (a copy: the object may go).
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd> {
    let perr = |source| Error::Program { name, source };
    let prog = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    let fd = match name {
        "egress_skb" | "egress_skb_in" => {
            let p: &mut CgroupSkb = prog.try_into().map_err(perr)?;
            p.load().map_err(perr)?;
            p.fd().map_err(perr)?.as_fd().try_clone_to_owned()
        }
        "egress_sockops" => {
            let p: &mut SockOps = prog.try_into().map_err(perr)?;
            p.load().map_err(perr)?;
            p.fd().map_err(perr)?.as_fd().try_clone_to_owned()
        }
        _ => {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
            p.load().map_err(perr)?;
            p.fd().map_err(perr)?.as_fd().try_clone_to_owned()
        }
    };
    fd.map_err(|e| perr(aya::programs::ProgramError::IOError(e)))
}

/// Egress enforcement for one task: the node's programs attached to its cgroup2 node, its
/// entry in the node's maps. Dropping it detaches the programs and withdraws the entry,
/// unless it is pinned (then both stay, for a later owner).
pub struct Egress {
    programs: Arc<Programs>,
    cgroup: PathBuf,
    /// The task's id: its cgroup's id.
    id: u64,
    /// Where the links are pinned (None: not pinned, or unpinned).
    pinned: Option<PathBuf>,
    /// Held here too when pinned: removing the pins while this value lives must not detach
    /// the programs (they go when both are gone).
    links: Vec<OwnedFd>,
    /// Whether the entry stays when this value goes (left to a later owner, or taking one
    /// over is not done, or another owner's).
    keep: bool,
    withdrawn: bool,
    /// The process that made this value: a forked copy's drop must not withdraw the entry of
    /// the task its parent still runs.
    owner: u32,
    /// What `allow` and `allow_host` hold for the task, sorted by key.
    rules: Vec<policy::Entry>,
    /// How many addresses learned from DNS `exact` holds for the task (expired ones included).
    learned: usize,
    limits: Limits,
    dns: DnsRedirect,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("cgroup", &self.cgroup)
            .field("id", &self.id)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

fn open_cgroup(dir: &Path) -> Result<(File, u64)> {
    let err = |source| Error::Cgroup {
        path: dir.to_owned(),
        source,
    };
    let f = File::open(dir).map_err(err)?;
    let id = f.metadata().map_err(err)?.ino();
    Ok((f, id))
}

impl Egress {
    /// Attaches `programs` to `cgroup_dir` (a cgroup2 directory) for a task whose policy is
    /// `rules`, `limits` and `dns`: its rules are written before the programs attach, its entry
    /// after (until then the cgroup is denied everything). With `pin` (a directory on a bpffs,
    /// made here), the links are pinned there: the enforcement outlives this value and its
    /// process, until [`Egress::unpin`] or [`remove_pins`]. A failure part way leaves nothing.
    pub fn attach(
        programs: Arc<Programs>,
        cgroup_dir: &Path,
        rules: &[CidrRule],
        limits: Limits,
        dns: DnsRedirect,
        pin: Option<&Path>,
    ) -> Result<Self> {
        let (cgroup, id) = open_cgroup(cgroup_dir)?;
        if let Some(dir) = pin {
            std::fs::create_dir(dir).map_err(|e| pin_error(dir)(e.to_string()))?;
        }
        let mut me = Self {
            programs,
            cgroup: cgroup_dir.to_owned(),
            id,
            pinned: pin.map(Path::to_owned),
            links: Vec::with_capacity(PROGRAMS.len()),
            keep: false,
            withdrawn: false,
            owner: std::process::id(),
            rules: Vec::new(),
            learned: 0,
            limits,
            dns,
        };
        if let Err(e) = me.fill_and_attach(&cgroup, rules) {
            // Unpinned, dropping `me` withdraws what was written and detaches what attached.
            if let Some(dir) = me.pinned.take() {
                let _ = remove_pins(&dir);
            }
            return Err(e);
        }
        Ok(me)
    }

    fn fill_and_attach(&mut self, cgroup: &File, rules: &[CidrRule]) -> Result<()> {
        if self.read_task()?.is_some_and(|t| t.id == self.id) {
            self.keep = true; // the other owner's
            return Err(Error::Taken {
                path: self.cgroup.clone(),
            });
        }
        self.set_rules(rules)?;
        for ((name, kind), prog) in PROGRAMS.iter().zip(&self.programs.progs) {
            let link = sys::link_cgroup(prog.as_fd(), cgroup.as_fd(), *kind).map_err(|source| {
                Error::Attach {
                    name,
                    path: self.cgroup.clone(),
                    source,
                }
            })?;
            if let Some(dir) = &self.pinned {
                let path = dir.join(name);
                sys::pin(link.as_fd(), &path).map_err(|e| pin_error(&path)(e.to_string()))?;
            }
            self.links.push(link);
        }
        // A cgroup attached to before keeps its storage: a new task starts from zero.
        let maps = lock(&self.programs.maps);
        let zero = vec![0u8; maps::COUNTERS * 8 * nr_cpus()?];
        sys::update(maps.counters.fd().as_fd(), &self.id.to_ne_bytes(), &zero)
            .map_err(sys_error("counters"))?;
        drop(maps);
        self.write_task(&RawTask::default())
    }

    /// Takes over the enforcement of `cgroup_dir` whose links are pinned at `dir` (by
    /// [`Egress::attach`], perhaps by another process that has since exited): every link must
    /// still be there, to `programs`. The task's entry is brought to `rules`, `limits` and
    /// `dns` (only what differs is written), so the caller's record of the policy is what
    /// holds from here on; addresses learned from DNS, the counters and the clocks stay.
    pub fn open(
        programs: Arc<Programs>,
        cgroup_dir: &Path,
        dir: &Path,
        rules: &[CidrRule],
        limits: Limits,
        dns: DnsRedirect,
    ) -> Result<Self> {
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for ((name, _), want) in PROGRAMS.iter().zip(&programs.prog_ids) {
            let path = dir.join(name);
            let link = sys::get_pinned(&path).map_err(|e| pinned_error(&path)(e.to_string()))?;
            let (_, prog) =
                sys::ids(link.as_fd()).map_err(|e| pinned_error(&path)(e.to_string()))?;
            if prog != *want {
                return Err(pinned_error(&path)(format!(
                    "its program (id {prog}) is not the node's (id {want})"
                )));
            }
            links.push(link);
        }
        let (_, id) = open_cgroup(cgroup_dir)?;
        let mut me = Self {
            programs,
            cgroup: cgroup_dir.to_owned(),
            id,
            pinned: None,
            links,
            keep: true, // an error below leaves the task's entry as it is: still enforced
            withdrawn: false,
            owner: std::process::id(),
            rules: Vec::new(),
            learned: 0,
            limits,
            dns,
        };
        let task = me.read_task()?.filter(|t| t.id == id).ok_or_else(|| {
            pinned_error(dir)(format!("the node's maps hold no entry for cgroup id {id}"))
        })?;
        me.rules = me.read_rules();
        me.learned = me.read_learned().len();
        me.set_rules(rules)?;
        me.write_task(&task)?;
        me.pinned = Some(dir.to_owned());
        me.keep = false;
        Ok(me)
    }

    /// Removes the pins (the kernel detaches the programs once this value is dropped too).
    /// Nothing to do when not pinned; idempotent.
    pub fn unpin(&mut self) -> Result<()> {
        if let Some(dir) = self.pinned.take() {
            remove_pins(&dir)?;
        }
        Ok(())
    }

    /// Forgets the pins without removing them: dropping this value then leaves the enforcement
    /// in the kernel, for a later [`Egress::open`].
    pub fn leave(&mut self) {
        self.pinned = None;
        self.keep = true;
    }

    /// Withdraws the task's entry: its programs stay attached and deny it everything (the
    /// first step of detaching, which dropping this value takes itself). Idempotent.
    pub fn withdraw(&mut self) -> Result<()> {
        if self.withdrawn {
            return Ok(());
        }
        self.withdrawn = true;
        self.write_id(0)?;
        let old = std::mem::take(&mut self.rules);
        self.transition(&old, &[])?;
        let learned = self.read_learned();
        self.remove_learned(&learned)?;
        Ok(())
    }

    /// The cgroup2 directory this is attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The task's id (its cgroup's id), as its denials carry it.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    fn check_live(&self) -> Result<()> {
        if self.withdrawn {
            Err(Error::Withdrawn)
        } else {
            Ok(())
        }
    }

    /// Replaces the CIDR rules live. Only entries that differ are touched: new and changed
    /// ones are written (in one batch where the kernel can) before stale ones are removed, so
    /// a connection allowed by both policies never sees a gap.
    pub fn set_rules(&mut self, rules: &[CidrRule]) -> Result<()> {
        self.apply(policy::compile(rules)?)
    }

    /// `set_rules` for rules given as (address, prefix, one port range) each, which a caller
    /// holding a large policy in a flat form can pass without building a `CidrRule` apiece.
    pub fn set_rule_ranges(
        &mut self,
        rules: impl Iterator<Item = ([u8; 16], u8, PortRange)>,
    ) -> Result<()> {
        self.apply(policy::compile_ranges(rules)?)
    }

    /// Makes the maps hold `next`. If that fails part way (e.g. the node's maps are full), the
    /// previous rules are put back, so a failed update leaves the old policy in force rather
    /// than a mix of both.
    fn apply(&mut self, next: Vec<policy::Entry>) -> Result<()> {
        self.check_live()?;
        for (name, host) in [("allow_host", true), ("allow", false)] {
            if peak(&self.rules, &next, host) > TASK_ENTRIES {
                return Err(Error::Full { name });
            }
        }
        let old = std::mem::take(&mut self.rules);
        let Err(e) = self.transition(&old, &next) else {
            self.rules = next;
            return Ok(());
        };
        // A batch stops at its first failure: diff from what the kernel holds now.
        let now = self.read_rules();
        self.rules = match self.transition(&now, &old) {
            Ok(()) => old,
            Err(_) => self.read_rules(),
        };
        Err(e)
    }

    fn transition(&mut self, from: &[policy::Entry], to: &[policy::Entry]) -> Result<()> {
        let (write, remove) = policy::diff(from, to);
        self.write_rules(&write)?;
        self.remove_rules(&remove)
    }

    fn host_key(&self, addr: [u8; 16]) -> HostKey {
        HostKey { id: self.id, addr }
    }

    fn net_key(&self, (prefix, addr): policy::RuleKey) -> Key<NetKey> {
        Key::new(64 + u32::from(prefix), maps::net_key(self.id, &addr))
    }

    fn write_rules(&mut self, entries: &[policy::Entry]) -> Result<()> {
        let (hosts, nets): (Vec<&policy::Entry>, Vec<&policy::Entry>) =
            entries.iter().partition(|e| e.0 .0 == HOST_PREFIX);
        let mut maps = lock(&self.programs.maps);
        let keys: Vec<HostKey> = hosts.iter().map(|e| self.host_key(e.0 .1)).collect();
        let values: Vec<RawPorts> = hosts.iter().map(|e| e.1).collect();
        // SAFETY: `allow_host` has `HostKey` keys and `RawPorts` values.
        let r = unsafe { maps::batch(maps.allow_host.map().fd().as_fd(), &keys, Some(&values)) };
        if !batched("allow_host", r)? {
            for (k, v) in keys.iter().zip(values) {
                maps.allow_host
                    .insert(k, v, 0)
                    .map_err(map_error("allow_host"))?;
            }
        }
        let keys: Vec<Key<NetKey>> = nets.iter().map(|e| self.net_key(e.0)).collect();
        let values: Vec<RawPorts> = nets.iter().map(|e| e.1).collect();
        // SAFETY: `allow` has `Key<NetKey>` keys and `RawPorts` values.
        let r = unsafe { maps::batch(maps.allow.map().fd().as_fd(), &keys, Some(&values)) };
        if !batched("allow", r)? {
            for (k, v) in keys.iter().zip(values) {
                maps.allow.insert(k, v, 0).map_err(map_error("allow"))?;
            }
        }
        Ok(())
    }

    fn remove_rules(&mut self, stale: &[policy::RuleKey]) -> Result<()> {
        let (hosts, nets): (Vec<&policy::RuleKey>, Vec<&policy::RuleKey>) =
            stale.iter().partition(|k| k.0 == HOST_PREFIX);
        let mut maps = lock(&self.programs.maps);
        let keys: Vec<HostKey> = hosts.iter().map(|k| self.host_key(k.1)).collect();
        // SAFETY: as in write_rules; a delete passes no values.
        let r =
            unsafe { maps::batch::<_, RawPorts>(maps.allow_host.map().fd().as_fd(), &keys, None) };
        if !batched("allow_host", r)? {
            for k in &keys {
                maps.allow_host.remove(k).map_err(map_error("allow_host"))?;
            }
        }
        let keys: Vec<Key<NetKey>> = nets.iter().map(|&&k| self.net_key(k)).collect();
        // SAFETY: as in write_rules.
        let r = unsafe { maps::batch::<_, RawPorts>(maps.allow.map().fd().as_fd(), &keys, None) };
        if !batched("allow", r)? {
            for k in &keys {
                maps.allow.remove(k).map_err(map_error("allow"))?;
            }
        }
        Ok(())
    }

    /// The task's rules as the kernel holds them, sorted as `policy::compile` returns them.
    fn read_rules(&self) -> Vec<policy::Entry> {
        let maps = lock(&self.programs.maps);
        let hosts = maps
            .allow_host
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(k, _)| k.id == self.id)
            .map(|(k, v)| ((HOST_PREFIX, k.addr), v));
        let nets = maps
            .allow
            .iter()
            .filter_map(std::result::Result::ok)
            .filter_map(|(k, v)| {
                let (id, addr) = maps::split_net_key(&k.data());
                (id == self.id).then(|| (((k.prefix_len() - 64) as u8, addr), v))
            });
        let mut out: Vec<policy::Entry> = hosts.chain(nets).collect();
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    /// The task's learned addresses with their entries.
    fn read_learned(&self) -> Vec<(HostKey, RawExact)> {
        lock(&self.programs.maps)
            .exact
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(k, _)| k.id == self.id)
            .collect()
    }

    fn remove_learned(&mut self, entries: &[(HostKey, RawExact)]) -> Result<()> {
        let mut maps = lock(&self.programs.maps);
        for (k, _) in entries {
            match maps.exact.remove(k) {
                Ok(()) => {}
                // Gone already (expired by another thread meanwhile).
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_error("exact")(e)),
            }
            self.learned = self.learned.saturating_sub(1);
        }
        Ok(())
    }

    fn read_task(&self) -> Result<Option<RawTask>> {
        let mut task = RawTask::default();
        let found = sys::lookup(
            lock(&self.programs.maps).tasks.fd().as_fd(),
            &self.id.to_ne_bytes(),
            maps::bytes_mut(&mut task),
        )
        .map_err(sys_error("tasks"))?;
        Ok(found.then_some(task))
    }

    /// Writes the task's entry: its id (so the programs allow what its rules allow), its config
    /// from `self`, and the clocks of `base`.
    fn write_task(&self, base: &RawTask) -> Result<()> {
        let task = RawTask {
            id: self.id,
            cfg: RawConfig::new(&self.limits, &self.dns),
            clocks: base.clocks,
        };
        sys::update(
            lock(&self.programs.maps).tasks.fd().as_fd(),
            &self.id.to_ne_bytes(),
            maps::bytes(&task),
        )
        .map_err(sys_error("tasks"))
    }

    fn write_id(&self, id: u64) -> Result<()> {
        let Some(mut task) = self.read_task()? else {
            return Ok(()); // never attached: nothing to withdraw
        };
        task.id = id;
        sys::update(
            lock(&self.programs.maps).tasks.fd().as_fd(),
            &self.id.to_ne_bytes(),
            maps::bytes(&task),
        )
        .map_err(sys_error("tasks"))
    }

    fn write_config(&mut self) -> Result<()> {
        self.check_live()?;
        let task = self.read_task()?.unwrap_or_default();
        self.write_task(&task)
    }

    /// Changes the byte and connection rate limits live.
    pub fn set_limits(&mut self, limits: Limits) -> Result<()> {
        self.limits = limits;
        self.write_config()
    }

    /// Changes (or with `port == 0` removes) the DNS redirect.
    pub fn set_dns(&mut self, dns: DnsRedirect) -> Result<()> {
        self.dns = dns;
        self.write_config()
    }

    /// Allows `addr` (16 bytes, IPv4-mapped for IPv4) on `ports` until `ttl` from now; merged
    /// with what a still-valid entry for the same address already allows.
    pub fn allow_exact(
        &mut self,
        addr: [u8; 16],
        ports: &[PortRange],
        ttl: Duration,
    ) -> Result<()> {
        self.check_live()?;
        let now = maps::boottime_ns();
        let key = self.host_key(addr);
        let mut merged: Vec<PortRange> = ports.to_vec();
        let mut expires = now.saturating_add(ttl.as_nanos() as u64);
        let old = lock(&self.programs.maps).exact.get(&key, 0).ok();
        if let Some(old) = old {
            if old.expires_ns > now {
                merged.extend(old.ports.ranges());
                expires = expires.max(old.expires_ns);
            }
        }
        let ports = RawPorts::from_ranges(&policy::normalise(&merged)).map_err(|n| {
            Error::Policy(format!(
                "{n} port ranges for one address (at most {})",
                maps::MAX_RANGES
            ))
        })?;
        if old.is_none() && self.learned >= TASK_LEARNED && self.expire_exact()? == 0 {
            return Err(Error::Learned);
        }
        let value = RawExact {
            expires_ns: expires,
            ports,
        };
        lock(&self.programs.maps)
            .exact
            .insert(key, value, 0)
            .map_err(map_error("exact"))?;
        if old.is_none() {
            self.learned += 1;
        }
        Ok(())
    }

    /// Removes expired exact-IP entries (the programs already ignore them); returns how many.
    pub fn expire_exact(&mut self) -> Result<usize> {
        let now = maps::boottime_ns();
        let stale: Vec<(HostKey, RawExact)> = self
            .read_learned()
            .into_iter()
            .filter(|(_, v)| v.expires_ns <= now)
            .collect();
        self.remove_learned(&stale)?;
        Ok(stale.len())
    }

    /// Forgets every DNS-learned address (the host rules changed; the task resolves again).
    pub fn clear_exact(&mut self) -> Result<usize> {
        let all = self.read_learned();
        self.remove_learned(&all)?;
        Ok(all.len())
    }

    /// The number of CIDR entries in the kernel maps (after merging and inheritance).
    #[must_use]
    pub fn rule_entries(&self) -> usize {
        self.rules.len()
    }

    /// The task's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let mut words = vec![0u64; maps::COUNTERS * nr_cpus()?];
        // SAFETY: u64s have no invalid byte patterns nor padding.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8)
        };
        sys::lookup(
            lock(&self.programs.maps).counters.fd().as_fd(),
            &self.id.to_ne_bytes(),
            buf,
        )
        .map_err(sys_error("counters"))?;
        Ok(Counters::from_per_cpu(&words))
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        // Pinned (not unpinned), the enforcement stays with its entry: left to the pins.
        if !self.keep && self.pinned.is_none() && self.owner == std::process::id() {
            let _ = self.withdraw();
        }
    }
}

/// How many keys the map of host (or else net) rules holds for a task at the peak of the
/// change from `from` to `to` (both sorted by key): new keys are written before stale ones go.
fn peak(from: &[policy::Entry], to: &[policy::Entry], host: bool) -> usize {
    let keys = |v: &[policy::Entry]| -> Vec<policy::RuleKey> {
        v.iter()
            .map(|e| e.0)
            .filter(|k| (k.0 == HOST_PREFIX) == host)
            .collect()
    };
    let (old, new) = (keys(from), keys(to));
    let (mut at_old, mut at_new, mut union) = (0, 0, 0);
    while at_old < old.len() || at_new < new.len() {
        match (old.get(at_old), new.get(at_new)) {
            (Some(o), Some(n)) if o == n => (at_old, at_new) = (at_old + 1, at_new + 1),
            (Some(o), Some(n)) if o < n => at_old += 1,
            (Some(_), None) => at_old += 1,
            _ => at_new += 1,
        }
        union += 1;
    }
    union
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, source)| Error::Syscall {
        name: "counters",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(keys: &[(u8, u8)]) -> Vec<policy::Entry> {
        let mut v: Vec<policy::Entry> = keys
            .iter()
            .map(|&(prefix, last)| {
                let mut addr = [0u8; 16];
                addr[15] = last;
                ((prefix, addr), RawPorts::default())
            })
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }

    #[test]
    fn peak_counts_old_and_new_keys_of_one_map_at_once() {
        let from = entries(&[(128, 1), (128, 2), (120, 0)]);
        let to = entries(&[(128, 2), (128, 3), (128, 4), (112, 0)]);
        assert_eq!(peak(&from, &to, true), 4); // 1, 2, 3, 4
        assert_eq!(peak(&from, &to, false), 2); // /120 and /112
        assert_eq!(peak(&from, &from, true), 2);
        assert_eq!(peak(&[], &to, true), 3);
    }

    #[test]
    fn net_keys_carry_the_task_id_before_the_address() {
        let addr = [7u8; 16];
        let key = maps::net_key(42, &addr);
        assert_eq!(maps::split_net_key(&key), (42, addr));
        assert_eq!(size_of::<Key<NetKey>>(), 28, "struct an_lpm_key (packed)");
    }
}
