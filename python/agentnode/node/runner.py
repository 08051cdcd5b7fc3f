"""Turns queued tasks into isolated processes and their ends into durable outcomes.

One `Node` per daemon, used from the event loop's thread only; tasks are spawned on two
long-lived worker threads. Tasks outlive the daemon (a crash, `kill -9`, an upgrade with
`--keep-tasks`) and the next start re-adopts them (`agentnode.node.restore`), with their network
and egress enforcement (pinned under bpffs; `agentnode.egress.service`). Each attempt gets its
own bearer token (`agentnode.tasks.tokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentnode import _native, compute
from agentnode.agents.forkserver import ForkServer
from agentnode.agents.kinds import llm_environment
from agentnode.audit.execs import ExecTrace
from agentnode.audit.log import AuditLog
from agentnode.audit.timeline import entries as timeline_entries
from agentnode.egress.dns import DnsLimits
from agentnode.egress.enforce import Denial
from agentnode.egress.service import EgressService
from agentnode.errors import AgentnodeError, AuditError, TaskError
from agentnode.inference.store import LedgerRow
from agentnode.isolation import ExitReason, Mount, Result, spawn
from agentnode.isolation.task import prepare_workspace
from agentnode.node.beats import BeatLog
from agentnode.node.config import NodeConfig
from agentnode.node.logcap import rotate_if_over
from agentnode.node.restore import (
    Adopted,
    Restorer,
    egress_pins,
    node_id,
    pin_dir,
    release_pins,
)
from agentnode.node.retention import Retention
from agentnode.node.spares import Spares
from agentnode.tasks.manager import Limits as QueueLimits
from agentnode.tasks.manager import TaskManager, lost_at_restart
from agentnode.tasks.model import TERMINAL, State, Task, TaskSpec, cpu_weight_for
from agentnode.tasks.retry import RetryPolicy
from agentnode.tools.registry import Caller
from agentnode.tools.toolbox import Toolbox, caller_for

if TYPE_CHECKING:
    from agentnode.audit.otel import TimelineExporter

__all__ = [
    "CHECKPOINT",
    "INBOX",
    "INBOX_ENV",
    "MCP_SOCKET",
    "MCP_STDIO_SOCKET",
    "MEMORY_SOCKET",
    "SOCKET_DIR",
    "TASK_SOCKET",
    "Node",
    "Running",
]

log = logging.getLogger("agentnode.node")

# A scheduling pass that has not come round for this long is reported as stalled in /healthz:
# a pass waits on at most 64 starts on two spawn threads, which take well under a second each.
_STALL_S = 60.0
# A gap this much longer than the loop's 0.25 s poll between heartbeat checks means the node
# itself was away (SIGSTOP, a stall), not the tasks.
_AWAY_S = 2.0

#: Where a task finds the node's sockets: the daemon's socket directory is bound there (not
#: each socket), so a task re-adopted by a later daemon reaches that daemon's sockets.
SOCKET_DIR = "/run/agentnode/sockets"
#: Where a task finds the node's task API.
TASK_SOCKET = f"{SOCKET_DIR}/task.sock"
#: Where a task finds the node's MCP endpoint (streamable HTTP at /mcp over this socket).
MCP_SOCKET = f"{SOCKET_DIR}/mcp.sock"
#: Where a task finds the node's MCP socket (MCP's stdio framing, the cheap door that
#: `Tools.mcp_client()` takes; `agentnode.tools.mcpsocket`).
MCP_STDIO_SOCKET = f"{SOCKET_DIR}/mcps.sock"
#: Where a task finds the node's memory socket (memory and checkpoint operations in
#: length-prefixed msgpack, the cheap door `agentnode.sdk.Memory` and `ThisTask` take;
#: `agentnode.storage.memsocket`), announced as $AGENTNODE_MEMORY_SOCKET.
MEMORY_SOCKET = f"{SOCKET_DIR}/memory.sock"
#: Where a retried task finds its last checkpoint (read-only; $AGENTNODE_CHECKPOINT).
CHECKPOINT = "/run/agentnode/checkpoint"
#: A task whose environment sets INBOX_ENV to INBOX (an Agent Protocol task's does) finds its
#: inbox there (read-only): what is sent to it while it runs, one JSON object a line.
INBOX_ENV, INBOX = "AGENTNODE_INBOX", "/run/agentnode/inbox"


@dataclass(eq=False)
class Running:
    """A started task: its sandbox and how it is being stopped."""

    task: Task
    proc: Any  # agentnode.isolation.Task
    last_beat: float
    stop_as: State | None = None
    stop_reason: str = ""
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Node:
    """The task lifecycle on this host: admission by capacity, start, watch, stop, retry."""

    def __init__(self, config: NodeConfig, *, task_socket: Path) -> None:
        # A start that fails part way closes what it made (threads, the fork server, pins, a
        # bpffs mount, databases) before it raises; once started, `shutdown` closes them.
        with contextlib.ExitStack() as undo:
            self._open(config, task_socket, undo)
            undo.pop_all()

    def _open(self, config: NodeConfig, task_socket: Path, undo: contextlib.ExitStack) -> None:
        self.config = config
        self.task_socket = task_socket
        self.inventory = compute.inventory(
            reserve_cpu_millis=config.reserve_cpu_millis,
            reserve_memory_bytes=config.reserve_memory_bytes,
        )
        self.spares = Spares(config.data_dir / "logs", config.data_dir / "workspaces")
        undo.callback(self.spares.close)
        #: Python agents are forks of an interpreter that imported the runtime and its SDKs.
        self.forkserver = ForkServer()
        undo.callback(self.forkserver.close)
        #: Settles the tasks an earlier agent left running; None: the kernel cannot record
        #: their exits here, so tasks die with the node agent as they used to.
        self.restorer: Restorer | None = None
        pins: Path | None = None
        try:
            where = pin_dir(config.data_dir)
            self.restorer = Restorer(_native.ExitRecorder(where), node=node_id(config.data_dir))
            pins = egress_pins(where)
        except AgentnodeError as e:
            log.warning("tasks die with the node agent (no live restore): %s", e)
        if self.restorer is not None:
            undo.callback(self._release_pins_unless_watched)
        self.manager = TaskManager(
            config.data_dir / "tasks",
            limits=QueueLimits(
                tenant_queue_cap=config.tenant_queue_cap,
                max_queued=config.max_queued,
                tenant_running=config.tenant_running,
                class_running=config.class_running,
                aging=config.aging,
            ),
            retry=_retry_policy(config),
            resolve=lost_at_restart if self.restorer is None else self.restorer.resolve,
        )
        undo.callback(self.manager.close)
        # Before any start: this sweeps whatever an earlier agent left but the adopted tasks.
        self._adopted: dict[str, Adopted] = {}
        #: Tasks kept running at recovery that could not be taken over after all, with why.
        self._not_adopted: dict[str, str] = {}
        if self.restorer is not None:
            self._adopted, self._not_adopted = self.restorer.adopt(
                {i: self.manager.get(i) for i in self.manager.adopted}
            )
        #: Running tasks' heartbeat times, kept for the next start's re-adopted tasks.
        self.beats = BeatLog(config.data_dir / "beats")
        self.beats.sweep(keep=set(self._adopted))
        self.apply_tenants(config)
        #: Removes ended tasks past their retention, in the background and on `agentnode gc`.
        self.retention = Retention(
            self.manager,
            data_dir=config.data_dir,
            ended_s=config.retention_ended_s,
            failed_s=config.retention_failed_s,
            interval_s=config.retention_interval_s,
        )
        self.running: dict[str, Running] = {}
        self.admitting = True
        self.outcomes: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        # Why the last scheduling pass failed (None: it succeeded), and when a pass last ended.
        self._loop_error: str | None = None
        self._loop_tick = time.monotonic()
        self._beats_checked = time.monotonic()
        self._rotating: set[Path] = set()
        # Sandboxes start on long-lived threads, off the event loop (the native spawn releases
        # the GIL while the child sets up), two at a time. Long-lived because a task's
        # PDEATHSIG fires when the thread that cloned it (this one, or the zygote pool's) exits.
        self._spawner = ThreadPoolExecutor(2, thread_name_prefix="agentnode-spawn")
        undo.callback(self._spawner.shutdown)
        # Tasks with network egress share one bridge and DNS forwarder, made on first use.
        self.egress = EgressService(
            bridge=config.bridge,
            subnet=config.subnet,
            dns_upstream=config.dns_upstream,
            dns_limits=DnsLimits.configured(
                rate=config.dns_rate,
                max_label=config.dns_max_label,
                max_name=config.dns_max_name,
                extra_types=config.dns_types,
            ),
            # The node's tasks' veths are the node's, and their enforcement pinned: they
            # outlive this process with the tasks (None: no live restore, they die with it).
            node=node_id(config.data_dir),
            pins=pins,
        )
        undo.callback(self.egress.close)
        #: Where tasks with network egress reach the inference proxy (None: not started).
        self.inference_url: str | None = None
        if config.inference is not None:
            gateway = str(self.egress.network.gateway)
            self.egress.services = ((gateway, config.inference.port),)
            self.inference_url = f"http://{gateway}:{config.inference.port}"
        #: Where egress tasks reach the MCP endpoint over TCP (None: the socket only).
        self.mcp_url: str | None = None
        if config.tools.mcp_port is not None:
            gateway = str(self.egress.network.gateway)
            self.egress.services = (*self.egress.services, (gateway, config.tools.mcp_port))
            self.mcp_url = f"http://{gateway}:{config.tools.mcp_port}/mcp"
        self.mcp_socket = task_socket.with_name("mcp.sock")
        self.mcp_stdio_socket = task_socket.with_name("mcps.sock")
        self.memory_socket = task_socket.with_name("memory.sock")
        #: The hash-chained audit log: transitions, execs, egress denials, LLM calls, tool
        #: calls. `audit.append(record)` takes any record with a `kind` from any thread.
        self.audit = AuditLog(config.data_dir / "audit")
        undo.callback(self.audit.close)
        self._adopt_networks()
        #: What this start found of the last run: tasks re-adopted, and tasks lost (ended
        #: unrecorded, or not re-adopted after all).
        self.restored = (
            len(self._adopted),
            len(self.manager.recovered_lost) + len(self._not_adopted),
        )
        #: Layer 5: the tools tasks call (through the MCP endpoint, the API or the SDK); each
        #: call's record goes to the audit log.
        self.tools = Toolbox(
            config.tools,
            data_dir=config.data_dir,
            node_network=self.egress,
            on_record=self.audit.append,
            held_back=lambda: self.audit.stuck,
        )
        self.execs: ExecTrace | None = None
        self.telemetry: TimelineExporter | None = None
        if config.otlp_endpoint is not None:
            from agentnode.audit.otel import TimelineExporter

            self.telemetry = TimelineExporter(config.otlp_endpoint, timeline=self._timeline)
            undo.callback(self.telemetry.close)
        #: Called with each started task and the seconds it waited in the queue (metrics).
        self.on_start: Callable[[Task, float], None] = lambda task, waited: None
        for task_id in self.manager.recovered_lost:
            self._publish(self.manager.get(task_id))

    def _release_pins_unless_watched(self) -> None:
        """A node that cannot start leaves no pins, unless a task it watched may still run."""
        assert self.restorer is not None
        if not self.restorer.recorder.watched():
            with contextlib.suppress(AgentnodeError, OSError):
                release_pins(self.config.data_dir)

    def _adopt_networks(self) -> None:
        """Takes over the re-adopted tasks' networks and egress enforcement (their denials
        while no agent ran reach the audit log now), kills those whose network is gone, and
        sweeps what the earlier agents left besides."""
        for task_id, proc in list(self._adopted.items()):
            task = self.manager.get(task_id)
            mode, policy = task.spec.sandbox.egress()
            cgroup = proc.cgroup_dir
            if policy is None or cgroup is None:
                continue
            try:
                proc.net = self.egress.adopt(
                    "egress" if mode == "egress" else "host",
                    policy,
                    cgroup_dir=cgroup,
                    pid=proc.pid,
                    on_denial=functools.partial(self._audit_denial, task),
                )
            except (AgentnodeError, OSError) as e:
                if proc.exited():
                    # It ended since it was found running (its netns went with it): its outcome
                    # is the kernel's record, read by its watcher; the sweep takes the rest.
                    continue
                proc.close()  # kills it: never a task without its policy
                del self._adopted[task_id]
                self._not_adopted[task_id] = f"not re-adopted: its network: {e}"
        try:
            self.egress.sweep()  # what a node killed with -9 left behind
        except AgentnodeError as e:
            # Tasks without network still run; those with it will fail to start, saying why.
            log.warning("cannot sweep task networks: %s", e)

    # -- configuration ---------------------------------------------------------------------------

    def apply_tenants(self, config: NodeConfig) -> None:
        """Sets tenants' weights and running limits (at start and on SIGHUP)."""
        for name, tenant in config.tenants.items():
            self.manager.scheduler.set_tenant(
                name, weight=tenant.weight, limit=tenant.running or None
            )

    def reload(self, config: NodeConfig) -> None:
        """Applies what can change while running: tenants, retry policy, grace, retention
        times (the interval applies from the next sweep on)."""
        self.apply_tenants(config)
        self.manager.retry = _retry_policy(config)
        self.retention.ended_s = config.retention_ended_s
        self.retention.failed_s = config.retention_failed_s
        self.retention.interval_s = config.retention_interval_s
        self.config = config
        self._wake.set()

    # -- capacity --------------------------------------------------------------------------------

    def free(self) -> tuple[int, int]:
        """Allocatable CPU millicores and memory bytes not requested by running tasks."""
        cpu = self.inventory.allocatable_cpu_millis
        mem = self.inventory.allocatable_memory_bytes
        for r in self.running.values():
            cpu -= r.task.spec.cpu_millis
            mem -= r.task.spec.memory_bytes
        return max(cpu, 0), max(mem, 0)

    def _audit_denial(self, task: Task, d: Denial) -> None:
        # On the forwarder's thread; one record per denied connection or packet.
        record = {
            "kind": "egress_denied",
            "task": task.id,
            "tenant": task.spec.tenant,
            "address": str(d.address),
            "port": d.port,
            "protocol": d.protocol,
            "reason": d.reason,
            "pid": d.pid,
            **({"name": d.name} if d.name else {}),
        }
        self.audit.append(record)

    def _timeline(self, task_id: str) -> list[dict[str, Any]]:
        self.audit.flush()
        return timeline_entries(self.audit, task_id)

    def audit_llm_call(self, row: LedgerRow) -> None:
        """Writes one inference ledger row to the audit log (the proxy's `on_row`)."""
        record = {"kind": "llm_call"} | {f: getattr(row, f) for f in row.__slots__}
        try:
            self.audit.append(record)
        except AuditError as e:
            # A request that ends while the node stops: the proxy's ledger still has the row.
            log.error("LLM call not in the audit log (%s): %s", e, record)

    # -- events ----------------------------------------------------------------------------------

    def _publish(self, task: Task) -> None:
        event = {
            "id": task.id,
            "state": task.state.value,
            "attempt": task.attempt,
            "tenant": task.spec.tenant,
            "reason": task.reason,
            "at": time.time(),
        }
        self.audit.append(
            {
                "kind": "state",
                "time": event["at"],
                "task": task.id,
                "tenant": task.spec.tenant,
                "state": task.state.value,
                "attempt": task.attempt,
                "reason": task.reason,
            }
        )
        if self.telemetry is not None and task.state in TERMINAL:
            self.telemetry.task_ended(task.id)
        for q in self._subscribers:
            q.put_nowait(event)

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        """A queue of every transition from now on, while the context is open; None when the
        node stops."""
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    # -- lifecycle -------------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> Task:
        """Queues a task durably (raises QueueFullError at a cap, TaskError on bad specs)."""
        task, _ = await self.submit_once(spec)
        return task

    async def submit_once(
        self, spec: TaskSpec, *, key: tuple[str, str] | None = None
    ) -> tuple[Task, bool]:
        """`submit`, under an idempotency key (key, request digest) if one is given: (the task,
        whether it is new). See `TaskManager.submit_once`."""
        if not self.admitting:
            raise TaskError("the node is shutting down and admits no new tasks (retry later)")
        if key is None:
            task, _ = await self.manager.submit(spec)
            created = True
        else:
            task, created = await self.manager.submit_once(spec, key=key[0], digest=key[1])
        if created:
            self._publish(task)
            self._wake.set()
        return task, created

    async def cancel(self, task_id: str) -> Task:
        """Cancels a queued task, or stops a running one (SIGTERM, grace, kill)."""
        task = self.manager.get(task_id)
        if task.state is State.QUEUED:
            done = await self.manager.cancel(task_id)
            self._publish(done)
            return done
        r = self.running.get(task_id)
        if r is None:
            raise TaskError(f"task {task_id} is {task.state}, it cannot be cancelled")
        self._stop(r, State.CANCELLED, "cancelled by request")
        return task

    async def update_egress(self, task_id: str, rules: dict[str, Any]) -> Task:
        """Replaces a task's egress rules and rates: live when it runs (its next connection
        follows them), and in its record for a later start or retry."""
        task = self.manager.get(task_id)
        spec = replace(task.spec, sandbox=replace(task.spec.sandbox, **rules))  # names a bad rule
        r = self.running.get(task_id)
        if r is not None and r.proc.egress is not None:
            await self._apply_egress(r, spec)
        return await self.manager.set_egress(task_id, **rules)

    async def _apply_egress(self, r: Running, spec: TaskSpec) -> None:
        _, policy = spec.sandbox.egress()
        assert policy is not None
        try:
            await asyncio.to_thread(r.proc.update_egress, policy)
        except AgentnodeError as e:
            raise TaskError(f"cannot update task {r.task.id}'s egress: {e}") from None

    def heartbeat(self, task_id: str) -> None:
        r = self.running.get(task_id)
        if r is None:
            raise TaskError(f"task {task_id} is not running (heartbeats come from running tasks)")
        r.last_beat = time.monotonic()
        if r.task.spec.heartbeat_s is not None:
            self.beats.beat(task_id)

    def start(self) -> None:
        if self.config.exec_trace:
            try:
                self.execs = ExecTrace.for_instance(sink=self.audit.append)
            except AgentnodeError as e:
                log.warning("exec tracing is off: %s", e)
                self.audit.append({"kind": "exec_trace_off", "reason": str(e)})
            else:
                self.execs.start()
        now = time.monotonic()
        # Heartbeats are judged from now: the time since this node was made was its own.
        self._beats_checked = now
        for task_id, proc in self._adopted.items():
            # Its heartbeat deadline goes on from where the earlier agent last judged it.
            last_beat = now - self.beats.missed_s(task_id)
            r = Running(task=self.manager.get(task_id), proc=proc, last_beat=last_beat)
            self.running[task_id] = r
            if self.execs is not None and proc.cgroup_dir is not None:
                self.execs.watch(proc.cgroup_dir, task=task_id, tenant=r.task.spec.tenant)
            r.watcher = asyncio.get_running_loop().create_task(self._watch(r))
            log.info("re-adopted task %s (pid %d)", task_id, proc.pid)
        self._adopted = {}
        for task_id, reason in self._not_adopted.items():
            asyncio.get_running_loop().create_task(self._record_lost(task_id, reason))
        self._not_adopted = {}
        self._loop_task = asyncio.get_running_loop().create_task(self._schedule_loop())
        self.retention.start()

    def health(self) -> dict[str, str]:
        """Each part's state for /healthz: `ok`, or `failing: <why>`."""
        full = self.manager.store.disk_full
        return {
            "scheduler": self.scheduler_health(),
            "store": f"failing: {full}" if full else "ok",
            "audit": self.audit.health(),
        }

    def scheduler_health(self) -> str:
        """`ok`, or what keeps the scheduling loop from starting tasks (for /healthz)."""
        loop = self._loop_task
        if loop is not None and loop.done() and self.admitting:
            return "failing: the scheduling loop has ended (restart the node)"
        stalled = time.monotonic() - self._loop_tick
        if loop is not None and stalled > _STALL_S:
            return f"failing: no scheduling pass for {stalled:.0f} s"
        return self._loop_error or "ok"

    async def _schedule_loop(self) -> None:
        # A flag rather than Task.cancel(): on Python 3.11, wait_for can swallow a cancel that
        # races with the event it waits on, and the loop would never end.
        while self.admitting:
            self._wake.clear()
            # Whatever one pass hits (a store that cannot write, a bug), the loop lives on:
            # /healthz says why, and the next pass tries again. Starts failing does not stop
            # the running tasks' heartbeats and logs from being watched.
            error: Exception | None = None
            try:
                await self._start_ready()
            except Exception as e:
                error = e
            try:
                self._check_heartbeats()
                self._cap_logs()
            except Exception as e:
                error = error or e
            was = self._loop_error
            self._loop_error = None if error is None else f"failing: {_describe(error)}"
            if self._loop_error is not None and self._loop_error != was:
                log.error("scheduling %s", self._loop_error)  # once, not every 0.25 s
            elif was is not None and self._loop_error is None:
                log.warning("scheduling works again (it was %s)", was)
            self._loop_tick = time.monotonic()
            # Wake for submits and ends at once; poll for backoffs and heartbeats.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.25)

    async def _start_ready(self) -> None:
        cpu, mem = self.free()
        ready = await self.manager.next_tasks(64, free_cpu_millis=cpu, free_memory_bytes=mem)
        await asyncio.gather(*(self._start(task) for task in ready))

    async def _start(self, task: Task) -> None:
        """Starts `task`; anything that goes wrong fails this task alone, with the reason."""
        try:
            await self._launch(task)
        except Exception as e:
            await self._fail_start(task, e)

    async def _launch(self, task: Task) -> None:
        self._publish(task)
        proc = await asyncio.get_running_loop().run_in_executor(self._spawner, self._spawn, task)
        # Its end's network teardown (BPF detach, veth and netns removal: `ip` runs, tens of
        # ms) goes to the egress service's thread, not this loop, which records the end and
        # frees its reservation at once.
        proc.close_network_later()
        if self.execs is not None and proc.cgroup_dir is not None:
            self.execs.watch(proc.cgroup_dir, task=task.id, tenant=task.spec.tenant)
        now = time.monotonic()
        r = Running(task=task, proc=proc, last_beat=now)
        self.running[task.id] = r
        if task.spec.heartbeat_s is not None:
            self.beats.beat(task.id)
        process = None
        # The launcher read an outliving task's start time on the spawning thread (None: not
        # one, or its init is gone already).
        ticks = proc.start_ticks
        if ticks is not None and self.restorer is not None:
            # Watched before it is recorded: a record names only processes whose exit the
            # kernel records, for the next start to read.
            self.restorer.recorder.watch(proc.pid, ticks)
            process = (proc.pid, ticks)
        r.task = await self.manager.mark_running(task.id, process=process)
        if r.task.spec != task.spec and proc.egress is not None:
            # Its rules changed while its sandbox was being made.
            with contextlib.suppress(TaskError):
                await self._apply_egress(r, r.task.spec)
        self.on_start(task, time.time() - _queued_at(task))
        self._publish(r.task)
        self.spares.refill()
        r.watcher = asyncio.get_running_loop().create_task(self._watch(r))

    async def _record_lost(self, task_id: str, reason: str) -> None:
        try:
            done = await self.manager.finish(task_id, State.LOST, reason=reason)
        except Exception as e:
            log.error("cannot record task %s as lost: %s", task_id, _describe(e))
            return
        self._publish(done)
        self._wake.set()

    async def _fail_start(self, task: Task, error: Exception) -> None:
        """Records a task that could not be started as failed (its sandbox, if one was made,
        is killed first); a store that cannot record it leaves it for the next pass or start."""
        r = self.running.pop(task.id, None)
        if task.spec.heartbeat_s is not None:
            self.beats.ended(task.id)
        if r is not None:
            with contextlib.suppress(Exception):
                r.proc.send_kill()
                await r.proc.wait_async()
            with contextlib.suppress(Exception):
                r.proc.close()
        with contextlib.suppress(Exception):
            self.spares.refill()
        reason = f"did not start: {_describe(error)}"
        if not isinstance(error, AgentnodeError):
            log.error("task %s %s", task.id, reason)
        try:
            done = await self.manager.finish(task.id, State.FAILED, reason=reason)
        except Exception as e:
            self._loop_error = f"failing: cannot record task {task.id} as failed: {_describe(e)}"
            log.error("%s", self._loop_error)
            return
        self.outcomes["failed"] = self.outcomes.get("failed", 0) + 1
        self._publish(done)

    def _spawn(self, task: Task) -> Any:
        sandbox = task.spec.sandbox
        log_path = self.log_path(task.id, task.attempt)
        env = dict(sandbox.env)
        env.update(
            AGENTNODE_TASK_ID=task.id,
            AGENTNODE_TOKEN=self.manager.token_for(task),
            AGENTNODE_URL=f"unix://{TASK_SOCKET}",
            AGENTNODE_MCP_SOCKET=MCP_SOCKET,
            AGENTNODE_MCP_STDIO_SOCKET=MCP_STDIO_SOCKET,
            AGENTNODE_MEMORY_SOCKET=MEMORY_SOCKET,
            AGENTNODE_MCP_URL=(
                self.mcp_url
                if self.mcp_url is not None and sandbox.network != "none"
                else "http://agentnode/mcp"
            ),
        )
        if self.inference_url is not None and sandbox.network != "none":
            # The official SDKs read these: agent code reaches the proxy, billed to this task.
            for key, value in llm_environment(self.inference_url, env["AGENTNODE_TOKEN"]).items():
                env.setdefault(key, value)
        checkpoint = self.manager.store.checkpoint_file(task.id)
        mounts = []
        if checkpoint is not None:
            # A fixed path inside: the host path may be hidden (e.g. under the task's own /tmp).
            env["AGENTNODE_CHECKPOINT"] = CHECKPOINT
            mounts.append(Mount(os.path.abspath(checkpoint), CHECKPOINT))
        if env.get(INBOX_ENV) == INBOX:
            inbox = self.manager.store.open_inbox(task.id)
            mounts.append(Mount(os.path.abspath(inbox), INBOX))
        # Read-only: connecting to a socket is not a write to its file system, and the task
        # can add nothing to the node's directory.
        mounts.append(Mount(os.path.abspath(self.task_socket.parent), SOCKET_DIR))
        limits = sandbox.limits
        if limits.cpu_weight is None:
            # What it reserved is what it gets when CPUs are short (a limit above it is a burst).
            limits = replace(limits, cpu_weight=cpu_weight_for(task.spec.cpu_millis / 1000))
        sandbox = replace(
            sandbox, env=tuple(env.items()), mounts=(*mounts, *sandbox.mounts), limits=limits
        )
        command = list(task.spec.command)
        fork = task.spec.agent == "python" and self.forkserver.serves(command, sandbox)
        # A forked agent's task starts as the fork server's stub, which waits on this pipe.
        go = os.pipe2(os.O_CLOEXEC) if fork else None
        fd = self.spares.open_log(log_path)
        try:
            proc = spawn(
                [*self.forkserver.stub, *command] if fork else command,
                sandbox,
                node_network=self.egress,
                on_denial=functools.partial(self._audit_denial, task),
                workspace=prepare_workspace(
                    self.spares.make_workspace(self.config.data_dir / "workspaces" / task.id),
                    sandbox,
                ),
                stdin="null" if go is None else go[0],
                stdout=fd,
                stderr=fd,
                outlive=self._outlives(task),
            )
            if go is not None:
                with contextlib.suppress(OSError):  # then the stub says the server is gone
                    self.forkserver.join(pid=proc.pid, pidfd=proc.pidfd, argv=command,
                                         sandbox=sandbox, stdout=fd, stderr=fd, go=go[1])  # fmt: skip
            return proc
        finally:
            os.close(fd)
            for end in go or ():
                os.close(end)

    def _outlives(self, task: Task) -> bool:
        """Whether `task` runs on when the node agent goes: when the kernel records its exit
        and (with network egress) its enforcement is pinned, to hold with no agent."""
        return self.restorer is not None and (
            task.spec.sandbox.network == "none" or self.egress.pins is not None
        )

    def task_caller(self, task_id: str) -> Caller:
        """The tool caller a task's own token is (TaskError: no such task): its calls end with
        the task, as its token does."""
        return caller_for(
            self.manager.get(task_id),
            self.config.data_dir / "workspaces",
            alive=functools.partial(self._alive, task_id),
        )

    def _alive(self, task_id: str) -> bool:
        """Running, or still starting (its process may call before the start is recorded);
        from its end on, not, though its token lives until the end is recorded."""
        if task_id in self.running:
            return True
        try:
            return self.manager.get(task_id).state is State.STARTING
        except TaskError:
            return False

    def log_path(self, task_id: str, attempt: int) -> Path:
        return self.config.data_dir / "logs" / f"{task_id}.{attempt}.log"

    async def _watch(self, r: Running) -> None:
        result: Result = await r.proc.wait_async()
        if self.execs is not None:
            self.execs.forget(r.task.id)
        r.proc.close()
        if r.task.process is not None and self.restorer is not None:
            with contextlib.suppress(AgentnodeError):
                self.restorer.recorder.forget(r.task.process[0])
        outcome, reason = _outcome(r, result)
        if result.reason in (ExitReason.OOM, ExitReason.PIDS):
            self.audit.append(
                {
                    "kind": "oom" if result.reason is ExitReason.OOM else "pids_limit",
                    "task": r.task.id,
                    "tenant": r.task.spec.tenant,
                    "limit": r.task.spec.memory_bytes
                    if result.reason is ExitReason.OOM
                    else r.task.spec.sandbox.limits.pids,
                }
            )
        del self.running[r.task.id]
        if r.task.spec.heartbeat_s is not None:  # only those have a time in `beats`
            self.beats.ended(r.task.id)
        self.tools.end_task(r.task.id)
        try:
            done = await self.manager.finish(
                r.task.id, outcome, reason=reason, exit_code=result.exit_status
            )
        except Exception as e:
            # Not recorded: the next start finds it starting or running and records it lost.
            self._loop_error = f"failing: cannot record task {r.task.id}'s end: {_describe(e)}"
            log.error("%s", self._loop_error)
            return
        self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1
        self._publish(done)
        self._wake.set()

    def _stop(self, r: Running, as_state: State, reason: str) -> None:
        if r.stop_as is not None:
            return
        r.stop_as, r.stop_reason = as_state, reason
        with contextlib.suppress(AgentnodeError, ProcessLookupError):
            r.proc.signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(self.config.grace_s, self._kill_if_alive, r)

    def _kill_if_alive(self, r: Running) -> None:
        if r.proc.result is None and self.running.get(r.task.id) is r:
            # cgroup.kill without reaping: the watcher's pidfd wakes and it reaps and records.
            with contextlib.suppress(AgentnodeError):
                r.proc.send_kill()

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        gap, self._beats_checked = now - self._beats_checked, now
        if gap > _AWAY_S:
            # The node itself did not run (stopped, or stalled): the heartbeats sent meanwhile
            # still wait in their sockets, to be read in the next turns. No task is judged for
            # the time the node was away.
            for r in self.running.values():
                r.last_beat += gap
            return
        judged = [r for r in self.running.values() if r.task.spec.heartbeat_s is not None]
        if not judged:
            return  # no file write per pass while no task has a heartbeat deadline
        self.beats.checked()
        for r in judged:
            beat = r.task.spec.heartbeat_s
            if beat is not None and now - r.last_beat > beat and r.stop_as is None:
                self._stop(r, State.TIMED_OUT, f"no heartbeat for {beat:g} s")

    def _cap_logs(self) -> None:
        """Rotates running tasks' logs that passed `log_max_bytes`, on a thread, one at a time
        per log (a stat per running task per pass; the copy is the thread's)."""
        limit = self.config.log_max_bytes
        if not limit:
            return
        for r in self.running.values():
            path = self.log_path(r.task.id, r.task.attempt)
            if path in self._rotating:
                continue
            try:
                if path.stat().st_size <= limit:
                    continue
            except FileNotFoundError:
                continue
            self._rotating.add(path)
            job = asyncio.get_running_loop().run_in_executor(None, rotate_if_over, path, limit)
            job.add_done_callback(functools.partial(self._rotated, path))

    def _rotated(self, path: Path, job: asyncio.Future[bool]) -> None:
        self._rotating.discard(path)
        error = None if job.cancelled() else job.exception()
        if error is not None:
            log.error("cannot rotate %s: %s", path, _describe(error))

    async def shutdown(self) -> None:
        """Stops admitting, stops every running task with the configured grace, waits for them
        to be recorded, and closes the store; they retry at the next start. With `keep_tasks`,
        the tasks that can outlive the agent run on instead, for the next start to re-adopt."""
        self.admitting = False
        await self.retention.close()
        if self._loop_task is not None:
            self._wake.set()
            await self._loop_task  # ends after the start it may be in the middle of
        kept = 0
        for r in list(self.running.values()):
            if self.config.keep_tasks and r.task.process is not None and r.proc.result is None:
                if r.watcher is not None:
                    r.watcher.cancel()
                    await asyncio.gather(r.watcher, return_exceptions=True)
                r.proc.leave()
                del self.running[r.task.id]
                kept += 1
                continue
            self._stop(r, State.LOST, "the node agent stopped")
        watchers = [r.watcher for r in self.running.values() if r.watcher is not None]
        if watchers:
            await asyncio.gather(*watchers, return_exceptions=True)
        if not kept and self.restorer is not None:
            # Nothing outlives this agent: its pins go (and its bpffs, when it mounted one).
            with contextlib.suppress(AgentnodeError, OSError):
                release_pins(self.config.data_dir)
        self._spawner.shutdown(wait=True)
        await self.tools.close()
        await asyncio.to_thread(self.spares.close)
        await asyncio.to_thread(self.forkserver.close)
        await asyncio.to_thread(self.egress.close)
        if self.execs is not None:
            self.execs.close()
        for q in self._subscribers:
            q.put_nowait(None)
        self.manager.close()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.close)
        await asyncio.to_thread(self.audit.close)


def _describe(e: BaseException) -> str:
    """One line for an error: our own errors say what to do; anything else is named by type,
    since it is a bug or an input no check caught."""
    if isinstance(e, AgentnodeError):
        return str(e)
    text = " ".join(str(e).split())
    return f"internal error: {type(e).__name__}" + (f": {text}" if text else "")


def _outcome(r: Running, result: Result) -> tuple[State, str]:
    if r.stop_as is not None:
        return r.stop_as, r.stop_reason
    if result.reason is ExitReason.TIMEOUT:
        return State.TIMED_OUT, f"ran past its {r.task.spec.timeout_s:g} s timeout"
    if result.reason is ExitReason.OOM:
        return State.FAILED, "killed for running out of memory"
    if result.reason is ExitReason.PIDS:
        return State.FAILED, "failed at its pids limit"
    if result.signal is not None:
        return State.FAILED, f"killed by signal {result.signal}"
    if result.code == 0:
        return State.SUCCEEDED, ""
    return State.FAILED, f"exited with code {result.code}"


def _queued_at(task: Task) -> float:
    """When the task last entered the queue (its submit, or its retry's backoff end)."""
    queued = max(at for state, at in task.history if state == State.QUEUED.value)
    return max(queued, task.not_before)


def _retry_policy(config: NodeConfig) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=config.retry_max_attempts,
        base_s=config.retry_base_s,
        max_s=max(config.retry_max_s, config.retry_base_s),
    )
