/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Definitions shared by agentnode's BPF programs and its Rust loader: fixed-width types only. */
#ifndef AGENTNODE_H
#define AGENTNODE_H

#include <linux/types.h>

/* cgroup_skb return codes: bit 0 = allow, bit 1 = congestion notification (CN). */
#define AN_SKB_DROP 0
#define AN_SKB_PASS 1
#define AN_SKB_CN 2

/* Egress (ebpf/egress.bpf.c). Addresses are 16 bytes; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d)
 * so one map serves both families and v4-mapped IPv6 sockets match their IPv4 rules. */
#define AN_MAX_PORT_RANGES 8

#define AN_PROTO_TCP 1
#define AN_PROTO_UDP 2

struct an_ports {
	__u16 lo[AN_MAX_PORT_RANGES];
	__u16 hi[AN_MAX_PORT_RANGES];
	__u8 proto[AN_MAX_PORT_RANGES]; /* AN_PROTO_* bits */
	__u8 n;
	__u8 pad[7];
};

/* Rule keys start with the task's id (its cgroup id, `struct an_task.id`): one set of maps
 * serves every task of the node, and a task's programs only ever look its own id up. */
struct an_lpm_key {
	__u32 prefixlen; /* 64 (the id) + the rule's prefix */
	__u64 id;
	__u8 addr[16];
} __attribute__((packed));

struct an_host_key {
	__u64 id;
	__u8 addr[16];
};

struct an_exact {
	__u64 expires_ns; /* CLOCK_BOOTTIME */
	struct an_ports ports;
};

/* What the loader sets for a task, read by every program. */
struct an_config {
	__u8 dns4[4];      /* the DNS forwarder (IPv4, network order); all zero: no redirect */
	__u8 dns6[16];     /* the DNS forwarder (IPv6); all zero: no redirect for IPv6 sockets */
	__u16 dns_port;    /* network order */
	__u16 pad;
	__u64 rate_bps;    /* bytes per second out; 0: unlimited */
	__u64 rate_burst_ns;  /* how far ahead of real time the virtual clock may run */
	__u64 conn_per_sec;   /* new connections/datagram destinations per second; 0: unlimited */
	__u64 conn_burst_ns;
};

/* Virtual clocks (index 0: bytes, 1: connections): the time at which the budget is spent. */
#define AN_CLOCK_BYTES 0
#define AN_CLOCK_CONNS 1

/* A task's state: the cgroup storage of the cgroup its programs are attached to (shared by
 * every attach type there), so the programs find it from any hook, sockops included, and
 * for processes in the task's sub-cgroups too. Zero (no entry written) denies everything. */
struct an_task {
	__u64 id; /* the task's cgroup id: its key in the rule maps and its denials; 0: no entry */
	struct an_config cfg;
	__u64 clocks[2];
};

enum an_counter {
	AN_C_BYTES_OUT,
	AN_C_PACKETS_OUT,
	AN_C_BYTES_IN,
	AN_C_PACKETS_IN,
	AN_C_CONN_ALLOWED,
	AN_C_CONN_DENIED,
	AN_C_PACKETS_DROPPED,
	AN_C_RATE_DROPPED,
	AN_C_DNS_REDIRECTED,
	AN_C_MAX,
};

/* A task's counters: the per-CPU cgroup storage of its cgroup. */
struct an_counters {
	__u64 c[AN_C_MAX];
};

enum an_reason {
	AN_R_POLICY = 1,    /* no rule allows the destination */
	AN_R_CONN_RATE = 2, /* over the new-connection rate */
	AN_R_BACKSTOP = 3,  /* packet from a raw/ICMP socket or otherwise unchecked path */
	AN_R_NO_ENTRY = 4,  /* the cgroup has no entry (no policy written, or withdrawn) */
};

struct an_denial {
	__u64 time_ns; /* CLOCK_BOOTTIME */
	__u64 cgroup_id;
	__u8 addr[16];
	__u16 port; /* host order */
	__u8 proto; /* IPPROTO_* */
	__u8 reason;
	__u32 pid;
};

#endif /* AGENTNODE_H */
