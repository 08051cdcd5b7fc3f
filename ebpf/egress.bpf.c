// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Egress enforcement for a node's tasks: loaded (and verified) once per node, attached to each
 * task's cgroup2 node. A task's state lives where only its own programs' runs find it: its
 * config, clocks and id in the cgroup storage of the cgroup the programs are attached to, its
 * counters in the per-CPU one, its rules in node-wide maps under keys that start with its id.
 * A cgroup whose storage holds no id (nothing written for it) is denied everything.
 *
 * Sockets are checked where they name a destination (connect4/6, sendmsg4/6): deny by default,
 * allow what the CIDR trie, the DNS-learned exact-IP hash or loopback allows. cgroup_skb/egress
 * is the backstop for what those hooks never see (raw and ICMP sockets, and TCP sockets that
 * never called connect(): accepted ones, and the handshake of a connection being accepted)
 * and the rate limiter. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/socket.h>
#include <asm-generic/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "agentnode.h"

#define NSEC_PER_SEC 1000000000ULL
#define SOCK_STREAM_ 1
#define SOCK_DGRAM_ 2

/* The node's rules, every task's under its id. Sized for many tasks (each holds at most
 * AN_TASK_ENTRIES of its own, which the loader enforces); allocated as entries are added. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct an_lpm_key);
	__type(value, struct an_ports);
} allow SEC(".maps");

/* Single-address rules (/128; /32 for IPv4) live here, not in the trie: a full-length prefix is
 * always the longest match, and a hash update costs a fraction of a trie update, which is what
 * makes replacing a policy of 10k hosts fast. Values carry inherited ports as trie entries do. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__type(key, struct an_host_key);
	__type(value, struct an_ports);
} allow_host SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct an_host_key);
	__type(value, struct an_exact);
} exact SEC(".maps");

/* Keyed by the cgroup id alone: one value per cgroup, shared by every attach type there. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_STORAGE);
	__type(key, __u64);
	__type(value, struct an_task);
} tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE);
	__type(key, __u64);
	__type(value, struct an_counters);
} counters SEC(".maps");

struct orig_dst {
	__u8 addr[16];
	__u32 port; /* network order, as in bpf_sock_addr.user_port */
};

/* Where a redirected DNS query was really sent, for the recvmsg rewrite: kept with the socket
 * (no node-wide table one task's queries could crowd another's out of). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} dns_orig SEC(".maps");

/* Marks a TCP socket that opened its connection itself (sockops TCP_CONNECT_CB, which runs
 * only after connect4/6 allowed the destination): its packets skip the per-packet peer check.
 * Accepted sockets never get the mark (storage is not cloned to a listener's children). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} active_open SEC(".maps");

/* Every task's denials; each record names its task, and the loader hands it to its owner. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} denials SEC(".maps");

static __always_inline struct an_task *task(void)
{
	return bpf_get_local_storage(&tasks, 0);
}

static __always_inline void count(__u32 idx, __u64 n)
{
	struct an_counters *cs = bpf_get_local_storage(&counters, 0);

	if (idx < AN_C_MAX)
		cs->c[idx] += n;
}

static __always_inline int ports_match(const struct an_ports *p, __u16 port, __u8 proto)
{
#pragma unroll
	for (int i = 0; i < AN_MAX_PORT_RANGES; i++) {
		if (i >= p->n)
			break;
		if ((p->proto[i] & proto) && port >= p->lo[i] && port <= p->hi[i])
			return 1;
	}
	return 0;
}

/* BPF has no memcmp: compare 16-byte addresses as four words. */
static __always_inline int eq16(const __u8 *a, const __u8 *b)
{
	__u32 x[4], y[4];

	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int is_loopback(const __u8 *a)
{
	__u32 w[4];

	__builtin_memcpy(w, a, 16);
	if (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1))
		return 1;
	/* ::ffff:127.0.0.0/104 */
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 &&
	       a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff &&
	       a[11] == 0xff && a[12] == 127;
}

/* port: host order; proto: AN_PROTO_* bit. The task has an entry (t->id != 0). */
static __always_inline int allowed(const struct an_task *t, const __u8 *addr, __u16 port,
				   __u8 proto)
{
	struct an_lpm_key key = {.prefixlen = 64 + 128};
	struct an_host_key hk = {.id = t->id};
	struct an_ports *p;
	struct an_exact *e;

	if (is_loopback(addr))
		return 1;
	__builtin_memcpy(hk.addr, addr, 16);
	p = bpf_map_lookup_elem(&allow_host, &hk);
	if (!p) {
		key.id = t->id;
		__builtin_memcpy(key.addr, addr, 16);
		p = bpf_map_lookup_elem(&allow, &key);
	}
	if (p && ports_match(p, port, proto))
		return 1;
	e = bpf_map_lookup_elem(&exact, &hk);
	if (e && e->expires_ns > bpf_ktime_get_boot_ns() && ports_match(&e->ports, port, proto))
		return 1;
	return 0;
}

/* `cgroup_id`: the task's id, or for a cgroup with no entry the one the caller sees. */
static __always_inline void deny_event(__u64 cgroup_id, const __u8 *addr, __u16 port, __u8 proto,
				       __u8 reason)
{
	struct an_denial *d = bpf_ringbuf_reserve(&denials, sizeof(*d), 0);

	if (!d)
		return;
	d->time_ns = bpf_ktime_get_boot_ns();
	d->cgroup_id = cgroup_id;
	__builtin_memcpy(d->addr, addr, 16);
	d->port = port;
	d->proto = proto;
	d->reason = reason;
	d->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_ringbuf_submit(d, 0);
}

/* A virtual clock (`now` from the clock the caller uses): each event pushes the clock by `cost`;
 * the event is over budget when the clock would run more than `horizon` ahead of now.
 * Lock-free: racing CPUs each add their cost atomically, and a loser of the idle-reset race
 * only loses the reset, never a charge. */
static __always_inline __s64 clock_charge(struct an_task *t, __u32 idx, __u64 cost, __u64 horizon,
					  __u64 now)
{
	__u64 *clk = &t->clocks[idx & 1];
	__u64 old, next;

	old = *clk;
	if (old < now)
		__sync_val_compare_and_swap(clk, old, now);
	next = __sync_fetch_and_add(clk, cost) + cost;
	if (next > now + horizon) {
		__sync_fetch_and_sub(clk, cost);
		return -1;
	}
	return (__s64)(next - now);
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		return AN_PROTO_TCP;
	if (ctx->protocol == IPPROTO_UDP)
		return AN_PROTO_UDP;
	return 0;
}

static __always_inline void addr4(__u8 *out, __u32 ip4)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &ip4, 4);
}

static __always_inline void addr6(__u8 *out, struct bpf_sock_addr *ctx)
{
	__u32 w[4];

	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	__builtin_memcpy(out, w, 16);
}

static __always_inline int zero16(const __u8 *a)
{
	__u32 w[4];

	__builtin_memcpy(w, a, 16);
	return (w[0] | w[1] | w[2] | w[3]) == 0;
}

/* Sends port-53 traffic to the node's forwarder; returns 1 when it did. */
static __always_inline int dns_redirect(struct bpf_sock_addr *ctx, struct an_task *t,
					const __u8 *addr, int v6)
{
	struct an_config *c = &t->cfg;
	struct bpf_sock *sk = ctx->sk;
	struct orig_dst *o;

	if (c->dns_port == 0 || bpf_ntohs((__u16)ctx->user_port) != 53)
		return 0;
	if (v6 ? zero16(c->dns6) : (c->dns4[0] | c->dns4[1] | c->dns4[2] | c->dns4[3]) == 0)
		return 0;
	if (!sk)
		return 0;
	o = bpf_sk_storage_get(&dns_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 0; /* not redirected: the policy decides, as for any destination */
	__builtin_memcpy(o->addr, addr, 16);
	o->port = ctx->user_port;
	if (v6) {
		__u32 w[4];

		__builtin_memcpy(w, c->dns6, 16);
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
	} else {
		__u32 ip;

		__builtin_memcpy(&ip, c->dns4, 4);
		ctx->user_ip4 = ip;
	}
	ctx->user_port = c->dns_port;
	count(AN_C_DNS_REDIRECTED, 1);
	return 1;
}

static __always_inline int check(struct bpf_sock_addr *ctx, const __u8 *addr, int v6, int is_connect)
{
	struct an_task *t = task();
	__u8 proto = sock_proto(ctx);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct an_config *c = &t->cfg;

	if (!t->id) {
		count(AN_C_CONN_DENIED, 1);
		deny_event(bpf_get_current_cgroup_id(), addr, port, ctx->protocol, AN_R_NO_ENTRY);
		return 0;
	}
	if (!proto)
		return 1; /* not TCP/UDP: the cgroup_skb backstop decides */
	if (dns_redirect(ctx, t, addr, v6)) {
		count(AN_C_CONN_ALLOWED, 1);
		return 1;
	}
	if (!allowed(t, addr, port, proto)) {
		count(AN_C_CONN_DENIED, 1);
		deny_event(t->id, addr, port, ctx->protocol, AN_R_POLICY);
		return 0;
	}
	if (is_connect && c->conn_per_sec && !is_loopback(addr) &&
	    clock_charge(t, AN_CLOCK_CONNS, NSEC_PER_SEC / c->conn_per_sec, c->conn_burst_ns,
			 bpf_ktime_get_boot_ns()) < 0) {
		count(AN_C_CONN_DENIED, 1);
		deny_event(t->id, addr, port, ctx->protocol, AN_R_CONN_RATE);
		return 0;
	}
	count(AN_C_CONN_ALLOWED, 1);
	return 1;
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx)
{
	__u8 a[16];

	addr4(a, ctx->user_ip4);
	return check(ctx, a, 0, 1);
}

SEC("cgroup/connect6")
int egress_connect6(struct bpf_sock_addr *ctx)
{
	__u8 a[16];

	addr6(a, ctx);
	return check(ctx, a, 1, 1);
}

SEC("cgroup/sendmsg4")
int egress_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u8 a[16];

	addr4(a, ctx->user_ip4);
	return check(ctx, a, 0, 0);
}

SEC("cgroup/sendmsg6")
int egress_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u8 a[16];

	addr6(a, ctx);
	return check(ctx, a, 1, 0);
}

/* Answers from the forwarder appear to come from the resolver the task asked. */
SEC("cgroup/recvmsg4")
int egress_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct an_task *t = task();
	struct an_config *c = &t->cfg;
	struct bpf_sock *sk = ctx->sk;
	struct orig_dst *o;
	__u32 ip;

	if (!t->id || c->dns_port == 0 || ctx->user_port != c->dns_port || !sk)
		return 1;
	__builtin_memcpy(&ip, c->dns4, 4);
	if (ctx->user_ip4 != ip)
		return 1;
	o = bpf_sk_storage_get(&dns_orig, sk, 0, 0);
	if (!o)
		return 1;
	__builtin_memcpy(&ip, o->addr + 12, 4);
	ctx->user_ip4 = ip;
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/recvmsg6")
int egress_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct an_task *t = task();
	struct an_config *c = &t->cfg;
	struct bpf_sock *sk = ctx->sk;
	struct orig_dst *o;
	__u8 a[16];
	__u32 w[4];

	if (!t->id || c->dns_port == 0 || ctx->user_port != c->dns_port || !sk)
		return 1;
	addr6(a, ctx);
	if (!eq16(a, c->dns6))
		return 1;
	o = bpf_sk_storage_get(&dns_orig, sk, 0, 0);
	if (!o)
		return 1;
	__builtin_memcpy(w, o->addr, 16);
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = o->port;
	return 1;
}

/* Destination of an outgoing packet, IPv4-mapped for IPv4; returns 0 if unparseable. */
static __always_inline int packet_dst(struct __sk_buff *skb, __u8 *dst)
{
	if (skb->protocol == bpf_htons(0x0800)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)))
			return 0;
		addr4(dst, ip.daddr);
		return 1;
	}
	if (skb->protocol == bpf_htons(0x86DD)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			return 0;
		__builtin_memcpy(dst, &ip6.daddr, 16);
		return 1;
	}
	return 0;
}

/* Published ports (`--publish`) are allow_host entries for the unspecified address `::`, a
 * destination no rule can name (policy parsing refuses it): a passive socket on one of these
 * local ports may answer any peer. */
static __always_inline int published(const struct an_task *t, __u16 local_port)
{
	struct an_host_key hk = {.id = t->id};
	struct an_ports *p = bpf_map_lookup_elem(&allow_host, &hk);

	return p && ports_match(p, local_port, AN_PROTO_TCP);
}

/* A TCP packet of a socket that did not open its connection itself (an accepted one, or the
 * SYN-ACK of one being accepted) leaves only to a peer the policy allows, or from a published
 * port. Ports come from the packet: a minisocket's fields are not all readable here. */
static __always_inline int passive_tcp_ok(struct __sk_buff *skb, const struct an_task *t,
					  const __u8 *dst)
{
	__u16 ports[2];
	__u32 off;

	if (skb->protocol == bpf_htons(0x0800)) {
		__u8 vihl;

		if (bpf_skb_load_bytes(skb, 0, &vihl, 1))
			return 0;
		off = (vihl & 0x0f) * 4;
	} else {
		__u8 next;

		if (bpf_skb_load_bytes(skb, offsetof(struct ipv6hdr, nexthdr), &next, 1) ||
		    next != IPPROTO_TCP)
			return 0;
		off = sizeof(struct ipv6hdr);
	}
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
		return 0;
	return allowed(t, dst, bpf_ntohs(ports[1]), AN_PROTO_TCP) ||
	       published(t, bpf_ntohs(ports[0]));
}

SEC("cgroup_skb/egress")
int egress_skb(struct __sk_buff *skb)
{
	struct an_task *t = task();
	struct an_config *c = &t->cfg;
	struct bpf_sock *sk = skb->sk;
	__u8 dst[16] = {};
	__s64 ahead;
	__u32 segs;

	if (!packet_dst(skb, dst))
		return AN_SKB_DROP;
	if (!t->id) {
		count(AN_C_PACKETS_DROPPED, 1);
		deny_event(bpf_skb_cgroup_id(skb), dst, 0, 0, AN_R_NO_ENTRY);
		return AN_SKB_DROP;
	}
	if (is_loopback(dst))
		return AN_SKB_PASS;
	/* UDP sockets name every destination to connect/sendmsg, which checked it, and so do TCP
	 * sockets that open their connection. Every other TCP packet (accepted sockets, request and
	 * timewait minisockets, which exist only for TCP) has its peer checked here, and anything
	 * else (raw, ICMP) is denied. */
	if (sk) {
		struct bpf_sock *full = bpf_sk_fullsock(sk);
		__u8 proto = IPPROTO_TCP;

		if (full && full->type == SOCK_DGRAM_ && full->protocol == IPPROTO_UDP)
			goto pass;
		if (full && !(full->type == SOCK_STREAM_ && full->protocol == IPPROTO_TCP))
			proto = full->protocol;
		else if ((full && bpf_sk_storage_get(&active_open, full, 0, 0)) ||
			 passive_tcp_ok(skb, t, dst))
			goto pass;
		count(AN_C_PACKETS_DROPPED, 1);
		deny_event(t->id, dst, 0, proto, AN_R_BACKSTOP);
		return AN_SKB_DROP;
	}
pass:
	segs = skb->gso_segs ? skb->gso_segs : 1;
	if (c->rate_bps) {
		__u64 now = bpf_ktime_get_ns(), cost = (__u64)skb->len * NSEC_PER_SEC / c->rate_bps;

		ahead = clock_charge(t, AN_CLOCK_BYTES, cost, c->rate_burst_ns, now);
		if (ahead < 0) {
			count(AN_C_RATE_DROPPED, segs);
			return AN_SKB_DROP | AN_SKB_CN;
		}
		/* EDT: the packet may leave when its slot on the virtual clock starts; an fq qdisc
		 * holds it until then and TCP small queues make the socket wait instead of drop. */
		if ((__u64)ahead > cost && skb->tstamp < now + ahead - cost)
			skb->tstamp = now + ahead - cost;
		count(AN_C_BYTES_OUT, skb->len);
		count(AN_C_PACKETS_OUT, segs);
		/* Past a quarter of the horizon TCP is asked to back off before anything drops. */
		return ahead > (__s64)(c->rate_burst_ns / 4) ? (AN_SKB_PASS | AN_SKB_CN) : AN_SKB_PASS;
	}
	count(AN_C_BYTES_OUT, skb->len);
	count(AN_C_PACKETS_OUT, segs);
	return AN_SKB_PASS;
}

/* TCP paces itself (an hrtimer, no qdisc needed) once a socket has a maximum pacing rate, so a
 * single connection stays under the task's rate instead of bursting into the limiter's drops.
 * The limiter above still enforces the aggregate of every socket. */
SEC("sockops")
int egress_sockops(struct bpf_sock_ops *skops)
{
	struct an_task *t = task();
	__u64 bps = t->cfg.rate_bps;
	__u32 rate;

	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB && skops->sk)
		bpf_sk_storage_get(&active_open, skops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB &&
	    skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!bps)
		return 1;
	rate = bps > 0xfffffffeULL ? 0xfffffffe : (__u32)bps;
	bpf_setsockopt(skops, SOL_SOCKET, SO_MAX_PACING_RATE, &rate, sizeof(rate));
	return 1;
}

/* Counts what arrives; a cgroup with no entry gets nothing. */
SEC("cgroup_skb/ingress")
int egress_skb_in(struct __sk_buff *skb)
{
	if (!task()->id)
		return AN_SKB_DROP;
	count(AN_C_BYTES_IN, skb->len);
	count(AN_C_PACKETS_IN, skb->gso_segs ? skb->gso_segs : 1);
	return AN_SKB_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
