"""Directory trees a task made (its workspace, a tool's scratch), listed and removed at any
depth: a task can nest directories far deeper than Python's recursion limit, where Python
3.11's `os.walk` and `shutil.rmtree` recurse and fail. Neither follows a symlink the task
planted."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["regular_files", "remove_tree"]

# Directories held open at once while removing; a deeper one is moved up to the top first.
_HELD = 32
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def regular_files(root: str | os.PathLike[str]) -> Iterator[str]:
    """Relative paths of the regular files under `root`, top-down and sorted, as `os.walk`
    gives them; symlinks are neither listed nor followed, unreadable directories skipped."""
    top = os.fspath(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(top, rel)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        dirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    dirs.append(os.path.join(rel, e.name))
                elif e.is_file(follow_symlinks=False):
                    yield os.path.join(rel, e.name)
            except OSError:
                continue
        stack.extend(reversed(dirs))


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Removes `path` and all under it, ignoring errors, as `shutil.rmtree(path, True)`; at any
    depth, with at most `_HELD` directories open (a deeper one is first moved to `path`'s top,
    under a name of its own)."""
    try:
        top = os.open(path, _DIR)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)  # a file or a symlink: itself, never what it points to
        return
    # Each directory open: its fd, its name in the one before, and its subdirectories that
    # could not be removed (left, as rmtree leaves what it cannot remove).
    held: list[tuple[int, str, set[str]]] = [(top, "", set())]
    moved = 0
    try:
        while held:
            fd, _, left = held[-1]
            child = _next_dir(fd, left)
            if child is None:
                os.close(fd)
                _, name, _ = held.pop()
                if held:
                    try:
                        os.rmdir(name, dir_fd=held[-1][0])
                    except OSError:
                        held[-1][2].add(name)
                continue
            if len(held) >= _HELD:
                # Too deep to hold: it goes to the top, to be removed from there.
                moved += 1
                try:
                    os.rename(child, f".agentnode-removing-{moved}", src_dir_fd=fd, dst_dir_fd=top)
                except OSError:
                    left.add(child)
                continue
            try:
                held.append((os.open(child, _DIR, dir_fd=fd), child, set()))
            except OSError:
                left.add(child)
    finally:
        for fd, _, _ in held:
            os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _next_dir(fd: int, left: set[str]) -> str | None:
    """Unlinks what is not a directory in `fd`; returns a subdirectory not in `left`, if any."""
    try:
        with os.scandir(fd) as it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        if e.name not in left:
                            return e.name
                    else:
                        os.unlink(e.name, dir_fd=fd)
                except OSError:
                    continue
    except OSError:
        pass
    return None
