"""`agentnode run`: the node daemon in the foreground, on uvloop.

SIGTERM or SIGINT: stop admitting, give running tasks the configured grace (SIGTERM, then the
cgroup is killed), record them as lost (they retry at the next start), close the stores; with
`--keep-tasks` (node.keep_tasks) the tasks run on instead, for the next start to re-adopt
(docs/node.md, "Live restore"). SIGKILL or a crash leaves them running too. SIGHUP: re-read the config file and apply tenants, retry policy and grace.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from agentnode import doctor
from agentnode.errors import AgentnodeError, ConfigError
from agentnode.node.config import NodeConfig, load_config
from agentnode.node.paths import ADMIN_MEMORY
from agentnode.unixsock import listen_unix

# How much of the vector op log a crash can leave to replay: a checkpoint of a 100k x 384
# collection writes ~170 MiB, so not much more often than this.
_VECTOR_CHECKPOINT_SECONDS = 300.0

if TYPE_CHECKING:
    from aiohttp import web
    from starlette.types import ASGIApp

    from agentnode.cli import ArgumentParser
    from agentnode.node.runner import Node
    from agentnode.tools.endpoint import MCPEndpoint
    from agentnode.tools.mcpsocket import MCPSocket
    from agentnode.tools.registry import Caller

__all__ = ["add_parser", "serve"]


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Adds `run` to the CLI."""
    p = sub.add_parser(
        "run",
        description="Run the node daemon: the task API on a unix socket, the scheduler, "
        "isolated tasks and agent memory, with embedded defaults.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="agentnode.toml (default: none)")
    p.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="state (default /var/lib/agentnode)"
    )
    p.add_argument(
        "--socket", type=Path, metavar="PATH", help="API socket (default /run/agentnode/api.sock)"
    )
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="also serve the API on TCP (needs api_token)"
    )
    p.add_argument(
        "--keep-tasks",
        action="store_true",
        default=None,
        help="on SIGTERM, leave running tasks running for the next start to re-adopt (upgrades)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.own_process:
        from agentnode.logs import configure

        configure(debug=args.debug)
        _raise_nofile()
    config = load_config(
        args.config,
        data_dir=args.data_dir,
        socket=args.socket,
        listen=args.listen,
        keep_tasks=args.keep_tasks,
    )
    import uvloop

    uvloop.run(serve(config))
    return 0


def _raise_nofile() -> None:
    """Takes the hard limit on open files as the soft one (systemd's default soft limit is
    1024): every task holds some of the daemon's descriptors (its pidfd, log, sockets)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _unix_site(
    runner: web.AppRunner, path: Path, mode: int, group: str | None, *, tasks: bool = False
) -> None:
    """Serves `runner` at `path`; `tasks`: a door into tasks, capped per task."""
    from aiohttp import web

    from agentnode.http_common import CappedSockSite
    from agentnode.peercap import PeerCap

    sock = listen_unix(path, mode=mode)
    if tasks:
        await CappedSockSite(runner, sock, PeerCap(f"task API {path}")).start()
    else:
        await web.SockSite(runner, sock).start()
    if group is not None:
        with contextlib.suppress(KeyError):
            os.chown(path, -1, grp.getgrnam(group).gr_gid)


async def serve(config: NodeConfig) -> None:
    """Runs the node until SIGTERM/SIGINT; SIGHUP reloads `config.source`."""
    # asyncio here and below, not at the top: the CLI imports this module for --help.
    import asyncio

    from aiohttp import web

    from agentnode.http_common import SERVER_LOG
    from agentnode.inference.server import create_app
    from agentnode.isolation import USERNS_BASE, use_data_dir
    from agentnode.node.api import (
        TaskTokens,
        admin_app,
        task_app,
        task_attribution,
        task_operations,
    )
    from agentnode.node.metrics import NodeMetrics
    from agentnode.node.runner import Node
    from agentnode.storage.api import make_app
    from agentnode.storage.episodic import EpisodicStore
    from agentnode.storage.memsocket import MemorySocket
    from agentnode.storage.objects import ObjectStore
    from agentnode.storage.operations import episodic_operations
    from agentnode.storage.tenancy import OperatorTenants
    from agentnode.storage.vector_api import vectors_app
    from agentnode.storage.vectors import VectorStore

    if config.listen is not None and not config.api_token:
        raise ConfigError("node.listen needs node.api_token (the TCP API requires a bearer token)")
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _guard(config.data_dir)
    lock = _lock(config.data_dir)
    use_data_dir(config.data_dir)
    run_dir = config.data_dir / "run"
    node = Node(config, task_socket=run_dir / "sockets" / "task.sock")
    # From here on, whatever fails closes what was made: the node's pins, mounts and
    # threads, the databases (a start that fails leaves nothing behind).
    episodic: EpisodicStore | None = None
    objects: ObjectStore | None = None
    vectors: VectorStore | None = None
    memory_socket: MemorySocket | None = None
    runners: list[web.AppRunner] = []
    mcp: tuple[MCPEndpoint, MCPSocket] | tuple[()] = ()
    try:
        metrics = NodeMetrics(node)
        episodic = EpisodicStore(config.data_dir / "memory" / "episodic")
        objects = ObjectStore(config.data_dir / "memory" / "objects")
        vectors = VectorStore(config.data_dir / "memory" / "vectors")
        memory = make_app(
            episodic=episodic, objects=objects, auth=TaskTokens(node), vectors=vectors_app(vectors)
        )
        admin = admin_app(node, metrics)
        # The operator's view of every tenant's memory, on the admin unix socket only (its mode
        # is the credential; the TCP API below has none of it).
        admin.add_subapp(
            ADMIN_MEMORY,
            make_app(
                episodic=episodic,
                objects=objects,
                auth=OperatorTenants(),
                vectors=vectors_app(vectors),
            ),
        )
        runners = [_runner(admin), _runner(task_app(node, memory))]
        if config.listen is not None:
            runners.append(_runner(admin_app(node, metrics, token=config.api_token)))
        proxy = None
        # The cheap door to the same memory operations and the task's checkpoint, for tasks.
        memory_socket = MemorySocket(
            episodic_operations(episodic) | task_operations(node),
            TaskTokens(node).authenticate,
            path=node.memory_socket,
        )
        if config.inference is not None:
            # Cancelling handlers is how a client's disconnect reaches the upstream request.
            proxy = web.AppRunner(
                create_app(
                    config.inference,
                    attribution=task_attribution(node),
                    require_credential=True,
                    on_row=node.audit_llm_call,
                ),
                handle_signals=False,
                handler_cancellation=True,
                shutdown_timeout=5.0,
                access_log=None,
                logger=SERVER_LOG,
            )
            runners.append(proxy)
        for r in runners:
            await r.setup()
        await _unix_site(runners[0], config.socket, 0o660, "agentnode")
        # Tasks run as any user, so the socket itself is open to all; the run directory admits
        # only root and the group a user-namespaced task's root maps to (its sandbox binds the
        # socket directory in as that identity), so on the host no one else reaches it. The
        # socket directory, bound into every task, holds the task and MCP sockets only and is
        # open to all (a task's own user must pass it); it is kept across restarts, so a task
        # re-adopted later reaches the new daemon's sockets by the same names. The task API
        # itself admits only the token of a running task.
        run_dir.mkdir(mode=0o710, parents=True, exist_ok=True)
        os.chown(run_dir, 0, USERNS_BASE)
        run_dir.chmod(0o710)
        socket_dir = node.task_socket.parent
        socket_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(socket_dir, 0, 0)
        socket_dir.chmod(0o755)
        await _unix_site(runners[1], node.task_socket, 0o666, None, tasks=True)
        await memory_socket.start()
        where = [f"unix:{config.socket}", f"memory unix:{node.memory_socket}"]
        if config.listen is not None:
            host, _, port = config.listen.rpartition(":")
            await web.TCPSite(runners[2], host or "127.0.0.1", int(port)).start()
            where.append(f"http://{config.listen} (bearer token)")
        if proxy is not None:
            where.append(await _serve_inference(proxy, node))
        mcp = await _serve_mcp(node)
        where.append(f"mcp unix:{node.mcp_socket}, unix:{node.mcp_stdio_socket}"
                     + (f", {node.mcp_url}" if node.mcp_url else ""))  # fmt: skip
        episodic.start_sweeper(60.0)
        vectors.start_checkpointer(_VECTOR_CHECKPOINT_SECONDS)
        node.start()
        inv = node.inventory
        print(f"agentnode: listening on {', '.join(where)}", flush=True)
        print(
            f"agentnode: capacity {inv.allocatable_cpu_millis / 1000:g} CPUs, "
            f"{inv.allocatable_memory_bytes >> 20} MiB allocatable, {len(inv.gpus)} GPUs; "
            f"{node.manager.queued_count()} queued, {node.restored[1]} lost in the last run, "
            f"{node.restored[0]} re-adopted; state in {config.data_dir}",
            flush=True,
        )
        print(
            f"agentnode: doctor: {doctor.verdict(await asyncio.to_thread(doctor.report))}",
            flush=True,
        )
        await _wait_for_stop(node, config)
    finally:
        for door in mcp:
            await door.stop()
        # After the tasks' grace: a task stopping may still save its checkpoint.
        await node.shutdown()
        if memory_socket is not None:
            await memory_socket.stop()
        for r in runners:
            await r.cleanup()
        for store in (episodic, objects, vectors):
            if store is not None:
                store.close()
        for path in (config.socket, node.task_socket, node.mcp_socket, node.mcp_stdio_socket,
                     node.memory_socket):  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(lock)
    print("agentnode: stopped", flush=True)


async def _serve_inference(runner: web.AppRunner, node: Node) -> str:
    """Listens on the configured address and, for tasks, on the node bridge (made now, so the
    address exists; egress policies always allow it)."""
    import asyncio
    import socket

    from aiohttp import web

    from agentnode.http_common import CappedSockSite
    from agentnode.peercap import PeerCap

    assert node.config.inference is not None
    port = node.config.inference.port
    await asyncio.to_thread(node.egress.start)
    hosts = (node.config.inference.host, str(node.egress.network.gateway))
    for host in hosts:
        try:
            if host == hosts[1]:  # the tasks' door: capped per task (by its address)
                sock = socket.create_server((host, port))
                sock.setblocking(False)
                await CappedSockSite(runner, sock, PeerCap(f"inference proxy {host}")).start()
            else:
                await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            raise ConfigError(
                f"inference proxy cannot listen on {host}:{port}: {e.strerror} "
                "(set inference.listen to a free port)"
            ) from None
    return f"inference http://{hosts[0]}:{port} (tasks: http://{hosts[1]}:{port})"


async def _serve_mcp(node: Node) -> tuple[MCPEndpoint, MCPSocket]:
    """The MCP doors for tasks: the streamable-HTTP endpoint on a socket bound into each task,
    and on the node bridge when tools.mcp_port is set (tasks with egress reach it like the
    inference proxy); the MCP socket (stdio framing) beside it, which `Tools.mcp_client()`
    takes."""
    import asyncio

    from agentnode.node.api import TaskTokens
    from agentnode.tools.endpoint import MCPEndpoint, mcp_app
    from agentnode.tools.mcpsocket import MCPSocket

    tokens = TaskTokens(node)

    def authenticate(token: str) -> Caller | None:
        p = tokens.authenticate(token)
        if p is None or p.task is None:
            return None
        return node.task_caller(p.task)

    def app() -> ASGIApp:
        return mcp_app(node.tools.service, authenticate)

    port = node.config.tools.mcp_port
    if port is not None:
        await asyncio.to_thread(node.egress.start)
    with contextlib.suppress(FileNotFoundError):
        node.mcp_socket.unlink()
    endpoint = MCPEndpoint(app, uds=node.mcp_socket,
                           host=None if port is None else str(node.egress.network.gateway),
                           port=port)  # fmt: skip
    await endpoint.start()
    stdio = MCPSocket(node.tools.service, authenticate, path=node.mcp_stdio_socket)
    try:
        await stdio.start()
    except BaseException:
        await endpoint.stop()
        raise
    return endpoint, stdio


def _runner(app: web.Application) -> web.AppRunner:
    from aiohttp import web

    from agentnode.http_common import SERVER_LOG

    # A client holding a request open (logs -f of a queued task) must not hold up a stop.
    return web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0, logger=SERVER_LOG)


async def _wait_for_stop(node: Node, config: NodeConfig) -> None:
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            # What the command line set stays (a file's keep_tasks = true too, until restart).
            fresh = load_config(
                config.source,
                data_dir=config.data_dir,
                socket=config.socket,
                listen=config.listen,
                keep_tasks=node.config.keep_tasks or None,
            )
        except AgentnodeError as e:
            print(f"agentnode: reload failed, keeping the old config: {e}", flush=True)
            return
        node.reload(fresh)
        print(f"agentnode: reloaded {config.source or 'defaults'}", flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    if node.config.keep_tasks:
        print("agentnode: stopping (running tasks run on, for the next start)", flush=True)
    else:
        print("agentnode: stopping (running tasks get their grace)", flush=True)


#: What only the node reads: the stores (task specs with their env, checkpoints, memory, keyed
#: tool results, the audit log, the ledger) and the tasks' output.
_PRIVATE = ("tasks", "memory", "tools", "audit", "inference", "logs", "beats")
#: What host users may reach by a name they know but not list: the workspaces (a task running
#: as uid 0 can leave a set-uid file in its own).
_UNLISTED = ("workspaces", "mcp")


def _guard(data_dir: Path) -> None:
    """Host users may pass through the data dir, as a user-namespaced task binds its workspace
    and socket from it under an unprivileged id, but list nothing and read no store. (No task
    sees it at all: the sandbox hides it.)"""
    data_dir.chmod(0o711)
    for names, mode in ((_PRIVATE, 0o700), (_UNLISTED, 0o711)):
        for name in names:
            path = data_dir / name
            path.mkdir(mode=mode, exist_ok=True)
            path.chmod(mode)


def _lock(data_dir: Path) -> int:
    """Holds an exclusive lock on the data dir: two nodes on one state would corrupt it."""
    import fcntl

    fd = os.open(data_dir / "node.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another agentnode runs on {data_dir} (stop it, or pass another --data-dir)"
        ) from None
    return fd
