//! BPF objects built from `ebpf/*.bpf.c` by `build.rs` and embedded in the binary, so the node
//! needs neither clang nor kernel headers at run time.
//!
//! Links made here are held by file descriptor and never pinned: when the owner (or the whole
//! daemon, even on SIGKILL) goes away, the kernel detaches them.

/// The doctor's probe: a pass-all `cgroup_skb/egress` program and a ring buffer map.
pub static PROBE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.bpf.o"));

/// Egress enforcement: `sock_addr` hooks, the `cgroup_skb` backstop and rate limiter, and their maps
/// (`ebpf/egress.bpf.c`).
pub static EGRESS_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress.bpf.o"));

/// Exec tracing: the `sched_process_exec` BTF tracepoint and its ring buffer (`ebpf/exec.bpf.c`).
pub static EXEC_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exec.bpf.o"));

/// Exit recording: the `sched_process_exit` BTF tracepoint and the pinned map of watched
/// tasks' statuses (`ebpf/exits.bpf.c`).
pub static EXITS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/exits.bpf.o"));
