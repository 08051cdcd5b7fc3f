"""The one sandbox spec: every option of an isolated task, validated once, in one JSON form.

`Sandbox` is what `agentnode exec`, `agentnode submit`, the node's API (`POST /v1/tasks`), the
task records and the OpenAPI document share: the same fields, the same bounds, the same errors.
A value is checked when a `Sandbox` is made, so whatever holds one (a queued task, a record
read back after a restart) holds a valid spec. Fields, JSON form and bounds: docs/sandbox.md.

Bounds exist for every number, because each one ends up in a kernel interface with its own
width: ids in setresuid (where 4294967295 means "leave unchanged"), sizes and counts in cgroup
files and tmpfs options, durations in the Rust side's timers.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from agentnode.egress import cli as egress_cli
from agentnode.egress.mode import NET_MODES, network_and_policy
from agentnode.errors import PolicyError, UsageError
from agentnode.isolation.units import parse_duration, parse_size

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

    from agentnode.egress.policy import EgressPolicy

__all__ = [
    "CAPABILITIES",
    "FIELDS",
    "MAX_BYTES",
    "MAX_ID",
    "MAX_PIDS",
    "MAX_SECONDS",
    "MIN_MEMORY",
    "NOBODY",
    "Limits",
    "Mount",
    "Sandbox",
    "SpecError",
    "capability_number",
    "check_duration",
    "json_schema",
    "parse_mount",
    "parse_user",
]

#: The largest uid or gid: (uid_t)-1 = 4294967295 means "leave unchanged" to setresuid.
MAX_ID = 2**32 - 2
#: With a user namespace, task ids 0..65535 are mapped (to host ids from USERNS_BASE on).
MAX_USERNS_ID = 65535
NOBODY = 65534
#: Sizes (memory, memory_high, swap, tmp_size): up to 1 PiB (swap may be 0: none at all).
MAX_BYTES = 1 << 50
#: The least memory limit (Docker's is 6 MiB): below it a task can be OOM-killed before its
#: exec, while it still shares the starting process's memory, and the kernel then kills every
#: process sharing that memory, the node agent included.
MIN_MEMORY = 4 << 20
#: The kernel's own ceiling for pids.max (PID_MAX_LIMIT on 64-bit).
MAX_PIDS = 4_194_304
#: Durations (timeout, heartbeat): more than zero, at most 100 years (what `parse_duration`
#: takes as text too).
MAX_SECONDS = 100 * 365 * 86400.0
MAX_NOFILE = 1 << 20
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
#: Compiled on first use (re's cache): a start given no user pays no compile.
_USER = r"(\d{1,20})(?::(\d{1,20}))?"

#: Capability names in kernel order (`CAP_` prefix dropped): the index is the number.
CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip
#: Capabilities that open packet or raw sockets, or reconfigure the task's network: with them
#: a task sends frames no egress hook sees, so they never go with an enforced policy.
_NET_BYPASS = frozenset({"CAP_NET_RAW", "CAP_NET_ADMIN"})


class SpecError(UsageError):
    """A sandbox field is malformed or out of bounds. `field` is its JSON name; the message
    starts with it (`user '4294967295': ...`), and `for_option` renames it for the CLI."""

    def __init__(self, field_name: str, message: str, why: str | None = None) -> None:
        super().__init__(message)
        self.field = field_name
        #: What is wrong with the value, without the field and the value.
        self.why = why

    def for_option(self, option: str, typed: str | None = None) -> UsageError:
        """The same error naming the command-line option instead of the JSON field (and
        quoting `typed`, what was typed, when given)."""
        if typed is not None and self.why is not None:
            return UsageError(f"{option} {typed!r}: {self.why}")
        return UsageError(option + str(self).removeprefix(self.field))


def _bad(name: str, value: object, why: str) -> NoReturn:
    shown = repr(value)
    if len(shown) > 60:  # the line stays readable whatever was sent
        shown = shown[:48] + f"... ({len(shown)} characters)"
    raise SpecError(name, f"{name} {shown}: {why}", why)


def _parsed(name: str, text: str, parse: Callable[..., Any]) -> Any:
    try:
        return parse(text, option=name)
    except UsageError as e:
        _bad(name, text, str(e).removeprefix(f"{name}: {text!r} "))


def _integer(name: str, value: object, lo: int, hi: int, *, shown: object = None) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(name, value, f"must be a whole number from {lo} to {hi}")
    if not lo <= value <= hi:
        _bad(name, value if shown is None else shown, f"is out of range ({lo} to {hi})")
    return value


def _real(name: str, value: object, lo: float, hi: float, *, shown: object = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _bad(name, value, "must be a number")
    if not math.isfinite(value):
        _bad(name, value, "must be a finite number")
    if not lo <= value <= hi:
        _bad(name, value if shown is None else shown, f"is out of range ({lo:g} to {hi:g})")
    return float(value)


def _size(name: str, value: object, least: int = 1) -> int:
    shown = value
    if isinstance(value, str):
        value = _parsed(name, value, functools.partial(parse_size, least=min(least, 1)))
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(name, shown, "must be a whole number of bytes, or text like 512M")
    if not least <= value <= MAX_BYTES:
        low = (
            f"{least} byte{'' if least == 1 else 's'}" if least < 1 << 20 else f"{least >> 20} MiB"
        )
        _bad(name, shown, f"is out of range ({low} to 1 PiB)")
    return value


def check_duration(name: str, value: object) -> float:
    """Seconds in `value` (a number, or text like `30s`), more than 0 and at most
    `MAX_SECONDS`; `SpecError` naming `name` otherwise. Used for timeouts and heartbeats."""
    shown = value
    if isinstance(value, str):
        value = _parsed(name, value, parse_duration)
    seconds = _real(name, value, -math.inf, math.inf, shown=shown)
    if not 0 < seconds <= MAX_SECONDS:
        _bad(name, shown, "must be more than 0 s and at most 100 years")
    return seconds


def _path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        _bad(name, value, "must be an absolute path")
    if ".." in value.split("/"):
        _bad(name, value, "must not contain '..'")
    return value


def capability_number(name: str) -> int:
    """`CAP_NET_BIND_SERVICE` (or `net_bind_service`) -> 10."""
    key = name.lower().removeprefix("cap_")
    if key not in CAPABILITIES:
        _bad("caps", name, "unknown capability (example: CAP_NET_BIND_SERVICE)")
    return CAPABILITIES.index(key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """A task's resource limits; None leaves a resource unlimited (bounds: module constants)."""

    #: CPU time in CPUs (cpu.max quota over a 100 ms period), 0.01 to 1024.
    cpus: float | None = None
    #: Relative CPU weight, 1 to 10000 (the kernel's default is 100).
    cpu_weight: int | None = None
    memory: int | None = None
    #: Throttling threshold (cgroup v2 memory.high).
    memory_high: int | None = None
    #: Swap on top of `memory`.
    swap: int | None = None
    pids: int | None = None
    tmp_size: int = 64 << 20
    #: Wall-clock seconds before the task is killed.
    timeout: float | None = None
    #: RLIMIT_NOFILE inside the task.
    nofile: int = 1024

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.cpus is not None:
            set_(self, "cpus", _real("cpus", self.cpus, 0.01, 1024.0))
        if self.cpu_weight is not None:
            set_(self, "cpu_weight", _integer("cpu_weight", self.cpu_weight, 1, 10000))
        # swap 0 is "no swap" (what the tools' sandboxes ask for), not "no limit".
        for name, least in (("memory", MIN_MEMORY), ("memory_high", MIN_MEMORY), ("swap", 0)):
            if getattr(self, name) is not None:
                set_(self, name, _size(name, getattr(self, name), least))
        set_(self, "tmp_size", _size("tmp_size", self.tmp_size))
        if self.pids is not None:
            set_(self, "pids", _integer("pids", self.pids, 1, MAX_PIDS))
        if self.timeout is not None:
            set_(self, "timeout", check_duration("timeout", self.timeout))
        set_(self, "nofile", _integer("nofile", self.nofile, 1, MAX_NOFILE))


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path bound into the task (read-only unless `writable`). The JSON form is
    `HOST:DEST` in the sandbox's `ro` or `rw` list."""

    src: str
    dest: str
    writable: bool = False

    def __post_init__(self) -> None:
        name = "rw" if self.writable else "ro"
        if not isinstance(self.src, str) or not self.src.startswith("/") or ":" in self.src:
            _bad(name, self.src, "the host path must be absolute, without ':'")
        if "\0" in self.src:
            _bad(name, self.src, "the host path must not contain NUL")
        try:
            _path(name, self.dest)
        except SpecError:
            _bad(name, self.dest, "the destination must be absolute, without '..'")

    def __str__(self) -> str:
        return f"{self.src}:{self.dest}"


#: The JSON names of a sandbox's fields (the keys of `Sandbox.to_json`), in document order.
FIELDS = ("cpus", "cpu_weight", "memory", "memory_high", "swap", "pids", "tmp_size", "timeout",
          "nofile", "user", "userns", "caps", "rootfs", "ro", "rw", "cwd", "hostname", "env",
          "network", "allow", "allow_hosts", "egress_rate", "conn_rate", "publish")  # fmt: skip
_LIMITS = tuple(f.name for f in fields(Limits))
#: Fields given as one option's text (the others are lists, or come from several options).
_SCALARS = frozenset(_LIMITS) | {"user", "cwd", "hostname", "rootfs", "egress_rate", "conn_rate"}
#: Command-line option of each field (`add_arguments`), for errors that name what was typed.
_OPTION = {
    **{name: "--" + name.replace("_", "-") for name in FIELDS},
    "caps": "--cap-add",
    "network": "--net",
    "allow_hosts": "--allow-host",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Sandbox:
    """Everything about how a task is isolated: limits, identity, capabilities, file system,
    environment and network. Frozen and checked when made: `SpecError` names the first bad
    field. `network` "" becomes `egress` when any rule or rate is given, else `none`."""

    limits: Limits = field(default_factory=Limits)
    uid: int = NOBODY
    gid: int = NOBODY
    #: A user namespace: task ids 0..65535 map to unprivileged host ids.
    userns: bool = False
    #: Capabilities kept, canonical names (`CAP_NET_BIND_SERVICE`); all others are dropped.
    caps: tuple[str, ...] = ()
    #: The read-only root (`/`: the host's).
    rootfs: str = "/"
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/workspace"
    hostname: str = "agentnode"
    #: Extra variables (PATH, LANG and HOME are set already).
    env: tuple[tuple[str, str], ...] = ()
    network: str = ""
    allow: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    egress_rate: str | int | None = None
    conn_rate: str | int | None = None
    #: `HOSTPORT:PORT`: the task's TCP PORT reachable on the node's HOSTPORT (egress only).
    publish: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.limits, Limits):
            raise TypeError("Sandbox(limits=...) takes a Limits")
        hi = MAX_USERNS_ID if self.userns is True else MAX_ID
        why = " with userns" if self.userns is True else ""
        for name in ("uid", "gid"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                _bad("user", f"{self.uid}:{self.gid}", f"{name} must be from 0 to {hi}{why}")
        if not isinstance(self.userns, bool):
            _bad("userns", self.userns, "must be true or false")
        set_(self, "caps", tuple(_cap_name(c) for c in _strings("caps", self.caps)))
        set_(self, "rootfs", _path("rootfs", self.rootfs))
        set_(self, "cwd", _path("cwd", self.cwd))
        mounts = tuple(self.mounts)
        if not all(isinstance(m, Mount) for m in mounts):
            raise TypeError("Sandbox(mounts=...) takes Mount values")
        set_(self, "mounts", mounts)
        if not isinstance(self.hostname, str) or not _HOSTNAME.fullmatch(self.hostname):
            _bad("hostname", self.hostname, "must be 1-64 letters, digits, '.' or '-'")
        env = tuple(self.env)
        for pair in env:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)
            ):
                _bad("env", pair, "must be NAME, VALUE strings")
            name, value = pair
            if not name or "=" in name or "\0" in name + value:
                _bad("env", name, "a name is not empty and has no '=' or NUL; values no NUL")
        set_(self, "env", env)
        set_(self, "allow", _strings("allow", self.allow))
        set_(self, "allow_hosts", _strings("allow_hosts", self.allow_hosts))
        set_(self, "publish", _strings("publish", self.publish))
        for name in ("egress_rate", "conn_rate"):
            rate = getattr(self, name)
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, str | int)):
                _bad(name, rate, "must be text like '1MiB/s' or a whole number")
        if not isinstance(self.network, str):
            _bad("network", self.network, f"use {', '.join(NET_MODES)}")
        mode, _ = self.egress()
        set_(self, "network", mode)
        if mode == "egress" and (bypass := sorted(_NET_BYPASS.intersection(self.caps))):
            _bad(
                "caps",
                bypass[0],
                "a raw or packet socket bypasses the egress policy: drop it, or use network host",
            )

    # -- what the task needs ---------------------------------------------------------------------

    def egress(self) -> tuple[str, EgressPolicy | None]:
        """The network mode and its egress policy (None with `none`)."""
        try:
            rules = (self.allow, self.allow_hosts, self.egress_rate, self.conn_rate, self.publish)
            # The resolved mode: the spec's first parse and every later one share a cache key.
            wants = bool(rules[0] or rules[1] or rules[4]) or rules[2] is not None
            wants = wants or rules[3] is not None
            return _network(self.network or ("egress" if wants else "none"), *rules)
        except PolicyError as e:
            message = str(e)  # "FIELD 'rule': why", quoting the rule (again in `why`)
            if len(message) > 240:
                message = message[:200] + f"... ({len(message)} characters)"
            raise SpecError(message.split(" ", 1)[0], message) from None

    @property
    def user(self) -> str:
        """`UID:GID`, as the JSON form has it."""
        return f"{self.uid}:{self.gid}"

    def cap_numbers(self) -> list[int]:
        return [capability_number(c) for c in self.caps]

    def check_host(self) -> None:
        """Checks what the spec names on this host (the root tree and bind sources exist):
        done where a task is asked for, not when a record is read back."""
        if not os.path.isdir(self.rootfs):
            _bad("rootfs", self.rootfs, "is not a directory (give a root file system tree)")
        for m in self.mounts:
            if not os.path.exists(m.src):
                _bad("rw" if m.writable else "ro", m.src, "does not exist (give a host path)")

    # -- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON form (flat; every key of `FIELDS`); `from_json` reads it back."""
        limits = self.limits
        return {
            **{name: getattr(limits, name) for name in _LIMITS},
            "user": self.user,
            "userns": self.userns,
            "caps": list(self.caps),
            "rootfs": self.rootfs,
            "ro": [str(m) for m in self.mounts if not m.writable],
            "rw": [str(m) for m in self.mounts if m.writable],
            "cwd": self.cwd,
            "hostname": self.hostname,
            "env": dict(self.env),
            "network": self.network,
            "allow": list(self.allow),
            "allow_hosts": list(self.allow_hosts),
            "egress_rate": self.egress_rate,
            "conn_rate": self.conn_rate,
            "publish": list(self.publish),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sandbox:
        """A sandbox from its JSON form; absent or null fields take the type's defaults. Sizes may be text (`512M`), durations too (`30s`), `user` is
        `UID[:GID]` text or a number. `SpecError` names the first bad or unknown field."""
        if not isinstance(data, Mapping):
            _bad("body", data, "must be a JSON object")
        for key in data:
            if key not in FIELDS:
                _bad(key, data[key], f"unknown field (known: {', '.join(FIELDS)})")
        d = {k: v for k, v in data.items() if v is not None}
        limits = Limits(**{k: d[k] for k in _LIMITS if k in d})
        kw: dict[str, Any] = {}
        if "user" in d:
            kw["uid"], kw["gid"] = parse_user(d["user"])
        for key in ("userns", "rootfs", "cwd", "hostname", "network", "egress_rate", "conn_rate"):
            if key in d:
                kw[key] = d[key]
        for key in ("caps", "allow", "allow_hosts", "publish"):
            if key in d:
                kw[key] = _strings(key, d[key])
        mounts = [
            parse_mount(key, text) for key in ("ro", "rw") for text in _strings(key, d.get(key, ()))
        ]
        env = d.get("env", {})
        if not isinstance(env, Mapping):
            _bad("env", env, "must be an object of string values")
        return cls(limits=limits, mounts=tuple(mounts), env=tuple(env.items()), **kw)

    # -- the command line ------------------------------------------------------------------------

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, node: bool = False) -> None:
        """Adds the sandbox options to `parser` (`exec`; `submit` with `node`, where --memory
        and --timeout are also what the scheduler reserves, with the node's defaults, and
        --cpu-request, a task's option, says what it reserves of its --cpus)."""
        g = parser.add_argument_group("sandbox")
        a = g.add_argument
        if node:
            a("--cpus", metavar="N", help="CPUs allowed, a limit (default 1)")
            a("--cpu-request", metavar="N",
              help="CPUs the node reserves for it, at most --cpus (default: --cpus; 0.1 for an "
                   "--agent)")  # fmt: skip
            a("--memory", metavar="SIZE", help="memory requested and allowed (default 512M)")
            a("--timeout", metavar="DURATION", help="wall-clock limit (default 1h)")
        else:
            a("--cpus", metavar="N", help="CPU time limit in CPUs, e.g. 0.5")
            a("--memory", metavar="SIZE", help="memory limit, e.g. 512M")
            a("--timeout", metavar="DURATION", help="kill the task after this, e.g. 30s")
        a("--cpu-weight", metavar="W", help="relative CPU weight 1..10000 (default 100)")
        a("--memory-high", metavar="SIZE", help="memory throttling threshold (cgroup v2)")
        a("--swap", metavar="SIZE", help="swap limit on top of --memory")
        a("--pids", metavar="N", help="maximum number of processes")
        a("--tmp-size", metavar="SIZE", help="size of /tmp (default 64M)")
        a("--user", metavar="UID[:GID]", help="run as this user (default 65534, nobody)")
        a("--userns", action="store_true", help="also isolate users (task root unprivileged)")
        a(
            "--cap-add",
            action="append",
            default=[],
            metavar="CAP",
            help="keep a capability (NET_RAW, NET_ADMIN: not with egress rules)",
        )
        a("--rootfs", metavar="DIR", help="root file system (default: host, read-only)")
        a("--ro", action="append", default=[], metavar="HOST[:DEST]", help="bind read-only")
        a("--rw", action="append", default=[], metavar="HOST[:DEST]", help="bind read-write")
        a("--env", action="append", default=[], metavar="K=V", help="set a variable")
        a("--cwd", metavar="DIR", help="working directory in the task (default /workspace)")
        a("--hostname", help="the task's hostname (default agentnode)")
        egress_cli.add_arguments(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sandbox:
        """The sandbox the options of `add_arguments` ask for; relative paths are made
        absolute here. A bad value is a `UsageError` naming the option and what was typed."""
        try:
            egress_cli.network_from_args(args)  # its errors name the options, as typed
            data: dict[str, Any] = {}
            for name, parse in (("cpus", float), ("cpu_weight", int), ("pids", int)):
                text = getattr(args, name)
                if text is not None:
                    try:
                        data[name] = parse(text)
                    except ValueError:
                        _bad(name, text, "is not a number" if parse is float else
                             "is not a whole number")  # fmt: skip
            for name in ("memory", "memory_high", "swap", "tmp_size", "timeout", "user",
                         "cwd", "hostname", "egress_rate", "conn_rate"):  # fmt: skip
                if getattr(args, name) is not None:
                    data[name] = getattr(args, name)
            if args.rootfs is not None:
                data["rootfs"] = os.path.abspath(args.rootfs)
            data["userns"] = args.userns
            data["caps"] = args.cap_add
            for key in ("ro", "rw"):
                data[key] = [_absolute(key, text) for text in getattr(args, key)]
            env = {}
            for item in args.env:
                name, eq, value = item.partition("=")
                if not eq or not name:
                    _bad("env", item, "is not NAME=VALUE")
                env[name] = value
            data["env"] = env
            data["network"] = getattr(args, "net", None)
            data["allow"], data["allow_hosts"] = args.allow, args.allow_host
            data["publish"] = getattr(args, "publish", [])
            sandbox = cls.from_json(data)
            sandbox.check_host()
        except SpecError as e:
            typed = getattr(args, e.field, None) if e.field in _SCALARS else None
            raise e.for_option(_OPTION.get(e.field, e.field), typed) from None
        return sandbox


@functools.lru_cache(maxsize=16)
def _network(
    mode: str,
    allow: tuple[str, ...],
    hosts: tuple[str, ...],
    rate: str | int | None,
    conn_rate: str | int | None,
    publish: tuple[str, ...],
) -> tuple[str, EgressPolicy | None]:
    # A task's spec is made several times on its way (request, record, start, each rule
    # change), and parsing a 10k-rule policy takes ~100 ms: the same rules parse once.
    # EgressPolicy is frozen, so sharing one between specs is safe.
    return network_and_policy(
        mode,
        allow=allow,
        hosts=hosts,
        rate=rate,
        conn_rate=conn_rate,
        publish=publish,
        names={
            "mode": "network",
            "allow": "allow",
            "hosts": "allow_hosts",
            "rate": "egress_rate",
            "conn_rate": "conn_rate",
            "publish": "publish",
        },
    )


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        _bad(name, value, "must be a list of strings")
    if not all(isinstance(x, str) for x in value):
        _bad(name, value, "must be a list of strings")
    return tuple(value)


def _cap_name(name: str) -> str:
    return "CAP_" + CAPABILITIES[capability_number(name)].upper()


def parse_user(user: object) -> tuple[int, int]:
    """(uid, gid) of `UID[:GID]` text or a number; `SpecError` (field `user`) when malformed
    or out of range."""
    if isinstance(user, int) and not isinstance(user, bool):
        if not 0 <= user <= MAX_ID:
            _bad("user", user, f"must be from 0 to {MAX_ID}")
        return user, user
    m = re.fullmatch(_USER, user) if isinstance(user, str) else None
    if m is None:
        _bad("user", user, "is not UID[:GID] (example: 1000:1000)")
    uid, gid = int(m.group(1)), int(m.group(2) or m.group(1))
    for which, n in (("uid", uid), ("gid", gid)):
        if n > MAX_ID:
            why = " (4294967295 means 'unchanged' to the kernel)" if n == MAX_ID + 1 else ""
            _bad("user", user, f"{which} must be from 0 to {MAX_ID}{why}")
    return uid, gid


def parse_mount(key: str, text: str) -> Mount:
    """`HOST[:DEST]` of the `ro` or `rw` list `key` as a Mount (DEST defaults to HOST)."""
    src, _, dest = text.partition(":")
    mount = Mount(src, dest or src, key == "rw")
    # The node's own binds go there (its sockets, unmasked, and a retry's checkpoint).
    if [p for p in mount.dest.split("/") if p not in ("", ".")][:2] == ["run", "agentnode"]:
        _bad(key, text, "the destination must not be in /run/agentnode (the node's own)")
    return mount


def _absolute(key: str, text: str) -> str:
    src, colon, dest = text.partition(":")
    if not src:
        _bad(key, text, "is not HOST[:DEST]")
    return os.path.abspath(src) + colon + dest


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the sandbox's JSON form, as the OpenAPI document has it (null: the
    default, in a request; unlimited, in a task)."""

    def size(least: int) -> dict[str, Any]:
        return {"oneOf": [{"type": "integer", "minimum": least, "maximum": MAX_BYTES},
                          {"type": "string", "examples": ["512M"]}, {"type": "null"}]}  # fmt: skip

    from agentnode.egress.policy import MAX_CONN_RATE, MAX_RATE

    duration = {"oneOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
                          {"type": "string", "examples": ["30s"]}, {"type": "null"}]}  # fmt: skip
    strings = {"type": "array", "items": {"type": "string"}}
    properties: dict[str, dict[str, Any]] = {
        "cpus": {"type": ["number", "null"], "minimum": 0.01, "maximum": 1024},
        "cpu_weight": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000},
        "memory": size(MIN_MEMORY),
        "memory_high": size(MIN_MEMORY),
        "swap": size(0),  # 0: no swap at all
        "pids": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_PIDS},
        "tmp_size": size(1),
        "timeout": duration,
        "nofile": {"type": "integer", "minimum": 1, "maximum": MAX_NOFILE, "default": 1024},
        "user": {
            "oneOf": [
                {"type": "string", "pattern": "^[0-9]{1,10}(:[0-9]{1,10})?$"},
                {"type": "integer", "minimum": 0, "maximum": MAX_ID},
            ],
            "default": "65534:65534",
            "description": f"UID[:GID], each 0..{MAX_ID} (0..{MAX_USERNS_ID} with userns)",
        },
        "userns": {"type": "boolean", "default": False},
        "caps": {
            "type": "array",
            "items": {"type": "string", "examples": ["CAP_NET_BIND_SERVICE"]},
            "description": "capabilities kept; CAP_NET_RAW and CAP_NET_ADMIN not with egress",
        },
        "rootfs": {"type": "string", "default": "/"},
        "ro": {**strings, "description": "host paths bound read-only, HOST[:DEST]"},
        "rw": {**strings, "description": "host paths bound read-write, HOST[:DEST]"},
        "cwd": {"type": "string", "default": "/workspace"},
        "hostname": {
            "type": "string",
            "pattern": f"^{_HOSTNAME.pattern}$",
            "default": "agentnode",
        },
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "network": {
            "type": "string",
            "enum": [*NET_MODES, ""],
            "description": "none: loopback only; egress: own netns on the node bridge, deny by "
            "default; host: the host's netns, BPF enforcement only (weaker). Default: egress "
            "when any allow rule or rate is given, else none.",
        },
        "allow": {**strings, "description": "CIDR[:PORTS][/tcp|udp] rules, as exec --allow"},
        "allow_hosts": {
            **strings,
            "description": "NAME[:PORTS] or *.DOMAIN rules, resolved through the node's DNS "
            "forwarder",
        },
        "egress_rate": {
            "oneOf": [
                {"type": "string", "examples": ["1MiB/s"]},
                {"type": "integer", "minimum": 1, "maximum": MAX_RATE},
                {"type": "null"},
            ],
            "description": "bytes per second, e.g. 1MiB/s",
        },
        "conn_rate": {
            "oneOf": [
                {"type": "string", "examples": ["20/s"]},
                {"type": "integer", "minimum": 1, "maximum": MAX_CONN_RATE},
                {"type": "null"},
            ],
            "description": "new connections per second, e.g. 20/s",
        },
        "publish": {
            **strings,
            "description": "HOSTPORT:PORT: the task's TCP PORT reachable on the node's HOSTPORT "
            "(network egress)",
        },
    }
    assert tuple(properties) == FIELDS
    # Every field takes null for its default (`from_json`), so a client may send a whole form.
    nullable = {name: _nullable(prop) for name, prop in properties.items()}
    return {"type": "object", "additionalProperties": False, "properties": nullable}


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """`prop` that also admits null."""
    if "oneOf" in prop:
        if {"type": "null"} in prop["oneOf"]:
            return prop
        return {**prop, "oneOf": [*prop["oneOf"], {"type": "null"}]}
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    out = {**prop, "type": types if "null" in types else [*types, "null"]}
    if "enum" in prop and None not in prop["enum"]:
        out["enum"] = [*prop["enum"], None]
    return out
