// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Exec tracing for one node instance: every successful exec by a process whose cgroup2 node is
 * under the instance's subtree becomes one `events` record (pid, ppid, uid, filename, the first
 * AN_EXEC_ARGV bytes of argv). Attached as a BTF tracepoint (tp_btf, kernel 5.5+) on
 * sched_process_exec: it needs no tracefs mount and reads its arguments as typed pointers.
 *
 * The filter is the cgroup2 ancestor at the instance's level, so a task is traced from its first
 * exec, before the node learns its cgroup id; user space maps the task cgroup (the ancestor one
 * level below) to the task. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "exec.h"

/* Only the fields read here; CO-RE relocates them against the running kernel's BTF. */
struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} __attribute__((preserve_access_index));

struct task_struct {
	struct mm_struct *mm;
	struct task_struct *real_parent;
	int tgid;
} __attribute__((preserve_access_index));

struct linux_binprm {
	const char *filename;
} __attribute__((preserve_access_index));

/* The instance's cgroup2 id and its level (the root is level 0); set at load time. */
const volatile __u64 instance_cgroup = 0;
const volatile __u32 instance_level = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

/* Events that found the ring buffer full: user space reports them, never drops them silently. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

SEC("tp_btf/sched_process_exec")
int BPF_PROG(exec_trace, struct task_struct *p, int old_pid, struct linux_binprm *bprm)
{
	if (bpf_get_current_ancestor_cgroup_id(instance_level) != instance_cgroup)
		return 0;
	struct an_exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			*n += 1;
		return 0;
	}
	e->cgroup = bpf_get_current_ancestor_cgroup_id(instance_level + 1);
	e->time_ns = bpf_ktime_get_boot_ns();
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->ppid = BPF_CORE_READ(p, real_parent, tgid);
	e->uid = (__u32)bpf_get_current_uid_gid();
	const char *filename = BPF_CORE_READ(bprm, filename);
	long n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename);
	e->filename_len = n > 0 ? n - 1 : 0;
	unsigned long start = BPF_CORE_READ(p, mm, arg_start);
	unsigned long end = BPF_CORE_READ(p, mm, arg_end);
	unsigned long len = end > start ? end - start : 0;
	e->argv_total = len > 0xffffffff ? 0xffffffff : len;
	if (len > AN_EXEC_ARGV)
		len = AN_EXEC_ARGV;
	e->argv_len = 0;
	if (len > 0 && bpf_probe_read_user(e->argv, len, (void *)start) == 0)
		e->argv_len = len;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
