// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Exit statuses of the node's tasks, recorded by the kernel whoever reaps them: a task that
 * outlives its node agent is reaped by init once orphaned, and its next node agent is not its
 * parent, so only a record taken at the exit itself tells how it ended. User space adds each
 * task's init (pid and start time) to `exits`; the last thread of a watched process to exit
 * writes its wait status there. The map and the link are pinned under bpffs, so they record
 * while no node agent runs. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "exits.h"

/* Only the fields read here; CO-RE relocates them against the running kernel's BTF. */
typedef struct {
	int counter;
} atomic_t;

struct signal_struct {
	atomic_t live;
	unsigned int flags;
	int group_exit_code;
} __attribute__((preserve_access_index));

struct task_struct {
	int tgid;
	int exit_code;
	unsigned long long start_boottime;
	struct task_struct *group_leader;
	struct signal_struct *signal;
} __attribute__((preserve_access_index));

/* include/linux/sched/signal.h: the group exit is in progress (a signal, or exit_group). */
#define SIGNAL_GROUP_EXIT 0x00000004
/* /proc/PID/stat counts the start time in USER_HZ (100) ticks. */
#define NSEC_PER_TICK 10000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AN_EXITS_ENTRIES);
	__type(key, __u32);
	__type(value, struct an_exit);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} an_exits SEC(".maps");

SEC("tp_btf/sched_process_exit")
int BPF_PROG(exit_record, struct task_struct *p)
{
	__u32 tgid = BPF_CORE_READ(p, tgid);
	struct an_exit *e = bpf_map_lookup_elem(&an_exits, &tgid);
	if (!e || e->done)
		return 0;
	/* A recycled pid is another process: the start time tells them apart. */
	if (BPF_CORE_READ(p, start_boottime) / NSEC_PER_TICK != e->start_ticks)
		return 0;
	/* Threads exit one by one; the wait status is the last one's to give. */
	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	if (BPF_CORE_READ(p, signal, flags) & SIGNAL_GROUP_EXIT)
		e->status = BPF_CORE_READ(p, signal, group_exit_code);
	else
		e->status = BPF_CORE_READ(p, group_leader, exit_code);
	e->done = 1;
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
