"""Per-task log caps: a task's log that passes the cap is rotated by copy and truncation.

A task writes its log itself, through a descriptor opened with O_APPEND (its output never passes
through the daemon, so a stalled daemon cannot block it). The daemon cannot make it reopen a
renamed file, so rotation is logrotate's `copytruncate`: the log is copied to `<log>.1` (the
previous one replaced), truncated, and a marker line says so; with O_APPEND the task's next
write lands at the new end. Output written between the copy and the truncation is lost, which
the marker says too. At most twice the cap stays on disk per attempt.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

__all__ = ["rotate_if_over"]


def rotate_if_over(path: Path, limit: int) -> bool:
    """Rotates `path` if it is over `limit` bytes; True if it did. Blocking (it copies up to
    the whole log): call it off the event loop."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= limit:
        return False
    kept = path.with_name(path.name + ".1")
    tmp = path.with_name(path.name + ".1.tmp")
    shutil.copyfile(path, tmp)  # copy_file_range: in the kernel, a reflink where supported
    os.replace(tmp, kept)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.write(
            fd,
            f"[agentnode: {stamp} this log passed its {limit >> 20} MiB cap; the output before "
            f"this line is in {kept.name} (any written while it was moved is lost)]\n".encode(),
        )
    finally:
        os.close(fd)
    return True
