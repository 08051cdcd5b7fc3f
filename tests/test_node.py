"""The node daemon for real: `agentnode run` subprocesses, real isolated tasks, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Options, Rdict

from agentnode import _native
from agentnode.isolation import task as task_mod
from agentnode.node.client import NodeNotRunning
from agentnode.node.restore import node_id
from agentnode.sdk.transport import UnixHTTPConnection
from agentnode.tasks import TaskStore
from conftest import processes_with, public_dir, run_cli
from support.node_daemon import Daemon, daemon

pytestmark = pytest.mark.root

#: Holds its slot until the test creates `go` in its workspace.
GATE = ["sh", "-c", "while [ ! -e /workspace/go ]; do sleep 0.01; done"]


REPO = Path(__file__).resolve().parents[1]
#: Submit fields for a task running this checkout's Python and SDK: as root (the venv may not be
#: readable by nobody), with enough CPU to import quickly, and the checkout bound in (it may sit
#: under /tmp, which is the task's own tmpfs).
PYTHON: dict[str, Any] = {
    "user": "0",
    "memory": "128M",
    "cpus": 0.5,
    "ro": [str(REPO)],
    "env": {"PYTHONPATH": str(REPO / "python")},
}


def open_gate(d: Daemon, gate: dict[str, Any]) -> None:
    (d.data / "workspaces" / gate["id"] / "go").touch()


def started_at(task: dict[str, Any]) -> float:
    return float(next(at for state, at in task["history"] if state == "running"))


def ended_at(task: dict[str, Any]) -> float:
    return float(task["history"][-1][1])


def call(d: Daemon, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
    """A raw API call: (status, decoded JSON body)."""
    conn = UnixHTTPConnection(str(d.socket), timeout=30)
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, raw, headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    return resp.status, json.loads(data) if is_json else data


def in_parallel(fn: Callable[[int], Any], n: int, threads: int = 8) -> list[Any]:
    """fn(0..n-1) over a few threads (the API serves concurrent submits)."""
    out: list[Any] = [None] * n

    def work(k: int) -> None:
        for i in range(k, n, threads):
            out[i] = fn(i)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def swept_cgroups(owner: int) -> list[Path]:
    """What is left of killed process `owner`'s cgroups once swept as the next instance's start
    sweeps dead instances' (`sweep_cgroups`; it leaves live instances' alone)."""
    dirs = task_mod._instance().dirs()
    _native.sweep_cgroups(dirs[0].parent, [d.parent for d in dirs[1:]])
    return leftover_cgroups(owner)


def leftover_cgroups(owner: int | Path) -> list[Path]:
    """An instance's cgroup directories still present, in every hierarchy: a node daemon's on
    data dir `owner` (its node's, `k<node>`, which its next start takes over), or a process's
    by pid (`n<pid>-<start>`)."""
    name = f"k{node_id(owner)}" if isinstance(owner, Path) else None
    return [
        e
        for d in task_mod._instance().dirs()
        for e in d.parent.iterdir()
        if e.name == name or (name is None and e.name.startswith(f"n{owner}-"))
    ]


def is_zygote(pid: str) -> bool:
    """A zygote waiting for its task has the name of the thread that cloned it."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "agentnode-zygot"
    except FileNotFoundError:
        return False


def task_cgroups(daemon_pid: int | Path) -> list[str]:
    """The daemon instance's task cgroups, in every hierarchy, that ever held a task: the
    daemon also keeps a few made ahead of the next starts, empty or holding a zygote. A task's
    cgroup2 node tells (its cpu.stat counts with or without the cpu controller); a v1 node
    whose cgroup2 node is gone counts as left over."""
    instances = leftover_cgroups(daemon_pid)
    if not instances:
        return []
    unified = task_mod._instance().dirs()[0].parent / instances[0].name

    def ran(name: str) -> bool:
        try:
            stat = (unified / name / "cpu.stat").read_text()
            procs = (unified / name / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return True
        if procs and all(is_zygote(p) for p in procs):
            return False
        return int(dict(line.split() for line in stat.splitlines())["usage_usec"]) > 0

    return [e.name for d in instances for e in d.iterdir() if e.is_dir() and ran(e.name)]


# -- front door ---------------------------------------------------------------------------------


def test_cli_submit_ps_logs_follow_wait(tmp_path: Path) -> None:
    with daemon(tmp_path, "[node]\ngrace = 0.5\n") as d:
        assert any(line.startswith("agentnode: listening on unix:") for line in d.lines)
        assert any("CPUs" in line and "allocatable" in line for line in d.lines)
        sock = ["--socket", str(d.socket)]
        script = "echo one; sleep 0.5; echo two; exit 3"
        r = run_cli(["submit", *sock, "--cpus", "0.1", "--memory", "64M", "--", "sh", "-c", script])
        assert r.returncode == 0, r.stderr
        tid = r.stdout.strip()
        logs = run_cli(["logs", "-f", *sock, tid])
        assert logs.stdout == "one\ntwo\n", "logs -f follows the task to its end"
        w = run_cli(["wait", *sock, tid])
        assert w.returncode == 3 and "exited with code 3" in w.stderr
        ps = run_cli(["ps", "--all", *sock]).stdout
        assert tid[:12] in ps and "failed" in ps
        ok = run_cli(["submit", *sock, "--memory", "64M", "--wait", "--", "true"])
        assert ok.returncode == 0, ok.stderr
        live = d.submit(["sleep", "30"], tenant="shown")
        d.wait(live["id"], states=("running",))
        ps_live = run_cli(["ps", *sock]).stdout
        assert live["id"][:12] in ps_live and tid[:12] not in ps_live, "ps lists live tasks"
        top = run_cli(["top", "--once", *sock])
        assert top.returncode == 0 and live["id"][:12] in top.stdout and "running" in top.stdout
        assert tid[:12] not in top.stdout, "top shows live tasks"
        # Everything a start needs on disk lives in the daemon's data dir (the staging mount
        # point too, which a bare `spawn` keeps under /var/lib/agentnode).
        assert (d.data / "stage").is_dir() and (d.data / "workspaces" / tid).is_dir()


def test_host_users_list_nothing_of_the_data_dir_and_read_no_store() -> None:
    """The node's state is root's: a host user may pass through the data dir (user-namespaced
    tasks bind from it) but lists nothing there, and reads no store, even by a known name."""
    with public_dir("modes") as root:  # pytest's tmp_path no host user could pass anyway
        _host_users_see_nothing(root)


def _host_users_see_nothing(root: Path) -> None:
    # A tool's scratch workspace an earlier run left (a crash skips its removal) goes too.
    left = root / "data" / "tool-scratch" / "tool-left"
    left.mkdir(parents=True)
    (left / "f").write_text("SECRET-SCRATCH")
    with daemon(root) as d:
        assert not left.exists(), "swept at start"
        t = d.submit(["sh", "-c", "echo SECRET-OUTPUT > /workspace/f; echo SECRET-OUTPUT"],
                     env={"K": "SECRET-ENV"})  # fmt: skip
        d.wait(t["id"])
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"]
        for probe in (f"ls {d.data}", f"ls {d.data}/workspaces", f"cat {d.data}/logs/*",
                      f"grep -r SECRET {d.data}/tasks", f"ls {d.data}/tasks/db"):  # fmt: skip
            r = subprocess.run([*as_nobody, probe], capture_output=True, text=True, check=False)
            assert r.returncode != 0 and "SECRET" not in r.stdout, (probe, r.stdout)
        modes = {p.name: p.stat().st_mode & 0o777 for p in d.data.iterdir() if p.is_dir()}
        assert d.data.stat().st_mode & 0o777 == 0o711
        for name in ("tasks", "memory", "tools", "audit", "inference", "logs", "beats"):
            assert modes[name] == 0o700, (name, modes)
        assert modes["workspaces"] == 0o711 and modes["mcp"] == 0o711, modes
        # Its own workspace, by its name, is the task's: what it wrote is still there.
        assert (d.data / "workspaces" / t["id"] / "f").read_text() == "SECRET-OUTPUT\n"


def test_cli_without_a_daemon_says_how_to_start_it(tmp_path: Path) -> None:
    r = run_cli(["ps", "--socket", str(tmp_path / "none.sock")])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "agentnode run" in r.stderr, r.stderr


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    sock = ["--socket", str(tmp_path / "none.sock")]
    for args, message in (
        (["submit", *sock], "submit needs a command after '--'"),
        (
            ["submit", *sock, "--env", "NOEQUALS", "--", "true"],
            "--env 'NOEQUALS': is not NAME=VALUE",
        ),
    ):
        r = run_cli(args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_config_names_key_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\ngrace = 5\n\n[scheduler]\naging = -3\n")
    r = run_cli(["run", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
                 "--socket", str(tmp_path / "s")])  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{cfg}:5: scheduler.aging: must be an integer >= 0" in r.stderr, r.stderr
    cfg.write_text('[network]\nbridge = "agentnode1"\nsubnet = "10.0.0.0/33"\n')
    r = run_cli(["run", "--config", str(cfg), "--data-dir", str(tmp_path / "d"),
                 "--socket", str(tmp_path / "s")])  # fmt: skip
    assert f"{cfg}:3: network.subnet: bad node subnet '10.0.0.0/33'" in r.stderr, r.stderr


def test_task_records_of_another_format_are_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    TaskStore(data / "tasks").close()
    db = Rdict(str(data / "tasks" / "db"), Options(raw_mode=True))
    db[b"t/0123abcd"] = b'{"id": "0123abcd", "seq": 1}'
    db.close()
    r = run_cli(["run", "--data-dir", str(data), "--socket", str(tmp_path / "s")])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "task record t/0123abcd" in r.stderr and "move the data dir away" in r.stderr


def test_second_daemon_on_the_same_state_is_refused(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        r = run_cli(["run", "--data-dir", str(d.data), "--socket", str(tmp_path / "other.sock")])
        assert r.returncode != 0 and "another agentnode runs on" in r.stderr, r.stderr
        assert d.client.call("GET", "/healthz")["ok"] is True


def test_client_keeps_a_connection_per_thread_across_restarts(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.start()
    try:
        client = d.client
        client.call("GET", "/healthz")
        first = client._local.kept.sock
        assert client.call("GET", "/v1/node")["allocatable_cpu_millis"] > 0
        assert client._local.kept.sock is first, "a second call reuses the connection"
        socks = in_parallel(lambda _: (client.call("GET", "/healthz"), client._local.kept.sock), 8)
        assert len({id(s) for _, s in socks}) > 1, "threads do not share a connection"
        d.stop()
        with pytest.raises(NodeNotRunning, match="agentnode run"):
            client.call("GET", "/healthz")
        d.start()
        task = client.call("POST", "/v1/tasks", {"command": ["true"], "memory": "32M"})
        assert d.wait(task["id"])["state"] == "succeeded", "a restarted node is reached again"
    finally:
        if d.proc is not None:
            d.stop()
        d.client.close()
    assert all(k.sock is None for k in d.client._kept), "close() closes every connection"


def test_api_bad_input_names_the_field(tmp_path: Path) -> None:
    config = "[scheduler]\ntenant_queue_cap = 2\nclass_running = { normal = 1 }\n"
    with daemon(tmp_path, config) as d:
        cases: list[tuple[Any, str]] = [
            ({"command": []}, "command"),
            ({"command": ["true"], "priority": "urgent"}, "priority"),
            ({"command": ["true"], "cpus": -1}, "cpus"),
            ({"command": ["true"], "cpus": 10_000}, "cpus"),
            ({"command": ["true"], "memory": "lots"}, "memory"),
            ({"command": ["true"], "memory": "100T"}, "memory"),
            ({"command": ["true"], "timeout": "soon"}, "timeout"),
            ({"command": ["true"], "pids": 1.5}, "pids"),
            ({"command": ["true"], "env": {"A": 1}}, "env"),
            ({"command": ["true"], "tenant": "../x"}, "tenant"),
            ({"command": ["true"], "user": "root"}, "user"),
            ({"command": ["true"], "retries": "many"}, "retries"),
            ({"command": ["true"], "ro": ["/nonexistent-agentnode"]}, "ro"),
            ({"command": ["true"], "rw": ["/tmp:../x"]}, "rw"),
            ({"command": ["true"], "ro": "/tmp"}, "ro"),
            ({"command": ["true"], "caps": ["CAP_TIME_TRAVEL"]}, "caps"),
            ({"command": ["true"], "hostname": "no spaces"}, "hostname"),
            ({"command": ["true"], "cpu_weight": 0}, "cpu_weight"),
            ({"command": ["true"], "rootfs": "/nonexistent-agentnode"}, "rootfs"),
            ({"command": ["true"], "cwd": "relative"}, "cwd"),
            ({"command": ["true"], "userns": "yes"}, "userns"),
            ({"command": ["true"], "tmp_size": "huge"}, "tmp_size"),
            ({"command": ["true"], "colour": "red"}, "colour"),
            ({"command": ["true"], "network": "bridge"}, "network"),
            ({"command": ["true"], "network": "none", "allow": ["10.0.0.1"]}, "network"),
            ({"command": ["true"], "allow": "10.0.0.0/8"}, "allow"),
            ({"command": ["true"], "allow": ["10.0.0.0/33"]}, "allow"),
            ({"command": ["true"], "allow_hosts": [""]}, "allow_hosts"),
            ({"command": ["true"], "egress_rate": "fast"}, "egress_rate"),
            ({"command": ["true"], "conn_rate": [5]}, "conn_rate"),
            ([1, 2], "body"),
        ]
        for body, field in cases:
            status, err = call(d, "POST", "/v1/tasks", body)
            assert status == 400 and err["field"] == field, (body, err)
        status, err = call(d, "POST", "/v1/tasks", b"{not json")
        assert status == 400 and err["field"] == "body"
        status, err = call(d, "GET", "/v1/tasks?state=sleepy")
        assert status == 400 and err["field"] == "state"
        status, err = call(d, "GET", "/v1/tasks/nope")
        assert status == 404 and "no task" in err["error"]
        gate = d.submit(GATE, tenant="gate", user="0")
        d.wait(gate["id"], states=("running",))
        d.submit(["true"], tenant="full")
        d.submit(["true"], tenant="full")
        status, err = call(d, "POST", "/v1/tasks", {"command": ["true"], "tenant": "full"})
        assert status == 429 and "tenant full has 2 queued tasks" in err["error"], err
        assert len(call(d, "GET", "/v1/tasks?tenant=full")[1]) == 2, "nothing half-added"
        open_gate(d, gate)


def test_submit_takes_the_sandbox_options_of_exec(tmp_path: Path) -> None:
    script = (
        "hostname; pwd; grep CapEff /proc/self/status; "
        "dd if=/dev/zero of=/tmp/big bs=1k count=2048 2>/dev/null || echo tmp-full"
    )
    with daemon(tmp_path) as d:
        t = d.submit(
            ["sh", "-c", script],
            user="0",
            hostname="box-7",
            cwd="/tmp",
            tmp_size="1M",
            caps=["CAP_NET_BIND_SERVICE"],
            cpu_weight=50,
        )
        done = d.wait(t["id"])
        assert done["state"] == "succeeded", d.log(t["id"])
        assert done["hostname"] == "box-7" and done["caps"] == ["CAP_NET_BIND_SERVICE"]
        lines = d.log(t["id"]).split("\n")
        assert lines[:2] == ["box-7", "/tmp"]
        assert lines[2].split() == ["CapEff:", f"{1 << 10:016x}"], "only the capability asked for"
        assert lines[3] == "tmp-full"


def test_the_task_user_owns_its_workspace(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        t = d.submit(["sh", "-c", "echo kept > /workspace/out && id -u"])
        assert d.wait(t["id"])["state"] == "succeeded", d.log(t["id"])
        assert d.log(t["id"]) == "65534\n"
        assert (d.data / "workspaces" / t["id"] / "out").read_text() == "kept\n"


def test_submit_userns() -> None:
    # Task root maps to an unprivileged host id, which must be able to reach the workspace: the
    # state may not sit under pytest's private (0700) tmp_path.
    with public_dir("userns") as root, daemon(root) as d:
        r = run_cli(["submit", "--socket", str(d.socket), "--userns", "--user", "0", "--wait",
                     "--", "sh", "-c", "touch /workspace/x; id -u; cat /proc/self/uid_map"])  # fmt: skip
        assert r.returncode == 0, r.stderr
        task = d.task(r.stdout.strip())
        uid, mapping = d.log(task["id"]).split("\n", 1)
        assert task["userns"] is True and uid == "0"
        assert mapping.split()[:2] == ["0", mapping.split()[1]] and mapping.split()[1] != "0"


def test_openapi_metrics_node_and_events(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        status, doc = call(d, "GET", "/openapi.json")
        assert status == 200 and "/v1/tasks" in doc["paths"]
        conn = UnixHTTPConnection(str(d.socket), timeout=30)
        conn.request("GET", "/v1/events")
        events = conn.getresponse()
        task = d.submit(["true"], tenant="acme")
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["state"] != "succeeded":
            line = events.readline().decode()
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
        conn.close()
        assert [e["state"] for e in seen] == ["queued", "starting", "running", "succeeded"]
        assert all(e["id"] == task["id"] for e in seen)
        node = d.client.call("GET", "/v1/node")
        assert node["free_cpu_millis"] <= node["allocatable_cpu_millis"] < node["cpu_millis"]
        status, text = call(d, "GET", "/metrics")
        text = text.decode()
        assert 'agentnode_task_outcomes_total{outcome="succeeded"} 1.0' in text, text
        assert "agentnode_task_wait_seconds_bucket" in text


# -- scheduling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "light_share"), [((1, 1), 0.5), ((3, 1), 0.25)])
def test_fair_share_on_real_runs(
    tmp_path: Path, weights: tuple[int, int], light_share: float
) -> None:
    """The heavy tenant queues 100x more tasks; the light one still gets its weight's share."""
    config = (
        "[scheduler]\nclass_running = { normal = 1 }\ntenant_queue_cap = 5000\n"
        f"[tenants.heavy]\nweight = {weights[0]}\n[tenants.light]\nweight = {weights[1]}\n"
    )
    with daemon(tmp_path, config) as d:
        gate = d.submit(GATE, tenant="gate", user="0")
        d.wait(gate["id"], states=("running",))
        in_parallel(lambda i: d.submit(["true"], tenant="heavy"), 1000)
        in_parallel(lambda i: d.submit(["true"], tenant="light"), 10)
        open_gate(d, gate)
        window = 20  # both tenants have queued tasks throughout
        deadline = time.monotonic() + 60
        while True:
            done = call(d, "GET", "/v1/tasks?state=succeeded")[1]
            if len(done) > window or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        runs = sorted((t for t in done if t["tenant"] != "gate"), key=started_at)[:window]
        assert len(runs) == window
        light = sum(t["tenant"] == "light" for t in runs) / window
        assert abs(light - light_share) <= 0.05 + 1e-9, (light, [t["tenant"] for t in runs])


def test_critical_behind_1000_batch_starts_next(tmp_path: Path) -> None:
    config = "[scheduler]\nclass_running = { batch = 1 }\ntenant_queue_cap = 5000\n"
    with daemon(tmp_path, config) as d:
        gate = d.submit(GATE, tenant="bulk", priority="batch", user="0")
        d.wait(gate["id"], states=("running",))
        in_parallel(lambda i: d.submit(["true"], tenant="bulk", priority="batch"), 1000)
        urgent = d.submit(["true"], tenant="pager", priority="critical")
        done = d.wait(urgent["id"])
        assert done["state"] == "succeeded"
        assert d.client.call("GET", "/v1/node")["queued"] == 1000, "no batch task went first"
        open_gate(d, gate)
        after = d.wait(gate["id"])
        assert after["state"] == "succeeded"


def test_concurrency_caps_and_capacity_admission(tmp_path: Path) -> None:
    config = "[tenants.capped]\nrunning = 2\n"
    with daemon(tmp_path, config) as d:
        capped = [d.submit(["sleep", "1"], tenant="capped") for _ in range(6)]
        node = d.client.call("GET", "/v1/node")
        big = node["allocatable_cpu_millis"] * 0.6 / 1000
        heavy = [d.submit(["sleep", "1"], tenant="big", cpus=big) for _ in range(3)]
        finished = [d.wait(t["id"]) for t in capped + heavy]
        assert all(t["state"] == "succeeded" for t in finished)

        def most_at_once(tasks: list[dict[str, Any]]) -> int:
            marks = sorted([(started_at(t), 1) for t in tasks] + [(ended_at(t), -1) for t in tasks])
            level = peak = 0
            for _, step in marks:
                level += step
                peak = max(peak, level)
            return peak

        assert most_at_once(finished[:6]) == 2, "the tenant's running limit held (and was used)"
        assert most_at_once(finished[6:]) == 1, "each big task needs most of the node's CPUs"


def cpu_files(pid: int) -> tuple[int, str]:
    """The CPU weight (cgroup2 `cpu.weight`, or v1 `cpu.shares` as the launcher maps it) and
    the quota (`cpu.max`'s first field, or v1 `cpu.cfs_quota_us`) of process `pid`'s cgroup."""
    groups = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().split():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            groups[c] = path.lstrip("/")
    dirs = task_mod._instance().dirs()
    v1 = next((d.parents[1] for d in dirs if "cpu" in d.parents[1].name.split(",")), None)
    if v1 is not None:
        cpu = v1 / groups["cpu"]
        shares = int((cpu / "cpu.shares").read_text())
        return round(shares * 100 / 1024), (cpu / "cpu.cfs_quota_us").read_text().strip()
    unified = dirs[0].parents[1] / groups[""]
    return int((unified / "cpu.weight").read_text()), (unified / "cpu.max").read_text().split()[0]


def test_cpu_request_is_what_admission_reserves_and_cpus_the_limit(tmp_path: Path) -> None:
    marker = f"cpureq{os.getpid()}x{time.time_ns() % 10**6}"
    with daemon(tmp_path) as d:
        node = d.client.call("GET", "/v1/node")
        allocatable = node["allocatable_cpu_millis"] / 1000
        limit = min(allocatable, 1.0)
        request = int(allocatable / 4 * 100) / 100  # four fit, a fifth does not
        gate = [*GATE, marker]
        tasks = [d.submit(gate, user="0", cpus=limit, cpu_request=request) for _ in range(5)]
        running = [d.wait(t["id"], states=("running",)) for t in tasks[:4]]
        assert all(t["cpu_request"] == request and t["cpus"] == limit for t in running)
        time.sleep(0.5)  # a pass or two of the scheduling loop
        assert d.task(tasks[4]["id"])["state"] == "queued", "the fifth's reservation does not fit"
        assert node["free_cpu_millis"] > d.client.call("GET", "/v1/node")["free_cpu_millis"]
        pids = processes_with(marker)
        assert pids and {cpu_files(p) for p in pids} == {
            (round(request * 100), str(round(limit * 100_000)))
        }, "weight from the reservation (100 per CPU), quota from the limit"
        open_gate(d, tasks[0])
        assert d.wait(tasks[4]["id"], states=("running",))["state"] == "running"
        for t in tasks[1:]:
            open_gate(d, t)
        assert all(d.wait(t["id"])["state"] == "succeeded" for t in tasks)
        plain = d.wait(d.submit(["true"], cpus=0.5)["id"])
        assert plain["cpu_request"] == 0.5, "a command reserves its limit"
        for body, why in (
            ({"cpus": 0.5, "cpu_request": 1}, "out of range"),
            ({"cpu_request": "all"}, "must be a number"),
            ({"cpus": 1000, "cpu_request": 900}, "this node has"),
        ):
            status, err = call(d, "POST", "/v1/tasks", {"command": ["true"], **body})
            assert status == 400 and err["field"] == "cpu_request" and why in err["error"], err
        r = run_cli(["submit", "--socket", str(d.socket), "--cpus", "0.4", "--cpu-request",
                     "0.2", "--wait", "--", "true"])  # fmt: skip
        assert r.returncode == 0, r.stderr
        cli_task = d.client.call("GET", "/v1/tasks?all=1")[-1]
        assert (cli_task["cpus"], cli_task["cpu_request"]) == (0.4, 0.2)
        r = run_cli(["submit", "--socket", str(d.socket), "--cpu-request", "lots", "--", "true"])
        line = r.stderr.strip()
        assert r.returncode == 2 and "\n" not in line, r.stderr
        assert "--cpu-request 'lots': is not a number" in line


# -- stopping tasks -----------------------------------------------------------------------------


def test_timeout_and_cancel_end_the_whole_tree(tmp_path: Path) -> None:
    marker = f"{3000 + os.getpid() % 1000}.{time.time_ns() % 1000}"
    tree = f"sleep {marker}1 & sleep {marker}2 & (sleep {marker}3 &) ; wait"
    with daemon(tmp_path, "[node]\ngrace = 0.5\n") as d:
        timed = d.submit(["sh", "-c", tree], timeout="1s")
        stubborn = d.submit(["sh", "-c", f"trap '' TERM; {tree}"])
        d.wait(stubborn["id"], states=("running",))
        while len(processes_with(f"sleep\0{marker}")) < 6:
            time.sleep(0.02)
        d.client.call("POST", f"/v1/tasks/{stubborn['id']}/cancel")
        cancelled = d.wait(stubborn["id"])
        assert cancelled["state"] == "cancelled" and cancelled["reason"] == "cancelled by request"
        timed_out = d.wait(timed["id"])
        assert timed_out["state"] == "timed_out" and "timeout" in timed_out["reason"]
        assert processes_with(f"sleep\0{marker}") == []
        r = run_cli(["wait", "--socket", str(d.socket), timed["id"]])
        assert r.returncode == 124
        deadline = time.monotonic() + 5  # ended tasks' cgroups go on a background thread
        while live := task_cgroups(d.data):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert live == [], "every task cgroup was removed"
        ahead = [e for e in leftover_cgroups(d.data)[0].iterdir() if e.is_dir()]
        assert len(ahead) <= 8, "only those made ahead for the next starts remain"  # 4 + 4 zygotes


def test_heartbeat_timeout_stops_a_silent_task(tmp_path: Path) -> None:
    code = (
        "import time\nfrom agentnode.sdk import ThisTask\nt = ThisTask()\n"
        "for _ in range(10):\n    t.heartbeat(); time.sleep(0.4)\ntime.sleep(30)\n"
    )
    with daemon(tmp_path, "[node]\ngrace = 0.2\n") as d:
        # 2 s leaves room for Python to start on a loaded machine before the first beat.
        task = d.submit([sys.executable, "-c", code], heartbeat="2s", **PYTHON)
        done = d.wait(task["id"])
        assert done["state"] == "timed_out" and "no heartbeat" in done["reason"]
        assert ended_at(done) - started_at(done) > 4.0, "its heartbeats kept it alive at first"


CHECKPOINTER = """
import sys
import tempfile
from agentnode.sdk import ThisTask
t = ThisTask()
step = int(t.checkpoint() or b"0")
print("attempt", t.info()["attempt"], "resumes at", step, flush=True)
t.save_checkpoint(str(step + 10).encode())
sys.exit(0 if step >= 20 else 1)
"""


def test_retries_back_off_and_pass_the_checkpoint(tmp_path: Path) -> None:
    config = "[retry]\nmax_attempts = 2\nbase = 0.3\nmax = 0.3\n"
    with daemon(tmp_path, config) as d:
        t = d.submit([sys.executable, "-c", CHECKPOINTER], retries=3, **PYTHON)
        done = d.wait(t["id"])
        assert done["state"] == "succeeded" and done["attempt"] == 3, "retries overrides the node"
        assert [d.log(t["id"], n) for n in (1, 2, 3)] == [
            f"attempt {n} resumes at {10 * (n - 1)}\n" for n in (1, 2, 3)
        ]
        runs = [at for state, at in done["history"] if state in ("running", "failed")]
        gaps = [runs[i + 1] - runs[i] for i in (1, 3)]  # failed -> next running
        assert all(0.15 <= g < 5 for g in gaps), gaps
        status, blob = call(d, "GET", f"/v1/tasks/{t['id']}/checkpoint")
        assert status == 200 and blob == b"30"
        again = d.submit(["false"])
        failed = d.wait(again["id"])
        assert failed["state"] == "failed" and failed["attempt"] == 2, "node policy: 2 attempts"


PROBE = """
import json, os, sys, urllib.parse
from agentnode.sdk import Memory, ThisTask
from agentnode.sdk.transport import connect
me, other = ThisTask(), sys.argv[1]
out = {"info": me.info()["id"] == me.id}
mem = Memory()
mem.append("notes", me.id, {"from": me.id})
mem.create_collection("kb", dims=2)
mem.upsert("kb", [{"key": 1, "vector": [1, 0]}])
out["vectors"] = [[h["key"], mem.get_vector("kb", h["key"])["task"]] for h in mem.search("kb", [1, 0])]
try:
    mem.search("missing", [1, 0])
except Exception as e:
    out["missing"] = type(e).__name__
conn, _ = connect(os.environ["AGENTNODE_URL"], timeout=10)
for name, token in (("own", os.environ["AGENTNODE_TOKEN"]), ("forged", me.id + ".1.00")):
    for method, path in (("GET", "/checkpoint"), ("PUT", "/checkpoint"), ("GET", "")):
        conn.request(method, f"/v1/tasks/{other}{path}", b"x" if method == "PUT" else None,
                     {"Authorization": f"Bearer {token}"})
        r = conn.getresponse(); r.read()
        out[f"{name} {method} {path}"] = r.status
from agentnode.sdk.memsocket import SocketClient
out["memory over socket"] = mem.over_socket
path = os.environ["AGENTNODE_MEMORY_SOCKET"]
for name, token in (("own", os.environ["AGENTNODE_TOKEN"]), ("forged", me.id + ".1.00")):
    client = SocketClient(path, token, timeout=10)
    for op, args in (("task.checkpoint.put", {"task": other, "blob": b"x"}),
                     ("task.checkpoint.get", {"task": other}),
                     ("episodic.scan", {"namespace": "notes", "task": other})):
        try:
            client.call(op, args)
            out[f"{name} socket {op}"] = "allowed"
        except Exception as e:
            out[f"{name} socket {op}"] = type(e).__name__
        client.close()
print(json.dumps(out))
"""


def test_task_token_reaches_only_its_own_task(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        victim = d.submit(["true"], tenant="b")
        d.wait(victim["id"])
        probe = d.submit([sys.executable, "-c", PROBE, victim["id"]], tenant="a", **PYTHON)
        assert d.wait(probe["id"])["state"] == "succeeded", d.log(probe["id"])
        out = json.loads(d.log(probe["id"]))
        assert out.pop("info") is True
        assert out.pop("vectors") == [[1, probe["id"]]], "the daemon serves vectors, task-labelled"
        assert out.pop("missing") == "UnknownCollectionError", "memory errors keep their kind"
        assert out.pop("memory over socket") is True, "a task's Memory() takes the socket"
        sockets = {k: out.pop(k) for k in list(out) if " socket " in k}
        assert set(sockets.values()) == {"AuthError"}, sockets
        own = {k: v for k, v in out.items() if k.startswith("own")}
        forged = {k: v for k, v in out.items() if k.startswith("forged")}
        assert set(own.values()) == {403}, own
        assert set(forged.values()) == {401}, forged
        status, _ = call(d, "GET", f"/v1/tasks/{victim['id']}/checkpoint")
        assert status == 404, "the refused PUT wrote nothing"


LONG_PATH_TASK = """
import asyncio, os, time
from agentnode.sdk import Memory, ThisTask, Tools
Memory().append("notes", ThisTask().id, {"ok": 1})
async def tools():
    async with Tools.mcp_client() as c:
        return sorted(t.name for t in (await c.list_tools()).tools)
print("tools", "read_file" in asyncio.run(tools()), flush=True)
print("token", os.environ["AGENTNODE_TOKEN"], flush=True)
time.sleep(60)
"""


def test_a_data_dir_past_the_socket_path_limit_serves_every_door(tmp_path: Path) -> None:
    """Every socket of a node whose data dir makes their paths longer than a unix socket's
    107 bytes is served and reachable, from a task and from the host."""
    from agentnode.sdk import Tools
    from agentnode.sdk.memsocket import SocketClient

    root = tmp_path / ("long-" * 20)
    with daemon(root) as d:
        sockets = d.data / "run" / "sockets"
        paths = [d.socket, *(sockets / n for n in ("task.sock", "mcp.sock", "mcps.sock",
                                                   "memory.sock"))]  # fmt: skip
        assert all(len(os.fsencode(p)) > 107 for p in paths), paths
        task = d.submit([sys.executable, "-c", LONG_PATH_TASK], **PYTHON)
        d.wait(task["id"], states=("running",))
        deadline = time.monotonic() + 60
        while "token " not in (log := d.log(task["id"])) and time.monotonic() < deadline:
            assert d.task(task["id"])["state"] == "running", log
            time.sleep(0.1)
        assert "tools True" in log, log
        token = log.split("token ")[1].split()[0]
        client = SocketClient(str(sockets / "memory.sock"), token, timeout=10)
        try:
            scanned = client.call("episodic.scan", {"namespace": "notes", "task": task["id"]})
        finally:
            client.close()
        assert [r["value"] for r in scanned["records"]] == [{"ok": 1}], scanned

        async def listed() -> list[str]:
            async with Tools.mcp_client(socket=str(sockets / "mcps.sock"), token=token) as c:
                return [t.name for t in (await c.list_tools()).tools]

        assert "read_file" in asyncio.run(listed())
        d.client.call("POST", f"/v1/tasks/{task['id']}/cancel")
        assert d.wait(task["id"])["state"] == "cancelled"
    assert not any(p.exists() for p in paths), "the node removes its sockets at its stop"


# -- the daemon's own lifecycle -----------------------------------------------------------------


def test_kill_9_then_restart_accounts_for_every_task(tmp_path: Path) -> None:
    marker = f"{4000 + os.getpid() % 1000}.{time.time_ns() % 1000}"
    config = (
        "[node]\ngrace = 0.5\n[scheduler]\nclass_running = { normal = 1 }\n"
        "[retry]\nmax_attempts = 2\nbase = 0\n"
    )
    d = Daemon(tmp_path, config)
    d.start()
    try:
        long = d.submit(["sh", "-c", f"sleep {marker}; exit 7"])
        d.wait(long["id"], states=("running",))
        queued = in_parallel(lambda i: d.submit(["true"], tenant=f"t{i % 3}")["id"], 30)
        while not processes_with(f"sleep\0{marker}"):
            time.sleep(0.02)
        assert leftover_cgroups(d.data)
        d.stop(signal.SIGKILL)
        time.sleep(0.5)
        assert processes_with(f"sleep\0{marker}"), "the task outlives its daemon (live restore)"
        assert leftover_cgroups(d.data), "and so do its cgroups"
        # One slot for the re-adopted long task, one through which the others pass one at a time.
        (tmp_path / "agentnode.toml").write_text(config.replace("normal = 1", "normal = 2"))
        d.start()
        assert "0 lost in the last run, 1 re-adopted" in next(x for x in d.lines if "capacity" in x)
        again = d.task(long["id"])
        assert (again["state"], again["attempt"]) == ("running", 1), again
        done = [d.wait(q) for q in queued]
        assert all(t["state"] == "succeeded" for t in done), "every acknowledged task ran"
        # Popped order ("starting"; two starts may finish their sandboxes in either order, and
        # tasks popped in one batch share a time, which says nothing about their order).
        starts = sorted(
            done,
            key=lambda t: (
                next(at for s, at in t["history"] if s == "starting"),
                t["submitted_at"],
            ),
        )
        by_tenant = {
            tenant: [t["id"] for t in starts if t["tenant"] == tenant]
            for tenant in ("t0", "t1", "t2")
        }
        for tenant, ids in by_tenant.items():
            mine = sorted(
                (t for t in done if t["tenant"] == tenant), key=lambda t: t["submitted_at"]
            )
            assert ids == [t["id"] for t in mine], f"{tenant}'s tasks started in submission order"
        d.client.call("POST", f"/v1/tasks/{long['id']}/cancel")
        assert d.wait(long["id"])["state"] == "cancelled"
        assert processes_with(f"sleep\0{marker}") == []
    finally:
        if d.proc is not None:
            d.stop()


def test_sigterm_stops_gracefully_and_sighup_reloads(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "[node]\ngrace = 0.5\n[tenants.a]\nweight = 1\n")
    d.start()
    running = d.submit(
        ["sh", "-c", "trap 'echo got TERM; exit 0' TERM; echo ready; sleep 60 & wait"]
    )
    d.wait(running["id"], states=("running",))
    while d.log(running["id"]) != "ready\n":
        time.sleep(0.02)
    d.config.write_text("[tenants.a]\nweight = 0\n")
    os.kill(d.pid, signal.SIGHUP)
    line = d.wait_for_line("agentnode: reload failed")
    assert "tenants.a.weight: must be an integer >= 1" in line
    d.config.write_text("[node]\ngrace = 0.5\n[tenants.a]\nweight = 4\n")
    os.kill(d.pid, signal.SIGHUP)
    d.wait_for_line("agentnode: reloaded")
    assert d.stop(signal.SIGTERM) == 0
    assert d.lines[-1] == "agentnode: stopped"
    assert not d.socket.exists() and not (d.data / "run" / "sockets" / "task.sock").exists()
    assert leftover_cgroups(d.data) == []
    assert d.log(running["id"]) == "ready\ngot TERM\n", "the task got SIGTERM and its grace"
    d.start()
    after = d.task(running["id"])
    states = [s for s, _ in after["history"]]
    assert states[3:5] == ["lost", "queued"] and after["attempt"] == 2, "lost: it runs once more"
    assert after["reason"] == "the node agent stopped"
    d.stop()


def test_logs_follow_streams_while_running(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        t = d.submit(["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done"])
        conn = UnixHTTPConnection(str(d.socket), timeout=30)
        conn.request("GET", f"/v1/tasks/{t['id']}/logs?follow=1")
        resp = conn.getresponse()
        first = resp.readline()
        at_first = d.task(t["id"])["state"]
        rest = resp.read()
        conn.close()
        assert first == b"line 1\n" and at_first == "running", "lines arrive as they are written"
        assert rest == b"line 2\nline 3\n"
