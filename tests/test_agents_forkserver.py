"""Python agents started as forks of the node's pre-imported interpreter
(`agentnode.agents.forkserver`): each is confined exactly as a task started the usual way,
sees nothing of another forked agent (files, processes, environment, memory), is held by its
task's limits and egress policy, and runs the reference runtime to the same end."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentnode.isolation.forkjoin import cgroup_mounts
from support.agent_env import CALL_COST, REPO, agent_node, audit, ledger
from support.egress_world import HOST4, World
from support.memscan import SCAN_VISIBLE
from support.node_daemon import Daemon

pytestmark = pytest.mark.root

KEY = "k-acme-fork"
TENANT = f'[inference.tenants.acme]\napi_keys = ["{KEY}"]\n'
SCRIPT: list[Any] = [
    {"tool_calls": [{"name": "write_file", "arguments": {"path": "a.txt", "content": "x\n"}}]},
    "written",
]

#: What the secrets of `test_forked_agents_see_nothing_of_each_other` start with.
PREFIX = b"agentfork-secret-"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


#: What a task sees of itself, as JSON on stdout.
PROBE = """
import json, os, resource, socket
status = {k: v.strip() for k, v in (l.split(":", 1) for l in open("/proc/self/status"))}
print(json.dumps({
    "pid": os.getpid(),
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
    "status": {k: status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                       "NoNewPrivs", "Seccomp", "Seccomp_filters")},
    "cgroup": open("/proc/self/cgroup").read(),
    "hostname": socket.gethostname(),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
    "core": resource.getrlimit(resource.RLIMIT_CORE),
    "root": sorted(os.listdir("/")),
    "mounts": len(open("/proc/self/mountinfo").readlines()),
    "links": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]),
    "workspace": sorted(os.listdir("/workspace")),
}))
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, Daemon]]:
    root = tmp_path_factory.mktemp("forkserver")
    with World() as world, agent_node(world, root, SCRIPT, extra=TENANT) as (d, _mock):
        yield world, d


def _run(d: Daemon, code: str, **fields: Any) -> tuple[dict[str, Any], str]:
    task = d.submit([sys.executable, "-c", code], user="0", agent={"kind": "python"},
                    **{"memory": "256M", "cpus": 0.5, "ro": [str(REPO)], **fields})  # fmt: skip
    done = d.wait(task["id"], timeout=120)
    return done, d.log(task["id"])


def _forked(d: Daemon, code: str, **fields: Any) -> tuple[dict[str, Any], str]:
    """Runs `code` as a forked agent: the first tasks start the fork server and run as usual
    (their pid is 1) until it has imported everything."""
    deadline = time.monotonic() + 120
    while True:
        done, log = _run(d, f"import os\nif os.getpid() != 2: raise SystemExit(99)\n{code}",
                         **fields)  # fmt: skip
        if done.get("exit_code") != 99:
            return done, log
        assert time.monotonic() < deadline, "the fork server never became ready"
        time.sleep(0.5)


def _probe(log: str) -> dict[str, Any]:
    return json.loads(log.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_forked_agent_is_confined_as_a_usual_start(node: tuple[World, Daemon]) -> None:
    """Identity, capabilities, no_new_privs, seccomp, cgroups, namespaces, root, rlimits and
    environment of a forked agent are a usual start's: the same probe in both, the usual one
    kept off the fork server by a PYTHON* variable."""
    _world, d = node
    done, log = _forked(d, PROBE, memory="200M")
    assert done["state"] == "succeeded", log
    forked = _probe(log)
    done, log = _run(d, PROBE, memory="200M", env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert done["state"] == "succeeded", log
    usual = _probe(log)
    # The agent is its task's pid 2 (the stub, the task's init, is 1): nothing else is there.
    assert (forked["pid"], forked["procs"], usual["pid"], usual["procs"]) == (2, [1, 2], 1, [1])
    for key in ("ids", "status", "hostname", "cwd", "nofile", "core", "root", "mounts", "links"):
        assert forked[key] == usual[key], key
    assert forked["status"]["CapEff"] == "0000000000000000"
    assert forked["status"]["NoNewPrivs"] == "1" and forked["status"]["Seccomp"] == "2"

    def shape(cgroup: str) -> list[str]:  # each task's own leaf named alike
        return [line.rsplit("/t", 1)[0] for line in cgroup.splitlines()]

    assert shape(forked["cgroup"]) == shape(usual["cgroup"])
    assert forked["cgroup"] != usual["cgroup"]  # its own task's cgroups, not the other's
    usual["env"].pop("PYTHONDONTWRITEBYTECODE")
    assert forked["env"].keys() == usual["env"].keys()
    assert forked["env"]["AGENTNODE_TASK_ID"] != usual["env"]["AGENTNODE_TASK_ID"]
    assert forked["workspace"] == usual["workspace"] == []


def test_forked_agents_see_nothing_of_each_other(node: tuple[World, Daemon]) -> None:
    """Agent A keeps a secret in its environment, a file and its memory, and runs on; agent
    B, forked from the same server afterwards, finds it in none of its processes, files or
    its own memory (the fork server never holds a request: B's copy of it has no A), while
    it does find its own secret there (the scan works)."""
    _world, d = node
    mine, theirs = PREFIX.decode() + secrets.token_hex(16), PREFIX.decode() + secrets.token_hex(16)
    holder = (
        "import os, time\n"
        "kept = os.environ['SECRET'] * 2\n"
        "open('/workspace/secret.txt', 'w').write(os.environ['SECRET'])\n"
        "print('holding', flush=True); time.sleep(60)\n"
    )
    _forked(d, "pass")  # the fork server is ready
    a = d.submit([sys.executable, "-c", f"import os\nassert os.getpid() == 2\n{holder}"],
                 user="0", agent={"kind": "python"}, memory="256M", cpus=0.5,
                 env={"SECRET": theirs}, ro=[str(REPO)])  # fmt: skip
    deadline = time.monotonic() + 60
    a_log = d.data / "logs" / f"{a['id']}.1.log"
    while not a_log.exists() or "holding" not in a_log.read_text():
        assert time.monotonic() < deadline and d.task(a["id"])["state"] in (
            "queued",
            "starting",
            "running",
        )
        time.sleep(0.1)
    their_file = str(d.data / "workspaces" / a["id"] / "secret.txt")
    # B knows A's secret only by its hash (the secret itself in its code would be found):
    # it hashes what follows each occurrence of the prefix the secrets share.
    search = f"""
import hashlib, json, os
P = {PREFIX!r}
want = {{bytes.fromhex({digest(theirs)!r}): "theirs",
        hashlib.sha256(os.environ["SECRET"].encode()).digest(): "mine"}}
found = {{"theirs": [], "mine": []}}
def scan(blob, where):
    i = blob.find(P)
    while i >= 0:
        who = want.get(hashlib.sha256(blob[i:i + len(P) + 32]).digest())
        if who and where not in found[who]:
            found[who].append(where)
        i = blob.find(P, i + 1)
for path in ({their_file!r}, "/workspace/secret.txt"):
    try:
        scan(open(path, "rb").read(), path)
    except OSError:
        pass
{SCAN_VISIBLE}
print(json.dumps(found))
"""
    done, log = _forked(d, search, env={"SECRET": mine}, memory="512M", cpus=1)
    assert done["state"] == "succeeded", log
    found = _probe(log)
    assert found["theirs"] == [], found
    assert "memory" in found["mine"], "the memory scan finds the agent's own secret"
    d.client.call("POST", f"/v1/tasks/{a['id']}/cancel", {})
    d.wait(a["id"], timeout=60)


def test_a_forked_agent_is_held_by_its_limits_and_egress(node: tuple[World, Daemon]) -> None:
    """Past its memory limit it is OOM-killed (and its task says so); its pids limit holds;
    a connection its egress policy denies fails and is audited under its task."""
    world, d = node
    done, log = _forked(d, "b = bytearray(300 << 20)\nb[::4096] = b'x' * len(b[::4096])",
                        memory="96M")  # fmt: skip
    assert done["state"] == "failed" and "out of memory" in done["reason"], (done, log)
    spawn = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(64):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(5); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused after', n, e.errno)\n"
    )
    done, log = _forked(d, spawn, pids=12)
    assert "refused after" in log, log
    assert int(log.split("refused after")[1].split()[0]) < 12, log
    denied = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({HOST4!r}, 8080), timeout=5)\n"
        "except OSError as e:\n"
        "    print('denied', e.errno)\n"
        "else:\n"
        "    print('connected')\n"
    )
    done, log = _forked(d, denied)
    assert "denied" in log and "connected" not in log, log
    deadline = time.monotonic() + 30
    while not any(r.get("task") == done["id"] for r in audit(d)):
        assert time.monotonic() < deadline, audit(d)
        time.sleep(0.2)
    del world


def test_the_reference_runtime_runs_forked_to_the_same_end(node: tuple[World, Daemon]) -> None:
    """`python -m agentnode.runtime` as a forked agent: its tool call lands in its workspace,
    its model calls in the ledger under its task, and its answer on stdout."""
    world, d = node
    _forked(d, "pass")
    task = d.submit([sys.executable, "-m", "agentnode.runtime", "write it", "--model",
                     "gpt-test", "--tools", "write_file", "--tools-via", "api"],
                    user="0", agent={"kind": "python"}, memory="256M", cpus=0.5,
                    tenant="acme", ro=[str(REPO)])  # fmt: skip
    done = d.wait(task["id"], timeout=120)
    log = d.log(task["id"])
    assert done["state"] == "succeeded", log
    assert log.strip().splitlines()[-1] == "written"
    assert (d.data / "workspaces" / task["id"] / "a.txt").read_text() == "x\n"
    (row,) = [r for r in ledger(world, d, KEY) if r["task"] == task["id"]]
    assert row["requests"] == 2 and Decimal(row["cost"]) == 2 * CALL_COST


def _waiting(d: Daemon, code: str) -> tuple[dict[str, Any], Path]:
    """Starts `code` as a forked-kind agent; returns once it has printed `waiting`: the task
    and its log's path."""
    task = d.submit([sys.executable, "-c", code], user="0", agent={"kind": "python"},
                    memory="256M", cpus=0.5, ro=[str(REPO)])  # fmt: skip
    log = d.data / "logs" / f"{task['id']}.1.log"
    deadline = time.monotonic() + 60
    while not log.exists() or "waiting" not in log.read_text():
        assert time.monotonic() < deadline, d.task(task["id"])
        time.sleep(0.1)
    return task, log


def test_sigterm_to_its_task_reaches_a_forked_agent(node: tuple[World, Daemon]) -> None:
    """A cancel's SIGTERM goes to the task's init, the stub, which forwards it to the agent:
    the agent's handler runs and the task ends cancelled without waiting for the kill."""
    _world, d = node
    _forked(d, "pass")
    code = (
        "import os, signal, sys, time\n"
        "assert os.getpid() == 2\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(0)))\n"
        "print('waiting', flush=True)\n"
        "time.sleep(60)\n"
    )
    task, log = _waiting(d, code)
    d.client.call("POST", f"/v1/tasks/{task['id']}/cancel", {})
    done = d.wait(task["id"], timeout=60)
    assert done["state"] == "cancelled" and "got TERM" in log.read_text(), (done, log.read_text())


def test_a_killed_fork_server_is_replaced_and_agents_start_meanwhile(
    node: tuple[World, Daemon],
) -> None:
    """SIGKILL of the fork server (from outside, or a bug in it): agents still start, the usual
    way, and a new server takes over forking them."""
    _world, d = node
    _forked(d, "pass")
    server = _fork_server(d)
    os.kill(server, signal.SIGKILL)
    # Dead (a start sent in the instant it dies fails, saying the fork server is gone).
    deadline = time.monotonic() + 10
    while psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "SIGKILL did not end the fork server"
        time.sleep(0.01)
    done, log = _run(d, "import os\nprint('pid', os.getpid())")
    assert done["state"] == "succeeded", (done, log)
    done, log = _forked(d, "print('forked again')")
    assert done["state"] == "succeeded" and "forked again" in log, (done, log)
    assert _fork_server(d) != server


#: A forked agent that waits for a file in its workspace, then ends with status 7.
_UNTIL_GO = (
    "import os, sys, time\n"
    "if os.getpid() != 2: raise SystemExit(99)\n"
    "print('waiting', flush=True)\n"
    "while not os.path.exists('/workspace/go'): time.sleep(0.02)\n"
    "print('went on', flush=True)\n"
    "sys.exit(7)\n"
)


@pytest.mark.parametrize("killed", ["fork server", "node", "node stopped keeping tasks"])
def test_a_forked_agent_outlives_its_fork_server_and_its_node(tmp_path: Path, killed: str) -> None:
    """The fork server gone (killed; or ended with the node: `kill -9`, a stop that keeps
    tasks) while a forked agent runs: the agent runs on as its stub's child and tells the stub
    its own status; a next node re-adopts its task. It ends as it would have (status 7, all
    its output), not failed without its status."""
    keep = "[node]\nkeep_tasks = true\n" if killed == "node stopped keeping tasks" else ""
    with World() as world, agent_node(world, tmp_path, SCRIPT, extra=TENANT + keep) as (d, _):
        _forked(d, "pass")
        task, log = _waiting(d, _UNTIL_GO)
        server = _fork_server(d)
        (agent,) = psutil.Process(server).children()
        if killed == "fork server":
            os.kill(server, signal.SIGKILL)
        else:
            assert d.stop(signal.SIGKILL if killed == "node" else signal.SIGTERM) in (0, -9)
            deadline = time.monotonic() + 10  # the fork server ends at its socket's end
            while psutil.pid_exists(server) and psutil.Process(server).status() != "zombie":
                assert time.monotonic() < deadline, "the fork server outlived its node"
                time.sleep(0.01)
            d.start()
            assert "1 re-adopted" in d.wait_for_line("agentnode: capacity")
        assert agent.is_running() and agent.status() != psutil.STATUS_ZOMBIE
        (d.data / "workspaces" / task["id"] / "go").touch()
        done = d.wait(task["id"], timeout=60)
        assert (done["state"], done["exit_code"]) == ("failed", 7), (done, log.read_text())
        assert log.read_text().splitlines()[-2:] == ["waiting", "went on"]


def _fork_server(d: Daemon) -> int:
    """The pid of the node's fork server (its child; its forks are the tasks')."""
    [server] = [p.pid for p in psutil.Process(d.pid).children()
                if "agentnode.agents.forkserver" in p.cmdline()]  # fmt: skip
    return server


def test_a_forked_agent_is_the_one_process_forked_into_its_task(
    node: tuple[World, Daemon],
) -> None:
    """The fork server forks each agent straight into its task's pid namespace: the agent is
    the server's child (it reaps it and tells the stub), the task's pid 2, and its task's
    cgroups (cgroup2 and each v1 hierarchy) hold the stub and the agent, nothing else; the
    server's heap is on 2 MiB pages where the kernel gives them, so a fork copies few entries."""
    _world, d = node
    _forked(d, "pass")
    code = "import time\nprint('waiting', flush=True)\ntime.sleep(60)\n"
    task, _ = _waiting(d, code)
    try:
        server = _fork_server(d)
        (agent,) = [p.pid for p in psutil.Process(server).children()]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{agent}/status").read_text()
                      .splitlines())  # fmt: skip
        assert status["NSpid"].split()[1:] == ["2"]
        mounts, nodes = cgroup_mounts(), Path(f"/proc/{d.pid}/cgroup").read_text().splitlines()
        checked = []
        for line in Path(f"/proc/{agent}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            first = controllers.split(",")[0]
            if first in mounts and line not in nodes:  # the task's own, not the node's
                name = "cgroup.procs" if first == "" else "tasks"
                procs = (Path(mounts[first] + path) / name).read_text().split()
                assert len(procs) == 2 and str(agent) in procs, (line, procs)
                checked.append(first)
        assert "" in checked  # cgroup2's, and each v1 hierarchy's on a hybrid host
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        if thp.exists() and "[never]" not in thp.read_text():
            rollup = Path(f"/proc/{server}/smaps_rollup").read_text()
            huge = int(rollup.split("AnonHugePages:")[1].split()[0])
            assert huge >= 16 << 10, rollup  # kB: most of its ~70 MB heap
    finally:
        d.client.call("POST", f"/v1/tasks/{task['id']}/cancel", {})
        d.wait(task["id"], timeout=60)


#: What a forked agent finds done before it starts, as JSON on stdout.
WARMED = """
import gc, json, platform, sys
print(json.dumps({
    "modules": [m for m in ("openai.resources.chat.completions", "httpcore2", "h11",
                            "anyio._backends._asyncio", "encodings.idna")
                if m in sys.modules],
    "uname": platform._uname_cache is not None,
    "frozen": gc.get_freeze_count(),
    "collected": gc.collect() >= 0,
}))
"""


def test_a_forked_agent_finds_its_first_call_done_once_and_the_heap_frozen(
    node: tuple[World, Daemon],
) -> None:
    """The fork server made one chat completion (in-process) before forking: an agent imports
    no part of the SDK's chat API, transport or URL handling on its first call, and reads no
    platform (`uname -p` is a subprocess); it inherits a frozen heap, which its collections
    skip (and still run)."""
    _world, d = node
    done, log = _forked(d, WARMED)
    assert done["state"] == "succeeded", log
    warmed = _probe(log)
    assert warmed["modules"] == ["openai.resources.chat.completions", "httpcore2", "h11",
                                 "anyio._backends._asyncio", "encodings.idna"]  # fmt: skip
    assert warmed["uname"] and warmed["collected"]
    assert warmed["frozen"] > 10_000


@pytest.mark.parametrize(
    ("argv", "change"),
    [
        (["/usr/bin/python3", "-m", "agentnode.runtime", "x"], {}),  # another interpreter
        ([sys.executable, "-I", "-c", "pass"], {}),  # interpreter options
        ([sys.executable, "-m", "other.module"], {}),
        ([sys.executable, "script.py"], {}),
        ([sys.executable, "-c"], {}),
        (["/bin/sh", "-c", "python3 -c pass"], {}),
        ([sys.executable, "-c", "pass"], {"env": (("PYTHONOPTIMIZE", "1"),)}),
        ([sys.executable, "-c", "pass"], {"env": (("PYTHONSTARTUP", "/tmp/x.py"),)}),
        ([sys.executable, "-c", "pass"], {"userns": True}),
        ([sys.executable, "-c", "pass"], {"rootfs": "/tmp"}),
    ],
)
def test_what_is_not_forked_starts_the_usual_way(argv: list[str], change: dict[str, Any]) -> None:
    """A command the fork server would not run as a fresh interpreter would is not its: and
    asking about it does not start the server."""
    from dataclasses import replace

    from agentnode.agents.forkserver import ForkServer
    from agentnode.isolation.spec import Sandbox

    server = ForkServer()
    try:
        assert not server.serves(argv, replace(Sandbox(), **change))
        assert server._proc is None
    finally:
        server.close()
