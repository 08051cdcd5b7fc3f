//! Map value layouts shared with `ebpf/include/agentnode.h` (kept in sync by the size checks at
//! the bottom) and the decoding of counters and denial events.

pub const MAX_RANGES: usize = 8;

/// `struct an_ports`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawPorts {
    pub(super) lo: [u16; MAX_RANGES],
    pub(super) hi: [u16; MAX_RANGES],
    pub(super) proto: [u8; MAX_RANGES],
    pub(super) n: u8,
    pub(super) pad: [u8; 7],
}

// SAFETY: plain old data: fixed-size integers and arrays, padding spelled out.
unsafe impl aya::Pod for RawPorts {}

/// `struct an_exact`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawExact {
    pub expires_ns: u64,
    pub ports: RawPorts,
}

// SAFETY: as for RawPorts.
unsafe impl aya::Pod for RawExact {}

/// `struct an_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawConfig {
    pub(super) dns4: [u8; 4],
    pub(super) dns6: [u8; 16],
    pub(super) dns_port: u16,
    pub(super) pad: u16,
    pub(super) rate_bps: u64,
    pub(super) rate_burst_ns: u64,
    pub(super) conn_per_sec: u64,
    pub(super) conn_burst_ns: u64,
}

// SAFETY: as for RawPorts.
unsafe impl aya::Pod for RawConfig {}

/// `struct an_host_key`: a task's id and one address; also the `exact` map's key.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostKey {
    pub id: u64,
    pub addr: [u8; 16],
}

// SAFETY: as for RawPorts.
unsafe impl aya::Pod for HostKey {}

/// The data of `struct an_lpm_key` after its prefix length: the task's id, then the address.
pub type NetKey = [u8; 24];

pub fn net_key(id: u64, addr: &[u8; 16]) -> NetKey {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&id.to_ne_bytes());
    k[8..].copy_from_slice(addr);
    k
}

/// The task id and the address of a `NetKey`.
pub fn split_net_key(k: &NetKey) -> (u64, [u8; 16]) {
    (
        u64::from_ne_bytes(k[..8].try_into().expect("8 bytes")),
        k[8..].try_into().expect("16 bytes"),
    )
}

/// `struct an_task`: a task's cgroup storage.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RawTask {
    pub id: u64,
    pub cfg: RawConfig,
    pub clocks: [u64; 2],
}

// SAFETY: as for RawPorts.
unsafe impl aya::Pod for RawTask {}

/// The bytes of a plain-old-data value, as a map syscall passes them.
pub fn bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod: every byte is initialised (padding is spelled out as fields).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

pub fn bytes_mut<T: aya::Pod>(v: &mut T) -> &mut [u8] {
    // SAFETY: as for `bytes`; any byte pattern is a valid T.
    unsafe { std::slice::from_raw_parts_mut(std::ptr::from_mut(v).cast::<u8>(), size_of::<T>()) }
}

pub(super) const NSEC_PER_SEC: u64 = 1_000_000_000;

/// `enum an_counter`'s count: the `u64`s of `struct an_counters`, per CPU.
pub const COUNTERS: usize = 9;

/// Per-task counters (`enum an_counter`), summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub bytes_out: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub connections_allowed: u64,
    pub connections_denied: u64,
    pub packets_dropped: u64,
    pub rate_dropped: u64,
    pub dns_redirected: u64,
}

impl Counters {
    /// Sums a per-CPU `struct an_counters` value (`COUNTERS` words per CPU) over the CPUs.
    pub(super) fn from_per_cpu(words: &[u64]) -> Self {
        let sum = |i: usize| -> u64 { words.chunks_exact(COUNTERS).map(|c| c[i]).sum() };
        Self {
            bytes_out: sum(0),
            packets_out: sum(1),
            bytes_in: sum(2),
            packets_in: sum(3),
            connections_allowed: sum(4),
            connections_denied: sum(5),
            packets_dropped: sum(6),
            rate_dropped: sum(7),
            dns_redirected: sum(8),
        }
    }
}

/// Why a destination was denied (`enum an_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialReason {
    Policy,
    ConnRate,
    Backstop,
    /// The task's cgroup had no entry: none written yet, or withdrawn.
    NoEntry,
}

/// One denial (`struct an_denial`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Denial {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub time_ns: u64,
    pub cgroup_id: u64,
    /// 16 bytes; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    pub port: u16,
    /// IPPROTO_* number.
    pub proto: u8,
    pub reason: DenialReason,
    pub pid: u32,
}

impl Denial {
    pub(super) fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 40 {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Some(Self {
            time_ns: u64_at(0),
            cgroup_id: u64_at(8),
            addr: b[16..32].try_into().expect("16 bytes"),
            port: u16::from_ne_bytes([b[32], b[33]]),
            proto: b[34],
            reason: match b[35] {
                1 => DenialReason::Policy,
                2 => DenialReason::ConnRate,
                3 => DenialReason::Backstop,
                4 => DenialReason::NoEntry,
                _ => return None,
            },
            pid: u32::from_ne_bytes(b[36..40].try_into().expect("4 bytes")),
        })
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    ts.tv_sec as u64 * NSEC_PER_SEC + ts.tv_nsec as u64
}

const _: () = assert!(std::mem::size_of::<RawPorts>() == 48);
const _: () = assert!(std::mem::size_of::<RawExact>() == 56);
const _: () = assert!(std::mem::size_of::<RawConfig>() == 56);
const _: () = assert!(std::mem::size_of::<RawTask>() == 80);
const _: () = assert!(std::mem::size_of::<HostKey>() == 24);

/// `bpf_attr.batch` for `BPF_MAP_{UPDATE,DELETE}_BATCH`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's ENOTSUPP: this map type has no batch operation.
const ENOTSUPP: i32 = 524;

/// The outcome of a batch call the kernel may not implement for a map type.
pub enum Batch {
    Done,
    /// The map type has no batch operation: nothing was done, go one element at a time.
    Unsupported,
}

/// Writes (`values: Some`) or deletes `keys` in one syscall: the kernel walks the arrays itself,
/// so 10k entries cost one user/kernel crossing instead of 10k. Not atomic: on an error, the
/// entries before the failing one are done.
///
/// # Safety
/// `fd` is a BPF map whose key size is `size_of::<K>()` and value size `size_of::<V>()`.
pub unsafe fn batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> std::result::Result<Batch, aya::sys::SyscallError> {
    use std::os::fd::AsRawFd;

    if keys.is_empty() {
        return Ok(Batch::Done);
    }
    assert!(values.is_none_or(|v| v.len() == keys.len()));
    let count = u32::try_from(keys.len()).expect("fewer than 2^32 map entries");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    let (cmd, call) = if values.is_some() {
        (BPF_MAP_UPDATE_BATCH, "bpf_map_update_batch")
    } else {
        (BPF_MAP_DELETE_BATCH, "bpf_map_delete_batch")
    };
    // SAFETY: attr points at a live, initialised bpf_attr prefix of the size passed; keys and
    // values hold `count` elements of the map's key and value sizes (the caller's contract).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(Batch::Done);
    }
    let io_error = std::io::Error::last_os_error();
    if io_error.raw_os_error() == Some(ENOTSUPP) {
        return Ok(Batch::Unsupported);
    }
    Err(aya::sys::SyscallError { call, io_error })
}
