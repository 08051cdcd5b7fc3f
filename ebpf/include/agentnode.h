/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Definitions shared by agentnode's BPF programs and its Rust loader: fixed-width types only. */
#ifndef AGENTNODE_H
#define AGENTNODE_H

#include <linux/types.h>

/* cgroup_skb return codes: bit 0 = allow, bit 1 = congestion notification (CN). */
#define AN_SKB_DROP 0
#define AN_SKB_PASS 1

#endif /* AGENTNODE_H */
