"""A test-owned world for egress tests: a task netns and a hosts netns joined by a veth pair,
with test-assigned addresses only (198.51.100.0/24, 2001:db8::/64), and a scratch cgroup2 node
the task's processes join. Everything is removed on exit, also when the test fails."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agentnode import _native

HERE = Path(__file__).parent
TASK4, HOST4, OTHER4 = "198.51.100.1", "198.51.100.2", "198.51.100.3"
TASK6, HOST6, OTHER6 = "2001:db8::1", "2001:db8::2", "2001:db8::3"
CLONE_NEWNET = 0x40000000


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def unified_dir() -> Path:
    h: dict[str, str] = json.loads(_native.cgroup_hierarchy())
    return Path(h["unified"]) / h["unified_path"].lstrip("/")


@contextlib.contextmanager
def scratch_cgroup() -> Iterator[Path]:
    """A cgroup2 node under this process's own; its processes are killed before rmdir."""
    path = unified_dir() / f"agentnode-egress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1")
        for _ in range(1000):
            try:
                path.rmdir()
                break
            except OSError:
                threading.Event().wait(0.005)


class World:
    """Netns `task` (TASK4/TASK6) <-veth-> netns `hosts` (HOST4, OTHER4, HOST6, OTHER6)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.task = f"agentnode-t{tag}"
        self.hosts = f"agentnode-h{tag}"
        self.veth = f"an{tag}"
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> World:
        try:
            sh("ip", "netns", "add", self.task)
            sh("ip", "netns", "add", self.hosts)
            sh("ip", "link", "add", f"{self.veth}t", "netns", self.task, "type", "veth",
               "peer", "name", f"{self.veth}h", "netns", self.hosts)  # fmt: skip
            for ns, dev, addrs in (
                (self.task, f"{self.veth}t", [f"{TASK4}/24", f"{TASK6}/64"]),
                (
                    self.hosts,
                    f"{self.veth}h",
                    [f"{HOST4}/24", f"{OTHER4}/24", f"{HOST6}/64", f"{OTHER6}/64"],
                ),
            ):
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                for a in addrs:
                    sh(
                        "ip",
                        "-n",
                        ns,
                        "addr",
                        "add",
                        a,
                        "dev",
                        dev,
                        *(["nodad"] if ":" in a else []),
                    )
                sh("ip", "-n", ns, "link", "set", dev, "up")
            # Static IPv6 neighbours: the first SYN otherwise waits out neighbour discovery (1 s).
            for ns, dev, peer_ns, peer_dev, addrs in (
                (self.task, f"{self.veth}t", self.hosts, f"{self.veth}h", [HOST6, OTHER6]),
                (self.hosts, f"{self.veth}h", self.task, f"{self.veth}t", [TASK6]),
            ):
                mac = json.loads(
                    subprocess.run(["ip", "-n", peer_ns, "-j", "link", "show", peer_dev],
                                   check=True, capture_output=True, text=True).stdout
                )[0]["address"]  # fmt: skip
                for a in addrs:
                    sh(
                        "ip",
                        "-n",
                        ns,
                        "neigh",
                        "replace",
                        a,
                        "lladdr",
                        mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self._procs:
            p.kill()
            p.communicate()
        for ns in (self.task, self.hosts):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def serve(self, **cfg: Any) -> None:
        """Starts test hosts (see egress_servers.py) in the hosts netns and waits until bound."""
        p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.hosts,
                sys.executable,
                str(HERE / "egress_servers.py"),
                json.dumps(cfg),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._procs.append(p)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"

    def run(
        self, cgroup: Path, *ops: dict[str, Any], timeout: float = 60, netns: str | None = None
    ) -> list[dict[str, Any]]:
        """Runs egress_client.py with `ops` as a task: in the task netns (or `netns`) and in
        `cgroup`."""
        procs = cgroup / "cgroup.procs"
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.task,
                sys.executable,
                str(HERE / "egress_client.py"),
                json.dumps(list(ops)),
            ],
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return [json.loads(line) for line in out.stdout.splitlines()]

    @contextlib.contextmanager
    def in_hosts_thread(self, main: Callable[[asyncio.AbstractEventLoop], Any]) -> Iterator[Any]:
        """Runs an asyncio loop on a thread that lives in the hosts netns (setns is per thread),
        so every socket it opens — the forwarder's and its upstream queries — is in that netns.
        `main(loop)` runs on that loop first; its result is yielded, and its `close()` coroutine
        awaited at the end."""
        libc = ctypes.CDLL(None, use_errno=True)
        loop = asyncio.new_event_loop()
        ready: list[Any] = []
        started = threading.Event()

        def thread() -> None:
            with open(f"/run/netns/{self.hosts}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    ready.append(OSError(ctypes.get_errno(), "setns"))
                    started.set()
                    return
            asyncio.set_event_loop(loop)
            try:
                ready.append(loop.run_until_complete(main(loop)))
            except BaseException as e:
                ready.append(e)
            started.set()
            loop.run_forever()

        t = threading.Thread(target=thread, daemon=True)
        t.start()
        started.wait(10)
        if isinstance(ready[0], BaseException):
            raise ready[0]
        try:
            yield ready[0]
        finally:
            asyncio.run_coroutine_threadsafe(ready[0].close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            t.join(10)
            loop.close()
