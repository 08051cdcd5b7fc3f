"""`Launch`: one start of a task as the native launcher takes it, in one value.

A `Sandbox` says how a task is isolated in the user's terms (CPUs, capability names, mounts);
a `Launch` is the same in the kernel's terms (a cpu.max quota, capability numbers, host ids),
with what this one start adds: the command, its whole environment, the staging directory, the
workspace, a network namespace to join and the stdio descriptors. It crosses into Rust as it
is: the binding (`rust/agentnode-py/src/isolation.rs`) reads each field by its name into
`agentnode_core::sandbox::Spec`, whose fields these mirror. A new option is a field here, there
and in that reader.
"""

from __future__ import annotations

import collections
import os

from agentnode.isolation.spec import Sandbox

TYPE_CHECKING = False  # not typing's, which costs `agentnode exec` ~3 ms to import
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import NamedTuple
else:

    class _NamedTupleMeta(type):
        """`typing.NamedTuple`'s class form without importing typing: the class's annotated
        fields become a `collections.namedtuple`, which keeps the class's docstring and methods."""

        def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            if not bases:
                return super().__new__(mcs, name, bases, ns)
            fields = list(ns.get("__annotations__", {}))
            made = collections.namedtuple(name, fields, module=ns["__module__"])
            for key, value in ns.items():
                if key not in ("__annotations__", "__module__", "__qualname__"):
                    setattr(made, key, value)
            return made

    class NamedTuple(metaclass=_NamedTupleMeta):
        pass


__all__ = ["CPU_PERIOD_US", "USERNS_BASE", "Launch"]

#: With a user namespace, task ids 0..65535 map to host ids from here on.
USERNS_BASE = 100_000
#: The cpu.max period a task's CPU limit is a quota of.
CPU_PERIOD_US = 100_000


class Launch(NamedTuple):
    """Everything about one start of a task (see the module docstring); make one with `of`.
    A named tuple, not a frozen dataclass: as immutable, and made in 2 µs instead of 4.5 (a
    frozen dataclass sets each of its 25 fields through `object.__setattr__`), on every start."""

    argv: tuple[str, ...]
    #: `KEY=VALUE` strings: the task's whole environment.
    env: tuple[str, ...]
    cwd: str
    hostname: str
    #: The directory whose top-level entries become the task's read-only root.
    rootfs: str
    #: An empty directory the task's staging tmpfs is mounted on.
    stage: str
    #: Host directory bound read-write at /workspace.
    workspace: str | None
    #: `(host path, task path, writable)` of each bind mount.
    binds: tuple[tuple[str, str, bool], ...]
    tmp_size: int
    uid: int
    gid: int
    #: First host id of the range task ids map to; None: no user namespace.
    userns_base: int | None
    #: A network namespace to join (a path), instead of a fresh one.
    netns: str | None
    #: Descriptors for stdin, stdout, stderr; None inherits this process's.
    stdio: tuple[int | None, int | None, int | None]
    nofile: int
    seccomp: bool
    #: Capability numbers the task keeps; every other one is dropped.
    keep_caps: tuple[int, ...]
    cpu_quota_us: int | None
    cpu_period_us: int
    cpu_weight: int | None
    memory_max: int | None
    memory_high: int | None
    swap_max: int | None
    pids_max: int | None
    #: Runs on after the spawner exits, once it has exec'd (a node's task, re-adopted later).
    outlive: bool

    @classmethod
    def of(
        cls,
        sandbox: Sandbox,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        stage: str | os.PathLike[str],
        workspace: str | os.PathLike[str] | None,
        netns: str | None = None,
        stdio: tuple[int | None, int | None, int | None] = (None, None, None),
        seccomp: bool = True,
        outlive: bool = False,
    ) -> Launch:
        """The start of `argv` isolated as `sandbox` says, with the whole environment `env`."""
        limits = sandbox.limits
        return cls(
            argv=tuple(argv),
            env=tuple(f"{k}={v}" for k, v in env.items()),
            cwd=sandbox.cwd,
            hostname=sandbox.hostname,
            rootfs=sandbox.rootfs,
            stage=os.fspath(stage),
            workspace=None if workspace is None else os.fspath(workspace),
            binds=tuple((m.src, m.dest, m.writable) for m in sandbox.mounts),
            tmp_size=limits.tmp_size,
            uid=sandbox.uid,
            gid=sandbox.gid,
            userns_base=USERNS_BASE if sandbox.userns else None,
            netns=netns,
            stdio=stdio,
            nofile=limits.nofile,
            seccomp=seccomp,
            keep_caps=tuple(sandbox.cap_numbers()),
            cpu_quota_us=None if limits.cpus is None else round(limits.cpus * CPU_PERIOD_US),
            cpu_period_us=CPU_PERIOD_US,
            cpu_weight=limits.cpu_weight,
            memory_max=limits.memory,
            memory_high=limits.memory_high,
            swap_max=limits.swap,
            pids_max=limits.pids,
            outlive=outlive,
        )
