/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The exit recorder's map value (ebpf/exits.bpf.c), mirrored by agentnode-core's exits module. */
#ifndef AGENTNODE_EXITS_H
#define AGENTNODE_EXITS_H

#include <linux/types.h>

#define AN_EXITS_ENTRIES 65536

struct an_exit {
	__u64 start_ticks; /* the process's start, as /proc/PID/stat field 22 has it */
	__s32 status;      /* the wait status (exit code << 8, or the signal) once done */
	__u32 done;
};

#endif
