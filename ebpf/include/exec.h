/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The exec tracer's event (ebpf/exec.bpf.c), mirrored by agentnode-core's exectrace module. */
#ifndef AGENTNODE_EXEC_H
#define AGENTNODE_EXEC_H

#include <linux/types.h>

#define AN_EXEC_ARGV 256
#define AN_EXEC_FILENAME 256

struct an_exec_event {
	__u64 cgroup;       /* the task's cgroup2 id (the instance's child on the path) */
	__u64 time_ns;      /* CLOCK_BOOTTIME */
	__u32 pid;
	__u32 ppid;
	__u32 uid;
	__u32 filename_len;
	__u32 argv_len;     /* bytes in argv (NUL-separated arguments) */
	__u32 argv_total;   /* the whole argv's size: more than argv_len when cut */
	char filename[AN_EXEC_FILENAME];
	char argv[AN_EXEC_ARGV];
};

#endif
