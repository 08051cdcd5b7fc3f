//! Kernel-enforced egress for one cgroup2 node: loads `ebpf/egress.bpf.c`, fills its maps from a
//! policy, attaches every program to the node and reads counters and denial events back.
//!
//! Each [`Egress`] owns its own instance of the object, so every task has its own maps: two
//! tasks' policies, clocks and counters never mix. Links are held by file descriptor, so when
//! the owner exits — even on SIGKILL — the kernel detaches them; unless they are pinned
//! ([`Egress::attach`] with a pin directory): then the links and the maps the owner uses stay
//! under bpffs, the policy enforced with no owner at all, until a later owner
//! [`Egress::open`]s them again and [`Egress::unpin`]s them at the task's end.

mod maps;
mod policy;

pub use maps::{Counters, Denial, DenialReason};
pub use policy::{CidrRule, Limits, PortRange, PROTO_TCP, PROTO_UDP};

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps};
use aya::Ebpf;

use crate::bpf::EGRESS_OBJ;
use maps::{Batch, RawConfig, RawExact, RawPorts};

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
    #[error("egress map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "egress map {name} is full ({MAP_ENTRIES} entries): an update holds the old and the new \
         entries at once, so change a policy this large in steps (the old policy stays in force)"
    )]
    Full { name: &'static str },
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

/// The maps user space reads and writes, pinned by these names (the others are the programs'
/// alone, held through them).
const PINNED_MAPS: [&str; 6] = [
    "allow",
    "allow_host",
    "exact",
    "config",
    "counters",
    "denials",
];

/// The programs, attached in this order; pinned links are named for them.
const PROGRAMS: [&str; 9] = [
    "egress_skb",
    "egress_skb_in",
    "egress_connect4",
    "egress_connect6",
    "egress_sendmsg4",
    "egress_sendmsg6",
    "egress_recvmsg4",
    "egress_recvmsg6",
    "egress_sockops",
];

/// Where port-53 traffic of the task goes instead: the node's DNS forwarder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsRedirect {
    pub v4: Option<[u8; 4]>,
    pub v6: Option<[u8; 16]>,
    pub port: u16,
}

/// Egress enforcement attached to one cgroup2 node; dropping it detaches everything.
pub struct Egress {
    // Owns the programs and, through them, the links unless pinned: dropping it detaches.
    // None when opened from pins (the pinned links hold the programs).
    ebpf: Option<Ebpf>,
    cgroup: PathBuf,
    /// Where the links and maps are pinned (None: not pinned, or unpinned).
    pinned: Option<PathBuf>,
    /// The pinned links, held here too: removing the pins while this value lives must not
    /// detach the programs (they go when both are gone).
    links: Vec<FdLink>,
    allow: LpmTrie<MapData, [u8; 16], RawPorts>,
    allow_host: HashMap<MapData, [u8; 16], RawPorts>,
    exact: HashMap<MapData, [u8; 16], RawExact>,
    config: Array<MapData, RawConfig>,
    counters: PerCpuArray<MapData, u64>,
    denials: RingBuf<MapData>,
    /// What `allow` and `allow_host` hold, sorted by key.
    rules: Vec<policy::Entry>,
    limits: Limits,
    dns: DnsRedirect,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("cgroup", &self.cgroup)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// Rules for one address (all 128 bits) go to the `allow_host` hash, the rest to the trie.
const HOST_PREFIX: u8 = 128;

/// `max_entries` of the `allow` and `allow_host` maps in `ebpf/egress.bpf.c`.
const MAP_ENTRIES: u32 = 65536;

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| match &source {
        // A full hash answers E2BIG, a full LPM trie ENOSPC.
        aya::maps::MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
        {
            Error::Full { name }
        }
        _ => Error::Map { name, source },
    }
}

fn lpm_key((prefix, addr): policy::RuleKey) -> Key<[u8; 16]> {
    Key::new(u32::from(prefix), addr)
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

fn from_pin<T: TryFrom<Map, Error = aya::maps::MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T> {
    let path = dir.join(name);
    let pinned = |e: aya::maps::MapError| Error::Pinned {
        path: path.clone(),
        detail: e.to_string(),
    };
    let map = Map::from_map_data(MapData::from_pin(&path).map_err(&pinned)?).map_err(&pinned)?;
    T::try_from(map).map_err(pinned)
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T> {
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

impl Egress {
    /// Loads a fresh instance, fills its maps (so there is no moment without the policy) and
    /// attaches every program to `cgroup_dir`, which must be a cgroup2 directory. With `pin`
    /// (a directory on a bpffs, made here), the links and the maps are pinned there: the
    /// enforcement outlives this value and its process, until [`Egress::unpin`] or
    /// [`Egress::remove_pins`]. A failure part way leaves no pin behind.
    pub fn attach(
        cgroup_dir: &Path,
        rules: &[CidrRule],
        limits: Limits,
        dns: DnsRedirect,
        pin: Option<&Path>,
    ) -> Result<Self> {
        let cgroup = File::open(cgroup_dir).map_err(|source| Error::Cgroup {
            path: cgroup_dir.to_owned(),
            source,
        })?;
        let ebpf = Ebpf::load(EGRESS_OBJ)?;
        if let Some(dir) = pin {
            std::fs::create_dir(dir).map_err(|e| pin_error(dir)(e.to_string()))?;
        }
        let attached = Self::fill_and_attach(ebpf, cgroup_dir, &cgroup, rules, limits, dns, pin);
        if let (Err(_), Some(dir)) = (&attached, pin) {
            let _ = Self::remove_pins(dir);
        }
        attached
    }

    fn fill_and_attach(
        mut ebpf: Ebpf,
        cgroup_dir: &Path,
        cgroup: &File,
        rules: &[CidrRule],
        limits: Limits,
        dns: DnsRedirect,
        pin: Option<&Path>,
    ) -> Result<Self> {
        if let Some(dir) = pin {
            // Before `take`: only the object knows its maps until then.
            for name in PINNED_MAPS {
                let map = ebpf.map(name).ok_or(Error::Map {
                    name,
                    source: aya::maps::MapError::InvalidName { name: name.into() },
                })?;
                map.pin(dir.join(name))
                    .map_err(|e| pin_error(dir)(e.to_string()))?;
            }
        }
        let mut me = Self {
            allow: take(&mut ebpf, "allow")?,
            allow_host: take(&mut ebpf, "allow_host")?,
            exact: take(&mut ebpf, "exact")?,
            config: take(&mut ebpf, "config")?,
            counters: take(&mut ebpf, "counters")?,
            denials: take(&mut ebpf, "denials")?,
            ebpf: None,
            cgroup: cgroup_dir.to_owned(),
            pinned: pin.map(Path::to_owned),
            links: Vec::new(),
            rules: Vec::new(),
            limits,
            dns,
        };
        me.set_rules(rules)?;
        me.write_config()?;
        // Backstop first, so no packet leaves between the hooks' attach and its own.
        for name in PROGRAMS {
            me.links.extend(attach_one(&mut ebpf, name, cgroup, pin)?);
        }
        me.ebpf = Some(ebpf);
        Ok(me)
    }

    /// Takes over the enforcement pinned at `dir` for `cgroup_dir` (by [`Egress::attach`],
    /// perhaps by another process that has since exited): every link must still be there.
    /// The maps are brought to `rules`, `limits` and `dns` (only what differs is written), so
    /// the caller's record of the policy is what holds from here on; addresses learned from
    /// DNS, the counters and the denials not yet read stay.
    pub fn open(
        cgroup_dir: &Path,
        dir: &Path,
        rules: &[CidrRule],
        limits: Limits,
        dns: DnsRedirect,
    ) -> Result<Self> {
        let mut links = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let path = dir.join(name);
            let link = PinnedLink::from_pin(&path).map_err(|e| Error::Pinned {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            links.push(FdLink::from(link));
        }
        let mut me = Self {
            allow: from_pin(dir, "allow")?,
            allow_host: from_pin(dir, "allow_host")?,
            exact: from_pin(dir, "exact")?,
            config: from_pin(dir, "config")?,
            counters: from_pin(dir, "counters")?,
            denials: from_pin(dir, "denials")?,
            ebpf: None,
            cgroup: cgroup_dir.to_owned(),
            pinned: None, // not unpinned on an error below: the task's policy stays in force
            links,
            rules: Vec::new(),
            limits,
            dns,
        };
        me.rules = me.read_rules();
        me.set_rules(rules)?;
        me.write_config()?;
        me.pinned = Some(dir.to_owned());
        Ok(me)
    }

    /// Removes the pins (the kernel detaches the programs once this value is dropped too).
    /// Nothing to do when not pinned; idempotent.
    pub fn unpin(&mut self) -> Result<()> {
        if let Some(dir) = self.pinned.take() {
            Self::remove_pins(&dir)?;
        }
        Ok(())
    }

    /// Forgets the pins without removing them: dropping this value then leaves the enforcement
    /// in the kernel, for a later [`Egress::open`].
    pub fn leave(&mut self) {
        self.pinned = None;
    }

    /// Removes the pin directory `dir` and what is pinned in it (whoever pinned it); returns
    /// whether it existed. The kernel detaches the programs once no one holds their links.
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

    /// The cgroup2 directory this is attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
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

    /// Makes the maps hold `next`. If that fails part way (e.g. the maps are full), the
    /// previous rules are put back, so a failed update leaves the old policy in force rather
    /// than a mix of both.
    fn apply(&mut self, next: Vec<policy::Entry>) -> Result<()> {
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

    fn write_rules(&mut self, entries: &[policy::Entry]) -> Result<()> {
        let (hosts, nets): (Vec<&policy::Entry>, Vec<&policy::Entry>) =
            entries.iter().partition(|e| e.0 .0 == HOST_PREFIX);
        let keys: Vec<[u8; 16]> = hosts.iter().map(|e| e.0 .1).collect();
        let values: Vec<RawPorts> = hosts.iter().map(|e| e.1).collect();
        // SAFETY: `allow_host` has `[u8; 16]` keys and `RawPorts` values.
        let r = unsafe { maps::batch(self.allow_host.map().fd().as_fd(), &keys, Some(&values)) };
        if !batched("allow_host", r)? {
            for (k, v) in keys.iter().zip(values) {
                self.allow_host
                    .insert(k, v, 0)
                    .map_err(map_error("allow_host"))?;
            }
        }
        let keys: Vec<Key<[u8; 16]>> = nets.iter().map(|e| lpm_key(e.0)).collect();
        let values: Vec<RawPorts> = nets.iter().map(|e| e.1).collect();
        // SAFETY: `allow` has `Key<[u8; 16]>` keys and `RawPorts` values.
        let r = unsafe { maps::batch(self.allow.map().fd().as_fd(), &keys, Some(&values)) };
        if !batched("allow", r)? {
            for (k, v) in keys.iter().zip(values) {
                self.allow.insert(k, v, 0).map_err(map_error("allow"))?;
            }
        }
        Ok(())
    }

    fn remove_rules(&mut self, stale: &[policy::RuleKey]) -> Result<()> {
        let (hosts, nets): (Vec<&policy::RuleKey>, Vec<&policy::RuleKey>) =
            stale.iter().partition(|k| k.0 == HOST_PREFIX);
        let keys: Vec<[u8; 16]> = hosts.iter().map(|k| k.1).collect();
        // SAFETY: as in write_rules; a delete passes no values.
        let r =
            unsafe { maps::batch::<_, RawPorts>(self.allow_host.map().fd().as_fd(), &keys, None) };
        if !batched("allow_host", r)? {
            for k in &keys {
                self.allow_host.remove(k).map_err(map_error("allow_host"))?;
            }
        }
        let keys: Vec<Key<[u8; 16]>> = nets.iter().map(|&&k| lpm_key(k)).collect();
        // SAFETY: as in write_rules.
        let r = unsafe { maps::batch::<_, RawPorts>(self.allow.map().fd().as_fd(), &keys, None) };
        if !batched("allow", r)? {
            for k in &keys {
                self.allow.remove(k).map_err(map_error("allow"))?;
            }
        }
        Ok(())
    }

    /// The rules as the kernel holds them, sorted as `policy::compile` returns them.
    fn read_rules(&self) -> Vec<policy::Entry> {
        let hosts = self
            .allow_host
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(k, v)| ((HOST_PREFIX, k), v));
        let nets = self
            .allow
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(k, v)| ((k.prefix_len() as u8, k.data()), v));
        let mut out: Vec<policy::Entry> = hosts.chain(nets).collect();
        out.sort_unstable_by_key(|e| e.0);
        out
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

    fn write_config(&mut self) -> Result<()> {
        let raw = RawConfig::new(&self.limits, &self.dns);
        self.config.set(0, raw, 0).map_err(|source| Error::Map {
            name: "config",
            source,
        })
    }

    /// Allows `addr` (16 bytes, IPv4-mapped for IPv4) on `ports` until `ttl` from now; merged
    /// with what a still-valid entry for the same address already allows.
    pub fn allow_exact(
        &mut self,
        addr: [u8; 16],
        ports: &[PortRange],
        ttl: Duration,
    ) -> Result<()> {
        let now = maps::boottime_ns();
        let mut merged: Vec<PortRange> = ports.to_vec();
        let mut expires = now.saturating_add(ttl.as_nanos() as u64);
        if let Ok(old) = self.exact.get(&addr, 0) {
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
        self.exact
            .insert(
                addr,
                RawExact {
                    expires_ns: expires,
                    ports,
                },
                0,
            )
            .map_err(|source| Error::Map {
                name: "exact",
                source,
            })
    }

    /// Removes expired exact-IP entries (the programs already ignore them); returns how many.
    pub fn expire_exact(&mut self) -> Result<usize> {
        let now = maps::boottime_ns();
        let stale: Vec<[u8; 16]> = self
            .exact
            .iter()
            .filter_map(std::result::Result::ok)
            .filter(|(_, v)| v.expires_ns <= now)
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            self.exact.remove(k).map_err(|source| Error::Map {
                name: "exact",
                source,
            })?;
        }
        Ok(stale.len())
    }

    /// Forgets every DNS-learned address (the host rules changed; the task resolves again).
    pub fn clear_exact(&mut self) -> Result<usize> {
        let keys: Vec<[u8; 16]> = self
            .exact
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        for k in &keys {
            self.exact.remove(k).map_err(|source| Error::Map {
                name: "exact",
                source,
            })?;
        }
        Ok(keys.len())
    }

    /// The number of CIDR entries in the kernel maps (after merging and inheritance).
    #[must_use]
    pub fn rule_entries(&self) -> usize {
        self.rules.len()
    }

    /// The task's counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        Counters::read(&self.counters).map_err(|source| Error::Map {
            name: "counters",
            source,
        })
    }

    /// Every denial event queued since the last call (non-blocking).
    pub fn denials(&mut self) -> Vec<Denial> {
        let mut out = Vec::new();
        while let Some(item) = self.denials.next() {
            if let Some(d) = Denial::parse(&item) {
                out.push(d);
            }
        }
        out
    }

    /// Becomes readable when denial events are queued (for an event loop's reader).
    #[must_use]
    pub fn events_fd(&self) -> RawFd {
        self.denials.as_raw_fd()
    }
}

/// Loads program `name` and attaches it to `cgroup`; with `pin`, its link is pinned there
/// under its name and returned (held by the pin and the caller, no longer by the program).
fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin: Option<&Path>,
) -> Result<Option<FdLink>> {
    let perr = |source| Error::Program { name, source };
    // Single: aya passes AllowMultiple into BPF_LINK_CREATE and gets EINVAL (aya#1078).
    let mode = CgroupAttachMode::Single;
    let link: std::result::Result<FdLink, aya::programs::links::LinkError> = match name {
        "egress_skb" | "egress_skb_in" => {
            let kind = if name == "egress_skb" {
                CgroupSkbAttachType::Egress
            } else {
                CgroupSkbAttachType::Ingress
            };
            let prog: &mut CgroupSkb = program(ebpf, name)?;
            prog.load().map_err(perr)?;
            let id = prog.attach(cgroup, kind, mode).map_err(perr)?;
            if pin.is_none() {
                return Ok(None);
            }
            prog.take_link(id).map_err(perr)?.try_into()
        }
        "egress_sockops" => {
            let prog: &mut SockOps = program(ebpf, name)?;
            prog.load().map_err(perr)?;
            let id = prog.attach(cgroup, mode).map_err(perr)?;
            if pin.is_none() {
                return Ok(None);
            }
            prog.take_link(id).map_err(perr)?.try_into()
        }
        _ => {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            prog.load().map_err(perr)?;
            let id = prog.attach(cgroup, mode).map_err(perr)?;
            if pin.is_none() {
                return Ok(None);
            }
            prog.take_link(id).map_err(perr)?.try_into()
        }
    };
    let path = pin.expect("returned above when not pinning").join(name);
    let pinned = link
        .map_err(|e| e.to_string())
        .and_then(|l| l.pin(&path).map_err(|e| e.to_string()));
    Ok(Some(FdLink::from(pinned.map_err(pin_error(&path))?)))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}
