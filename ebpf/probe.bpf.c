// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The smallest program family agentnode needs: `agentnode doctor` loads it, attaches it to a
 * scratch cgroup2 node and detaches it, proving cgroup_skb attach and ring buffer maps work. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "agentnode.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

SEC("cgroup_skb/egress")
int probe_egress(struct __sk_buff *skb)
{
	return AN_SKB_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
