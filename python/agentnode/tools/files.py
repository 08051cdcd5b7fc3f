"""`read_file`, `write_file`, `list_files`: confined to the calling task's workspace. Paths are
resolved by the kernel (openat2 with RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS from the
workspace's descriptor), so neither `..` nor a symlink, planted before or during the call,
leads out of it."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from contextlib import ExitStack
from typing import Any

from agentnode.isolation.task import USERNS_BASE
from agentnode.tools.registry import Caller, Tool
from agentnode.tools.result import Outcome

__all__ = ["file_tools", "open_beneath"]

_SYS_OPENAT2 = 437  # the same number on every architecture (5.6+)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def open_beneath(root: int, path: str, flags: int, mode: int = 0o644) -> int:
    """openat2(root, path) refusing any symlink and any resolution outside `root`."""
    how = _OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    fd = _libc.syscall(
        _SYS_OPENAT2, root, path.encode() or b".", ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


_PATH = {"type": "string", "maxLength": 4096, "description": "Relative to /workspace."}
READ_SCHEMA = {
    "type": "object",
    "properties": {"path": _PATH, "max_bytes": {"type": "integer", "minimum": 1}},
    "required": ["path"],
    "additionalProperties": False,
}
WRITE_SCHEMA = {
    "type": "object",
    "properties": {
        "path": _PATH,
        "content": {"type": "string"},
        "append": {"type": "boolean", "default": False},
        "parents": {"type": "boolean", "default": True},
    },
    "required": ["path", "content"],
    "additionalProperties": False,
}
LIST_SCHEMA = {
    "type": "object",
    "properties": {"path": {**_PATH, "default": "."}},
    "additionalProperties": False,
}
_MAX_ENTRIES = 10_000


def _relative(path: str) -> str:
    """A task names files as it sees them: /workspace/x or x. `ValueError`: a NUL in it."""
    if "\0" in path:
        raise ValueError("a path with a NUL byte")
    if path == "/workspace" or path.startswith("/workspace/"):
        path = path[len("/workspace") :]
    return path.lstrip("/") or "."


def _refusal(path: str, e: OSError | ValueError) -> Outcome:
    if isinstance(e, ValueError):
        return Outcome.error("invalid_input", f"/path: {path!r}: {e}", path="/path")
    if e.errno in (errno.EXDEV, errno.ELOOP):
        return Outcome.error("policy", f"{path}: leads out of the workspace (or through a symlink)")
    if e.errno == errno.ENOENT:
        return Outcome.error("permanent", f"{path}: no such file or directory")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return Outcome.error("resource", f"{path}: {e.strerror} (the node's disk or a quota)")
    return Outcome.error("permanent", f"{path}: {e.strerror}")


class _Files:
    def __init__(self, output: int) -> None:
        self.output = output

    @staticmethod
    def _root(caller: Caller) -> int | Outcome:
        if caller.workspace is None:
            return Outcome.error("invalid_input", "file tools need a calling task (its workspace)")
        return os.open(caller.workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def read(self, args: dict[str, Any], caller: Caller) -> Outcome:
        root = self._root(caller)
        if isinstance(root, Outcome):
            return root
        limit = min(args.get("max_bytes", self.output), self.output)
        try:
            fd = open_beneath(root, _relative(args["path"]), os.O_RDONLY | os.O_NONBLOCK)
        except (OSError, ValueError) as e:
            return _refusal(args["path"], e)
        finally:
            os.close(root)
        refused = _not_plain(fd, args["path"])  # before fdopen, which refuses a directory
        if refused is not None:
            os.close(fd)
            return refused
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        truncated = len(data) > limit
        data = data[:limit]
        return Outcome.text(data.decode(errors="replace"), bytes_out=len(data), truncated=truncated)

    async def write(self, args: dict[str, Any], caller: Caller) -> Outcome:
        try:
            path = _relative(args["path"])
        except ValueError as e:
            return _refusal(args["path"], e)
        parent, _, name = path.rpartition("/")
        if name in ("", ".", ".."):
            return Outcome.error("invalid_input", f"/path: {args['path']!r} names no file")
        root = self._root(caller)
        if isinstance(root, Outcome):
            return root
        uid, gid = _owner(caller)
        with ExitStack() as stack:
            stack.callback(os.close, root)
            try:
                dirfd = self._parent(root, parent, uid, gid, make=args.get("parents", True))
                stack.callback(os.close, dirfd)
                # No O_TRUNC: nothing is changed before the file is known to be plain.
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if args.get("append") else 0)
                fd = open_beneath(dirfd, name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except (OSError, ValueError) as e:
                return _refusal(args["path"], e)
            refused = _not_plain(fd, args["path"])
            if refused is not None:
                os.close(fd)
                return refused
            try:
                with os.fdopen(fd, "wb") as f:
                    if not args.get("append"):
                        os.ftruncate(fd, 0)
                    os.fchown(fd, uid, gid)
                    data = args["content"].encode()
                    f.write(data)
            except OSError as e:  # a full disk, most likely: the file holds what fit
                return _refusal(args["path"], e)
        return Outcome.text(f"wrote {len(data)} bytes to {path}")

    @staticmethod
    def _parent(root: int, parent: str, uid: int, gid: int, *, make: bool) -> int:
        """The directory `parent` beneath root (made, one level at a time, when `make`)."""
        if not make or not parent:
            return open_beneath(root, parent, os.O_RDONLY | os.O_DIRECTORY)
        fd = os.dup(root)
        try:
            for part in parent.split("/"):
                if part in ("", "."):
                    continue
                made = False
                try:
                    nxt = open_beneath(fd, part, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt, made = open_beneath(fd, part, os.O_RDONLY | os.O_DIRECTORY), True
                os.close(fd)
                fd = nxt
                if made:
                    os.fchown(fd, uid, gid)
        except BaseException:  # a NUL in a name is a ValueError: no descriptor kept either way
            os.close(fd)
            raise
        return fd

    async def list(self, args: dict[str, Any], caller: Caller) -> Outcome:
        root = self._root(caller)
        if isinstance(root, Outcome):
            return root
        path = args.get("path", ".")
        try:
            fd = open_beneath(root, _relative(path), os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, ValueError) as e:
            return _refusal(path, e)
        finally:
            os.close(root)
        entries: list[dict[str, Any]] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if len(entries) == _MAX_ENTRIES:
                        break
                    st = entry.stat(follow_symlinks=False)
                    kind = (
                        "dir"
                        if stat.S_ISDIR(st.st_mode)
                        else "file"
                        if stat.S_ISREG(st.st_mode)
                        else "symlink"
                        if stat.S_ISLNK(st.st_mode)
                        else "other"
                    )
                    entries.append({"name": entry.name, "type": kind, "size": st.st_size})
        finally:
            os.close(fd)
        entries.sort(key=lambda e: str(e["name"]))
        text = "\n".join(f"{e['type']:7} {e['size']:>10} {e['name']}" for e in entries)
        return Outcome.text(
            text, structured={"entries": entries}, truncated=len(entries) == _MAX_ENTRIES
        )


def _not_plain(fd: int, path: str) -> Outcome | None:
    """A refusal unless `fd` is a regular file with one link: the node reads and writes as
    root, so a hard link a task made to a file outside its workspace must not be followed."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return Outcome.error("permanent", f"{path}: not a regular file")
    if st.st_nlink != 1:
        return Outcome.error("policy", f"{path}: has other hard links (refused)")
    return None


def _owner(caller: Caller) -> tuple[int, int]:
    uid, _, gid = caller.user.partition(":")
    base = USERNS_BASE if caller.userns else 0
    return base + int(uid), base + int(gid or uid)


def file_tools(*, output: int = 1 << 20) -> list[Tool]:
    """The three workspace file tools; reads return at most `output` bytes."""
    files = _Files(output)
    listing = {"type": "object", "properties": {"entries": {"type": "array"}}}
    return [
        Tool(
            name="read_file",
            description="Read a file of this task's workspace.",
            input_schema=READ_SCHEMA,
            run=files.read,
            idempotent=True,
        ),
        Tool(
            name="write_file",
            description="Write a file in this task's workspace.",
            input_schema=WRITE_SCHEMA,
            run=files.write,
        ),
        Tool(
            name="list_files",
            description="List a directory of this task's workspace.",
            input_schema=LIST_SCHEMA,
            output_schema=listing,
            run=files.list,
            idempotent=True,
        ),
    ]
