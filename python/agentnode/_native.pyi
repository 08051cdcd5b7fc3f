# Hand-written stubs for the Rust extension (rust/agentnode-py); checked by mypy.stubtest.

from collections.abc import Callable, Iterable
from os import PathLike
from pathlib import Path
from typing import Any, Literal, final

from typing_extensions import Buffer

from agentnode.isolation.launch import Launch

__all__ = [
    "AdoptedCgroup",
    "EgressHandle",
    "EgressPrograms",
    "ExecTracerHandle",
    "ExitRecorder",
    "Launcher",
    "NativeTask",
    "Scheduler",
    "TaskNetwork",
    "VectorCollection",
    "__version__",
    "cgroup_hierarchy",
    "cgroup_id",
    "confine_ahead",
    "confine_self",
    "doctor",
    "egress_programs_tag",
    "make_nothing_ahead",
    "noop",
    "sweep_cgroups",
]

__version__: str

def noop() -> None:
    """Does nothing: the benchmark harness measures the cost of one call into the extension."""

def doctor() -> str:
    """Runs every doctor probe and returns the report as JSON (docs/doctor.schema.json)."""

def cgroup_hierarchy() -> str:
    """This process's cgroup layout and directories, as JSON."""

# --- isolation (rust/agentnode-py/src/isolation.rs) ---

@final
class Launcher:
    """How this node instance starts its tasks: its cgroup subtree, made when it is (sweeping
    dead instances' leftovers), and its zygote pool."""

    def __new__(cls, *, node: str = ..., spare: list[str] = ...) -> Launcher:
        """Sweeps dead instances' task cgroups, then makes this instance's subtree:
        `n<pid>-<start>`, or with a `node` name, `k<node>`, whose tasks may outlive this process
        (its earlier process's task cgroups are swept, but those named in `spare`, `TASK`:
        re-adopted now)."""
    def start(
        self, spec: Launch, *, before_start: Callable[[Path], object] | None = None
    ) -> NativeTask:
        """Starts the task `spec` describes; returns once it has exec'd its command.
        `before_start` is called with the task's cgroup2 directory after it is made and before
        any process joins it."""
    @property
    def name(self) -> str:
        """The instance name, `n<pid>-<starttime>` (a node daemon's: `k<node>`)."""
    def dirs(self) -> list[Path]:
        """This instance's directories in every hierarchy (cgroup2 first)."""
    def spares(self) -> list[str]:
        """Names of the task cgroups made ahead of time, not yet given to a task."""
    def zygotes(self) -> dict[int, str]:
        """The zygotes ready now (tasks started ahead, waiting for their command): host pid to
        the name of its task cgroup."""
    def adopt(self, name: str) -> AdoptedCgroup:
        """Takes over task cgroup `name` (`TASK`) an earlier process of this node left running,
        spared at construction."""
    def close(self) -> None:
        """Removes the instance's subtree (its tasks must be gone). Idempotent."""

@final
class AdoptedCgroup:
    """A task cgroup of an earlier instance, taken over (see `Launcher.adopt`)."""

    @property
    def placement(self) -> Path | None:
        """The cgroup2 directory (None once closed)."""
    def kill(self) -> None:
        """SIGKILLs every process in it (cgroup.kill)."""
    def stats(self, wall_s: float) -> dict[str, Any]:
        """Accounting as `NativeTask.stats` has it, with `wall_s` given by the caller."""
    def leave(self) -> None:
        """Gives the cgroup up as it is (its task runs on, for a later start to adopt)."""
    def close(self) -> None:
        """Removes the cgroup (its processes must be gone). Idempotent."""

@final
class NativeTask:
    """A running task (see `agentnode.isolation.Task`)."""

    @property
    def pid(self) -> int: ...
    @property
    def pidfd(self) -> int: ...
    @property
    def start_ticks(self) -> int | None:
        """Its init's start time in clock ticks since boot, for a task started with `outlive`
        (None for the others, or when its init was gone by the end of its start)."""
    @property
    def cgroup_dir(self) -> Path | None:
        """The task's cgroup2 directory (for BPF attachment)."""
    def try_wait(self) -> tuple[int | None, int | None] | None:
        """Reaps the task if it has exited: `(code, signal)`, else None."""
    def wait(self, timeout: float | None = None) -> tuple[int | None, int | None] | None:
        """Waits up to `timeout` seconds (None: forever); `(code, signal)` or None on timeout."""
    def signal(self, sig: int) -> None:
        """Sends a signal to the task's init through its pidfd."""
    def kill(self) -> None:
        """SIGKILLs every process of the task (cgroup.kill)."""
    def set_frozen(self, frozen: bool) -> None: ...
    def stats(self) -> dict[str, Any]:
        """Accounting as a dict: wall_s and the cgroup figures."""
    def usage(self) -> tuple[float, int] | None:
        """(cpu_s, memory_peak) of the running task from two files; None once reaped."""
    def leave(self) -> None:
        """Lets the task run on without this handle: nothing kills or reaps it and its cgroups
        stay (for a task started with `outlive`)."""
    def close(self) -> None:
        """Kills and reaps whatever still runs and removes the task's cgroups."""

def confine_ahead() -> None:
    """Builds ahead what `confine_self` takes (the seccomp program, the Landlock ruleset), for a
    server whose forks each confine themselves."""

def confine_self(
    *, uid: int, gid: int, keep_caps: list[int], nofile: int, seccomp: bool, err: int
) -> None:
    """Gives this process what a task's command has at exec: rlimits, capabilities (all dropped
    but `keep_caps`), ids, no_new_privs, Landlock and, with `seccomp`, the default filter. For a
    single-threaded process forked into a running task; a step that fails writes its record to
    `err` and ends the process (status 127)."""

def make_nothing_ahead() -> None:
    """From now on this process makes nothing ahead of its starts (spare task cgroups, network
    namespaces, zygotes): for a process that starts one task and exits."""

def sweep_cgroups(unified: str | Path, v1: list[str] | list[Path]) -> int:
    """Removes dead instances' cgroups under `unified` and `v1` subtree dirs; returns the count."""

# --- scheduler (rust/agentnode-py/src/sched.rs) ---

@final
class Scheduler:
    """Priority classes, weighted fair share between tenants, limits, aging, capacity admission.

    Classes: critical, high, normal, low, batch. Limits of 0 mean unlimited; `aging` is the
    number of pops served by higher classes after which a waiting lower class goes next (0: off).
    """

    def __new__(
        cls,
        *,
        tenant_limit: int = 0,
        class_limits: dict[str, int] | None = None,
        aging: int = 0,
    ) -> Scheduler: ...
    def set_tenant(self, tenant: str, *, weight: int = 1, limit: int | None = None) -> None:
        """Sets a tenant's fair-share weight and optionally its own running limit."""
    def push(self, id: int, tenant: str, cls: str, cpu: int = 0, mem: int = 0) -> None:
        """Queues one task requesting `cpu` millicores and `mem` bytes."""
    def push_many(self, tasks: Iterable[tuple[int, str, str, int, int]]) -> None:
        """Queues (id, tenant, class, cpu, mem) tuples, all or none (TypeError names a bad one)."""
    def pop(self, free_cpu: int, free_mem: int) -> int | None:
        """The id of the next task that fits the free capacity, or None."""
    def pop_many(self, n: int, free_cpu: int, free_mem: int) -> list[int]:
        """Up to n ids, deducting each task's requests from the free capacity."""
    def cancel(self, id: int) -> None:
        """Removes a queued task."""
    def complete(self, id: int) -> None:
        """Frees a running task's concurrency slots."""
    def complete_many(self, ids: list[int]) -> None:
        """`complete` for several ids."""
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...

# --- vector (rust/agentnode-py/src/vector.rs) ---

@final
class VectorCollection:
    """An HNSW vector collection with per-key labels (tenant, namespace, task, payload)."""

    def __new__(
        cls,
        dims: int,
        *,
        metric: str = "cos",
        dtype: str = "f32",
        connectivity: int = 0,
        expansion_add: int = 0,
        expansion_search: int = 0,
    ) -> VectorCollection: ...
    @staticmethod
    def load(
        path: str | PathLike[str],
        dims: int,
        *,
        metric: str = "cos",
        dtype: str = "f32",
        connectivity: int = 0,
        expansion_add: int = 0,
        expansion_search: int = 0,
    ) -> VectorCollection:
        """Loads a file written by `save`; raises VectorError if it is missing, corrupt or of
        another shape."""
    @property
    def dims(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def memory_usage(self) -> int: ...
    @property
    def expansion_search(self) -> int: ...
    def set_expansion_search(self, ef: int) -> None:
        """Changes the search-time candidate list size (`ef`) for later searches; a filtered
        search keeps `ef` scaled by its filter's selectivity (at least k)."""
    def __len__(self) -> int: ...
    def __contains__(self, key: int, /) -> bool: ...
    def label(self, key: int) -> tuple[str, str, str, bytes] | None:
        """`(tenant, namespace, task, payload)` of `key`, or None."""
    def upsert(
        self,
        key: int,
        vector: Buffer,
        *,
        tenant: str,
        namespace: str,
        task: str,
        payload: bytes = ...,
    ) -> None: ...
    def upsert_batch(
        self,
        keys: Iterable[int],
        vectors: Buffer,
        labels: Iterable[tuple[str, str, str, bytes]],
        *,
        threads: int = 2,
    ) -> None:
        """`vectors` holds `len(keys) * dims` float32 values; `labels` one
        `(tenant, namespace, task, payload)` per key."""
    def check_batch(self, keys: Iterable[int], vectors: Buffer) -> None:
        """Raises VectorError unless every key is usable and `vectors` holds `len(keys) * dims`
        finite float32 values; writes nothing."""
    def delete(self, key: int) -> bool: ...
    def search(
        self,
        query: Buffer,
        k: int,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        keys: set[int] | None = None,
    ) -> list[tuple[int, float]]:
        """The `k` nearest `(key, distance)` pairs passing the filter, closest first."""
    def search_batch(
        self,
        queries: Buffer,
        k: int,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        keys: set[int] | None = None,
        threads: int = 2,
    ) -> list[list[tuple[int, float]]]:
        """One result list per query row of `queries` (`n * dims` float32 values)."""
    def save(self, path: str | PathLike[str]) -> None:
        """Writes the collection to `path` atomically (temp file, fsync, rename)."""

# --- egress (agentnode.egress) ---

_Ports = list[tuple[int, int, int]]
_Rule = tuple[bytes, int, _Ports]

def egress_programs_tag() -> str:
    """A name for this build's egress programs (a hash of the object), which their pins carry."""

@final
class EgressPrograms:
    """The node's egress programs and maps, loaded once; every `EgressHandle` attaches these.
    Their denials, of every task, are read here."""

    def __new__(cls, *, pin: str | PathLike[str] | None = None) -> EgressPrograms:
        """Loads the programs; with `pin` (a directory on a bpffs), takes over those pinned
        there, or loads them and pins them there."""
    def unpin(self) -> None:
        """Removes the pins (the programs go once nothing holds them). Idempotent."""
    def purge(self, keep: set[int]) -> int:
        """Removes the entries of every task whose id is not in `keep`; returns how many went."""
    def denials(self) -> list[tuple[int, int, bytes, int, int, str, int]]:
        """Denials queued since the last call, of every task:
        (time_ns, cgroup_id, addr16, port, proto, reason, pid)."""
    def events_fd(self) -> int:
        """A file descriptor that polls readable when denials are queued."""

@final
class EgressHandle:
    """Egress enforcement attached to one cgroup2 directory; `close()` detaches it."""

    def __new__(
        cls,
        programs: EgressPrograms,
        cgroup_dir: str,
        rules_: list[_Rule],
        *,
        rate_bps: int = 0,
        conn_per_sec: int = 0,
        dns_v4: bytes | None = None,
        dns_v6: bytes | None = None,
        dns_port: int = 0,
        pin: str | PathLike[str] | None = None,
        adopt: bool = False,
    ) -> EgressHandle:
        """Attaches `programs` to `cgroup_dir` for a task; with `pin` (a new directory on a
        bpffs), its links are pinned there so it outlives this handle and its process. With
        `adopt`, takes over the task pinned at `pin` instead (its entry brought to the rules,
        limits and DNS given)."""
    @staticmethod
    def remove_pins(dir: str | PathLike[str]) -> bool:
        """Removes the pinned directory `dir` and its pins (of a task that is gone); returns
        whether there was one."""
    def withdraw(self) -> None:
        """Withdraws the task's entry: its programs stay attached and deny it everything until
        `close()`. Idempotent."""
    def id(self) -> int:
        """The task's id (its cgroup's id), as its denials carry it."""
    def unpin(self) -> None:
        """Removes this enforcement's pins: `close()` then detaches it. Idempotent."""
    def leave(self) -> None:
        """Closes the handle leaving the pinned enforcement in force (for a later owner to adopt)."""
    def set_rules(self, rules_: list[_Rule]) -> None:
        """Replaces the CIDR rules (live map update)."""
    def set_rules_packed(self, packed: bytes) -> None:
        """Replaces the CIDR rules with ones packed as 22-byte records: address (16 bytes), prefix
        (1), low and high port (2 each, little-endian), protocol bits (1). The fast path for
        large policies: no Python object per rule crosses over."""
    def set_limits(self, *, rate_bps: int, conn_per_sec: int) -> None:
        """Replaces the rate limits (0: unlimited)."""
    def allow_exact(self, addr: bytes, ports_: _Ports, ttl: float) -> None:
        """Allows one address (16 bytes) on `ports` for `ttl` seconds."""
    def expire_exact(self) -> int:
        """Removes expired exact-IP entries; returns how many."""
    def clear_exact(self) -> int:
        """Forgets every DNS-learned address; returns how many."""
    def rule_entries(self) -> int:
        """The number of CIDR entries in the kernel maps."""
    def counters(self) -> dict[str, int]:
        """Counters summed over CPUs, as a dict of ints."""
    def close(self) -> None:
        """Detaches every program and withdraws the task's entry; idempotent."""
    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""

@final
class TaskNetwork:
    """Tasks' network namespaces and veths, made over rtnetlink from the netns of the node's
    bridge (`node_netns`, a path such as /run/netns/NAME; default this process's)."""

    def __new__(cls, *, node_netns: str | Path | None = None) -> TaskNetwork: ...
    def links(self) -> list[tuple[str, str | None, str | None]]:
        """Every link of the node's netns: `(name, alias, master)`."""
    def add_task(
        self,
        *,
        netns: str,
        veth: str,
        alias: str,
        bridge: str,
        address: int,
        prefix: int,
        gateway: int,
    ) -> None:
        """Makes netns `netns` (named under /run/netns) with lo up and `eth0` at
        `address`/`prefix` (up, default route via `gateway`), its peer `veth` an isolated port
        of `bridge`, up, with `alias`. Whole or not at all: on `EgressError` nothing is left."""
    def release_task(self, *, netns: str) -> bool:
        """Removes the netns name alone (idempotent); whether it was there. The netns, and the
        veth pair with it, go in the kernel's batched namespace cleanup once nothing holds it."""
    def remove_task(self, *, veth: str, netns: str) -> tuple[bool, bool]:
        """Removes the netns name and the veth (idempotent); whether each was there."""
    @staticmethod
    def netns_state(netns: str) -> Literal["absent", "unmounted", "orphaned", "live"]:
        """What the name `netns` under /run/netns holds: nothing, a file that is no netns (a
        crash between naming and mounting left it), a netns without its task link `eth0` (its
        veth pair is gone), or a netns with it."""

@final
class ExitRecorder:
    """Exit statuses of watched pids, recorded by the kernel (ebpf/exits.bpf.c): the map and
    the link are pinned under `pin_dir` (a bpffs directory), so they record while no node
    agent runs. Loaded and pinned on first open; later opens reuse the pins."""

    def __new__(cls, pin_dir: str | Path) -> ExitRecorder: ...
    def watch(self, pid: int, start_ticks: int) -> None:
        """Records the exit status of `pid`, started at `start_ticks` (/proc/PID/stat field
        22)."""
    def status(self, pid: int, start_ticks: int) -> int | None:
        """The wait status recorded for `pid` started at `start_ticks`, or None."""
    def forget(self, pid: int) -> None:
        """Stops watching `pid`."""
    def watched(self) -> list[int]:
        """The pids watched now."""
    @staticmethod
    def remove(pin_dir: str | Path) -> bool:
        """Unpins the recorder under `pin_dir`; whether anything was pinned."""

@final
class ExecTracerHandle:
    """Exec tracing for one node instance's cgroup2 subtree (`ebpf/exec.bpf.c`)."""

    def __new__(cls, instance: str | Path, level: int) -> ExecTracerHandle:
        """Traces execs under `instance`, `level` levels below the cgroup2 root (level 0)."""
    def events(self) -> list[tuple[int, int, int, int, int, bytes, bytes, bool]]:
        """Execs queued since the last call: `(cgroup_id, time_ns, pid, ppid, uid, filename,
        argv, argv_truncated)`; argv is NUL-separated and at most 256 bytes."""
    def lost(self) -> int:
        """Execs lost to a full ring buffer since attach."""
    def events_fd(self) -> int:
        """A file descriptor that polls readable when events are queued."""
    def close(self) -> None:
        """Detaches the program and frees the maps; idempotent."""

def cgroup_id(dir: str | Path) -> int:
    """The cgroup2 id of a cgroup2 directory (what BPF's cgroup helpers return)."""
