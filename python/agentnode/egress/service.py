"""`EgressService`: task networking for a process that starts tasks (the node daemon, or
`agentnode exec`): the node bridge, the DNS forwarder and, per task, its netns, veth and BPF
programs, created together and removed together.

The forwarder runs on an event loop of its own, on a thread that lives in the node's network
namespace, so it serves tasks whichever thread starts them and whatever the caller's loop does.
It listens on the bridge address at a port the kernel picks: several processes on one host
(a node and some `agentnode exec`) each run their own, and each task's BPF programs redirect
its DNS to the forwarder of the process that started it.

The BPF programs are loaded once per service (`NodePrograms`): a task's start only attaches them
to its cgroup and writes its entry in the node maps. A node daemon's tasks outlive it (`pins`):
the programs and node maps are pinned once under the node's bpffs directory (`PROGRAMS_PIN`),
each task's links in a directory of its own, so the kernel enforces the policy while no daemon
runs, and its network belongs to the node, not the process. Its DNS then fails closed: the programs still redirect
port 53 to the forwarder's port, where nothing answers. The next daemon `adopt`s the tasks it
re-adopts (their enforcement brought to their recorded policy, their DNS redirected to its own
forwarder, which learns their names again) and `sweep`s the rest (their links, and their entries
in the node maps).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from agentnode import _native
from agentnode.egress.enforce import PROGRAMS_PIN, Denial, Egress, NodePrograms
from agentnode.egress.network import NodeNetwork, TaskNet
from agentnode.egress.policy import EgressPolicy
from agentnode.errors import AgentnodeError, EgressError, UsageError

if TYPE_CHECKING:
    from agentnode.egress.dns import DnsForwarder, DnsLimits

__all__ = ["EgressService", "TaskEgress", "default_upstream"]

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
#: Ended tasks' networks that may wait for the background teardown at once (`retire`).
RETIRE_BACKLOG = 16
#: Seconds the background teardown lets released veths wait for `NodeNetwork.reap` while more
#: ends keep coming (it reaps as soon as none waits).
REAP_AFTER_S = 1.0
#: Seconds between two looks at the node network (its bridge and table made again when they
#: were removed from outside: an operator's `nft flush ruleset`, a network manager).
REPAIR_S = 10.0

log = logging.getLogger(__name__)


def default_upstream(resolv_conf: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The host's first IPv4 nameserver: where the forwarder sends the names it allows."""
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                if ipaddress.ip_address(parts[1]).version == 4:
                    return parts[1], 53
            except ValueError:
                continue
    return "127.0.0.53", 53


class TaskEgress:
    """One task's network: its netns (mode `egress`), its BPF programs and its forwarder entry.

    Made by `EgressService.prepare`; `attach` is the spawn hook that enforces the policy on the
    task's cgroup before its first process runs; `close` removes all of it (idempotent)."""

    def __init__(
        self,
        service: EgressService,
        mode: Literal["egress", "host"],
        policy: EgressPolicy,
        net: TaskNet | None,
        on_denial: Callable[[Denial], None] | None = None,
    ) -> None:
        self.mode = mode
        self.net = net
        self._service = service
        self._policy = policy
        self._on_denial = on_denial
        self._egress: Egress | None = None
        self._final: dict[str, int] | None = None
        #: Whether its enforcement is pinned, to outlive this process (`leave`).
        self.pinned = False

    @property
    def netns_path(self) -> str | None:
        """The netns the task joins (mode `egress`); None: the host's (mode `host`)."""
        return self.net.netns_path if self.net else None

    @property
    def address(self) -> str | None:
        """The task's address on the node bridge (mode `egress`)."""
        return str(self.net.address) if self.net else None

    @property
    def policy(self) -> EgressPolicy:
        return self._egress.policy if self._egress else self._policy

    def attach(self, cgroup_dir: str | os.PathLike[str]) -> None:
        """Enforces the policy on `cgroup_dir` and routes the task's DNS to the forwarder."""
        self._egress = self._service._attach(self, os.fspath(cgroup_dir), self._policy)

    def update(self, policy: EgressPolicy) -> None:
        """Replaces the policy live; applies to the task's next connection."""
        if self._egress is None:
            raise EgressError("the task's egress policy is not attached (the task has ended)")
        self._service._check(self.mode, policy)
        if policy.published != self._egress.policy.published:
            raise UsageError("published ports are fixed when a task starts; they cannot change")
        self._egress.update(policy)

    def poll_denials(self) -> None:
        """Delivers the denials queued so far to the callbacks now (not at the loop's next
        turn), so a caller that saw a connection fail also sees its denial."""
        egress = self._egress
        if egress is not None:
            self._service._call(egress.poll_denials)

    def stats(self) -> dict[str, int]:
        """Counters (bytes/packets in and out, connections, DNS); final once closed."""
        if self._egress is not None:
            return self._egress.stats()
        return dict(self._final or {})

    def close_later(self) -> None:
        """`close`, but off the caller's path: the denials queued so far are delivered and the
        counters taken now; the rest (programs, forwarder entry, veth, netns) goes to the
        service's background teardown (see `EgressService.retire`)."""
        if self._egress is not None:
            self._service._call(self._egress.poll_denials)
        address, egress, net = self._release()
        self._service.retire(lambda: self._service._teardown(address, egress, net, later=True))

    def close(self) -> None:
        """Detaches the programs, forgets the task in the forwarder, removes veth and netns."""
        self._service._teardown(*self._release())

    def _release(self) -> tuple[str | None, Egress | None, TaskNet | None]:
        """Takes the final counters and hands over what is left to remove (once)."""
        address = self.address
        egress, self._egress = self._egress, None
        if egress is not None:
            self._final = egress.stats()
        net, self.net = self.net, None
        return address, egress, net

    def leave(self) -> None:
        """Lets the task's network run on without this process: the pinned enforcement stays in
        force, the netns and veth stay, for the node's next start to `EgressService.adopt`.
        Raises `EgressError` without pins (not a node's task): its enforcement goes with this
        process, and a task must never run on without it."""
        if not self.pinned and self._egress is not None:
            raise EgressError("this task's egress enforcement is not pinned: it cannot run on")
        egress, self._egress = self._egress, None
        if egress is not None:
            self._final = egress.stats()
            self._service._detach(self.address, egress, leave=True)
        if self.net is not None:
            self._service.network.leave(self.net)
            self.net = None


class EgressService:
    """The node side of task networking. Thread-safe; `close()` removes what it made.

    `services`: the node's own `(address, port)` services every task may reach (the inference
    proxy, the memory API). `node_netns`: the netns the node side lives in (a name under
    /run/netns; default the host's). `on_denial` receives each denied connection (the audit
    log gets them regardless). `dns_limits`: what the forwarder lets each task send upstream."""

    def __init__(
        self,
        *,
        bridge: str = "agentnode0",
        subnet: str = "10.88.0.0/24",
        dns_upstream: tuple[str, int] | None = None,
        services: Sequence[tuple[str, int]] = (),
        node_netns: str | None = None,
        on_denial: Callable[[Denial], None] | None = None,
        dns_limits: DnsLimits | None = None,
        node: str | None = None,
        pins: Path | None = None,
    ) -> None:
        self.network = NodeNetwork(bridge=bridge, subnet=subnet, node_netns=node_netns, node=node)
        #: Where each task's enforcement is pinned, in a directory named for its cgroup (None:
        #: not pinned; it goes with this process). A node daemon's: `node` names the node.
        self.pins = pins
        self._adopted_pins: set[str] = set()
        self.dns_limits = dns_limits
        self.upstream = dns_upstream or default_upstream()
        self.services = tuple(services)
        self.node_netns = node_netns
        self._on_denial = on_denial
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: `sweep` ran: this is a node's service, whose close removes what its earlier runs left.
        self._swept = False
        self._thread: threading.Thread | None = None
        self._forwarder: DnsForwarder | None = None
        self._dns: tuple[str, int] | None = None
        #: The BPF programs every task attaches, loaded at `start`.
        self.programs: NodePrograms | None = None
        #: Ended tasks' networks waiting for the teardown thread (`retire`), and that thread.
        self._retiring: deque[Callable[[], None]] = deque()
        self._retirer: threading.Thread | None = None
        self._retired = threading.Condition(self._lock)
        #: The veths of the networks released since the last reap, and when the first was.
        self._dying: list[str] = []
        self._dying_since = 0.0

    @property
    def dns(self) -> tuple[str, int] | None:
        """Where the forwarder listens, once started."""
        return self._dns

    def start(self) -> None:
        """Sweeps what crashed owners left, creates the bridge and starts the forwarder
        (idempotent; `prepare` calls it)."""
        with self._lock:
            if self._loop is not None:
                return
            if self.programs is None:
                if self.pins is None:
                    self.programs = NodePrograms.load()
                else:
                    self.pins.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self.programs = NodePrograms.shared(self.pins / PROGRAMS_PIN)
            self.network.sweep()
            self.network.ensure()
            loop = asyncio.new_event_loop()
            started: list[BaseException | None] = []
            ready = threading.Event()
            thread = threading.Thread(
                target=self._serve,
                args=(loop, started, ready),
                name="agentnode-egress",
                daemon=True,
            )
            thread.start()
            ready.wait()
            if started[0] is not None:
                thread.join()
                loop.close()
                raise started[0]
            self._loop, self._thread = loop, thread

    def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        started: list[BaseException | None],
        ready: threading.Event,
    ) -> None:
        try:
            if self.node_netns is not None:
                # setns is per thread: every socket of this loop (the forwarder's, and its
                # upstream queries) lives in the node's netns.
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{self.node_netns}") as ns:
                    if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise EgressError(
                            f"cannot enter the node netns {self.node_netns!r}: {os.strerror(err)}"
                        )
            # Imported here: dnspython's async stack costs `agentnode exec --net none` ~100 ms.
            from agentnode.egress.dns import DnsForwarder
            from agentnode.egress.screen import AnswerScreen

            asyncio.set_event_loop(loop)
            # Answers pointing at the node's addresses (read in this thread's netns, the node's)
            # or its task subnet are dropped unless a task's CIDR rule names them.
            forwarder = DnsForwarder(
                upstream=self.upstream,
                limits=self.dns_limits,
                screen=AnswerScreen(extra=[self.network.subnet]),
            )
            self._dns = loop.run_until_complete(self._listen(forwarder))
            self._forwarder = forwarder
        except BaseException as e:
            started.append(e if isinstance(e, EgressError) else EgressError(
                f"cannot start the DNS forwarder on {self.network.gateway}: {e}"
            ))  # fmt: skip
            ready.set()
            return
        started.append(None)
        ready.set()
        loop.call_later(REPAIR_S, self._watch, loop)
        loop.run_forever()
        loop.run_until_complete(forwarder.close())

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every REPAIR_S, off the forwarder's loop: the node network made again if it was
        removed from outside (tasks' inbound isolation and masquerade are in its table)."""
        loop.run_in_executor(None, self._repair)
        loop.call_later(REPAIR_S, self._watch, loop)

    def _repair(self) -> None:
        with self._lock:
            if self._loop is None:  # closing: the network goes
                return
            try:
                self.network.repair()
            except Exception as e:  # tried again at the next look
                log.warning("cannot make the node network again: %s", e)

    async def _listen(self, forwarder: DnsForwarder) -> tuple[str, int]:
        """Binds UDP and TCP on one port the kernel picks (the programs redirect both
        protocols' port 53 to it); retries when TCP finds that port taken."""
        host = str(self.network.gateway)
        for _ in range(16):
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: forwarder, local_addr=(host, 0)
            )
            port = int(transport.get_extra_info("sockname")[1])
            try:
                await forwarder.listen_tcp(host, port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                transport.close()
                continue
            return host, port
        raise EgressError(f"no port on {host} was free for both UDP and TCP DNS")

    def _call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the forwarder's loop (asyncio readers are not thread-safe) and waits."""
        loop = self._loop
        assert loop is not None
        if threading.current_thread() is self._thread:
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    @staticmethod
    def _check(mode: str, policy: EgressPolicy) -> None:
        if mode == "host" and policy.host_rules:
            raise UsageError(
                "host rules (--allow-host) need --net egress: in the host's netns the DNS "
                "forwarder cannot tell one task's queries from another's"
            )
        if mode == "host" and policy.published:
            raise UsageError("--publish needs --net egress: a host-mode task has no own address")

    def prepare(
        self,
        mode: Literal["egress", "host"],
        policy: EgressPolicy,
        *,
        on_denial: Callable[[Denial], None] | None = None,
    ) -> TaskEgress:
        """Makes a task's network for `mode`: for `egress` a netns on the bridge; for `host`
        nothing but the BPF programs `TaskEgress.attach` will load. `on_denial` receives this
        task's denials (from its first instruction), besides the service's callback."""
        if mode not in ("egress", "host"):
            raise UsageError(f"network mode {mode!r}: use none, egress or host")
        self._check(mode, policy)
        self.start()
        net = (
            self.network.add_task(uuid.uuid4().hex, publish=policy.published)
            if mode == "egress"
            else None
        )
        return TaskEgress(self, mode, policy, net, on_denial)

    def _attach(
        self, task: TaskEgress, cgroup_dir: str, policy: EgressPolicy, *, adopt: bool = False
    ) -> Egress:
        # Host-mode tasks share the host's addresses, so the forwarder could not tell them
        # apart: their port-53 traffic follows the CIDR rules like any other.
        dns = [self._dns] if task.net is not None and self._dns else []
        pin = None
        if self.pins is not None:
            # Named for the cgroup: the next start finds it from the task's cgroup alone.
            pin = self.pins / f"c{os.stat(cgroup_dir).st_ino}"
            self.pins.mkdir(mode=0o700, exist_ok=True)
        egress = Egress.attach(
            cgroup_dir,
            policy,
            services=self.services,
            dns=dns,
            on_denial=self._on_denial,
            pin=pin,
            adopt=adopt,
            programs=self.programs,
        )
        task.pinned = pin is not None
        if task._on_denial is not None:
            egress.on_denial(task._on_denial)  # before `watch`: no event is read before it
        try:
            self._call(lambda: self._register(task, egress))
        except BaseException:
            if not adopt:
                egress.unpin()
            egress.close()
            raise
        if pin is not None and adopt:
            self._adopted_pins.add(pin.name)
        return egress

    def _register(self, task: TaskEgress, egress: Egress) -> None:
        assert self._loop is not None and self._forwarder is not None
        if task.address is not None:
            self._forwarder.add_task(task.address, egress)
        egress.watch(self._loop)
        # An adopted task's denials from while no daemon ran wait in its ring buffer.
        egress.poll_denials()

    def _teardown(
        self,
        address: str | None,
        egress: Egress | None,
        net: TaskNet | None,
        *,
        later: bool = False,
    ) -> None:
        """Detaches a task's programs, forgets its address in the forwarder, removes its veth
        and netns; with `later` the veth is left to go with its netns (`NodeNetwork.release_task`)
        and the next `_reap` makes sure it went."""
        if egress is not None:
            self._detach(address, egress)
        if net is None:
            return
        if not later:
            self.network.remove_task(net)
            return
        self.network.release_task(net)
        with self._lock:
            if not self._dying:
                self._dying_since = time.monotonic()
            self._dying.append(net.host_veth)

    def _reap(self) -> None:
        """Waits for the released veths to go (`NodeNetwork.reap`)."""
        with self._lock:
            dying, self._dying = self._dying, []
        if dying:
            self.network.reap(dying)

    def _detach(self, address: str | None, egress: Egress, *, leave: bool = False) -> None:
        def run() -> None:
            if address is not None and self._forwarder is not None:
                self._forwarder.remove_task(address)
            egress.poll_denials()  # the last ones still reach the audit log
            end(egress)

        def end(egress: Egress) -> None:
            if leave:
                egress.leave()
            else:
                egress.unpin()
                egress.close()

        if self._loop is None or self._loop.is_closed():
            end(egress)
        else:
            self._call(run)

    def adopt(
        self,
        mode: Literal["egress", "host"],
        policy: EgressPolicy,
        *,
        cgroup_dir: str | os.PathLike[str],
        pid: int,
        on_denial: Callable[[Denial], None] | None = None,
    ) -> TaskEgress:
        """Takes over the network of a task an earlier process of this node left running, its
        init `pid` in `cgroup_dir`: its netns and veth (mode `egress`) and its pinned
        enforcement, brought to `policy` (the task's record), its DNS redirected to this
        process's forwarder, which answers it from now on. Raises `EgressError` when a part is
        gone (the task cannot be re-adopted: kill it). Call `sweep` once every task is
        adopted."""
        if self.pins is None:
            raise EgressError("this network service pins nothing, so it adopts nothing")
        self._check(mode, policy)
        net = self.network.adopt(pid, policy.published) if mode == "egress" else None
        task = TaskEgress(self, mode, policy, net, on_denial)
        try:
            self.start()
            task._egress = self._attach(task, os.fspath(cgroup_dir), policy, adopt=True)
        except BaseException:
            if net is not None:
                self.network.kept.discard(net.host_veth)
            raise
        return task

    def sweep(self) -> None:
        """Removes what earlier processes of this node left and this one did not `adopt`: task
        veths and netns with their published ports, and pinned enforcement. At a node's start,
        after its adoptions and before any task starts."""
        self._swept = True
        self.network.sweep(own=True)
        if self.pins is None or not self.pins.is_dir():
            return
        for pin in self.pins.iterdir():
            if pin.name not in self._adopted_pins and pin.name != PROGRAMS_PIN:
                with contextlib.suppress(AgentnodeError):
                    _native.EgressHandle.remove_pins(pin)
        if self.programs is not None:
            # Tasks that ended while no process ran left their entries; their denials since
            # go to the audit log.
            self.programs.purge()
            self.programs.flush()
        else:
            # No task was adopted: nothing uses the programs pinned by an earlier process.
            with contextlib.suppress(AgentnodeError):
                _native.EgressHandle.remove_pins(self.pins / PROGRAMS_PIN)

    def retire(self, teardown: Callable[[], None]) -> None:
        """Runs an ended task's network `teardown` on a background thread (a netns's removal
        waits for the kernel to let it go): the caller goes on at once. At most
        `RETIRE_BACKLOG` wait; past that the caller closes it itself (and waits for it), so a
        burst of ends cannot pile up kernel objects.
        `close()` finishes every one first; what a killed process left, the next `start`
        sweeps (each veth names its owner)."""
        with self._lock:
            inline = self._loop is None or len(self._retiring) >= RETIRE_BACKLOG
            if not inline:
                self._retiring.append(teardown)
                if self._retirer is None:
                    self._retirer = threading.Thread(
                        target=self._retire_all, name="agentnode-egress-retire", daemon=True
                    )
                    self._retirer.start()
        if inline:
            teardown()
            self._reap()

    def _retire_all(self) -> None:
        while True:
            with self._lock:
                teardown = self._retiring[0] if self._retiring else None
                overdue = self._dying and time.monotonic() - self._dying_since > REAP_AFTER_S
            if teardown is None or overdue:
                try:
                    self._reap()
                except Exception as e:  # the next reap, or the next start's sweep, tries again
                    log.warning("task network teardown failed: %s", e)
                if teardown is None:
                    with self._lock:
                        if not self._retiring:
                            self._retirer = None
                            self._retired.notify_all()
                            return
                continue
            try:
                teardown()
            except Exception as e:  # one failed removal must not stop the rest
                log.warning("task network teardown failed: %s", e)
            with self._lock:
                self._retiring.popleft()

    def wait_retired(self) -> None:
        """Returns once every retired task's teardown has run."""
        with self._lock:
            self._retired.wait_for(lambda: self._retirer is None)

    def close(self) -> None:
        """Finishes the retired tasks' teardown, stops the forwarder, and removes the bridge
        unless another owner still has tasks on it."""
        with self._lock:
            self._retired.wait_for(lambda: self._retirer is None)
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            if loop is None or thread is None:
                if self._swept:
                    # A node that started no network task still removes the bridge and table
                    # an earlier run of it left (killed with -9), when no task is on it.
                    self.network.close()
                return
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self.network.close()
