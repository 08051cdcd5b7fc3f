"""Live restore: tasks outlive the node agent (kill -9, SIGTERM with keep_tasks) and the next
start re-adopts them; a host reboot loses them, and they retry once unless they opt out.

Real daemons (`agentnode run` subprocesses) on private data dirs; the tasks are real sandboxes,
the exit records real BPF programs pinned under a real bpffs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentnode import _native
from agentnode.egress.enforce import PROGRAMS_PIN
from agentnode.isolation import task as task_mod
from agentnode.node.beats import BeatLog
from agentnode.node.restore import node_id, pin_dir, release_pins, start_ticks
from agentnode.tasks.model import State
from conftest import processes_with
from support.egress_bpf import maps_of, pinned_program_ids, wait_gone
from support.egress_world import HOST4, OTHER4, World
from support.node_daemon import Daemon
from test_egress_inbound import wait_for
from test_egress_tasks import subnet
from test_node import PYTHON, REPO, ended_at, leftover_cgroups, open_gate, started_at
from test_node_robust import seed, small

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: Tasks in the kill -9 test (the issue asks 50; 20 keep it within a minute on the two shared
#: cores of the test machine, and still start from zygotes and clones both).
N = 20
CONFIG = "[node]\ngrace = 0.5\n[retry]\nbase = 0\n"


def writer(marker: str, lines: int, code: int, *, every: float = 0.1) -> list[str]:
    """A task that writes `lines` numbered lines, one per `every` seconds, then exits `code`."""
    script = (
        f"i=0; while [ $i -lt {lines} ]; do echo {marker} line $i; i=$((i+1)); "
        f"sleep {every}; done; exit {code}"
    )
    return ["sh", "-c", script, marker]


def gated(marker: str, code: int) -> list[str]:
    """A task that writes a numbered line every 0.1 s until /gate/end exists, then exits `code`."""
    script = (
        f"i=0; while [ ! -e /gate/end ]; do echo {marker} line $i; i=$((i+1)); sleep 0.1; "
        f"done; exit {code}"
    )
    return ["sh", "-c", script, marker]


def prober(marker: str, seconds: float) -> list[str]:
    """Writes a line every 0.1 s for `seconds`, and tries a connection every second: refused
    (network none: its own loopback only, nothing listening), while its agent is down as
    before."""
    code = (
        "import socket, sys, time\n"
        f"end = time.monotonic() + {seconds}\n"
        "n = 0\n"
        "while time.monotonic() < end:\n"
        "    print('line', n, flush=True); n += 1\n"
        "    if n % 10 == 0:\n"
        "        try:\n"
        "            socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "            print('CONNECTED', flush=True)\n"
        "        except OSError as e:\n"
        "            print('refused', e.errno, flush=True)\n"
        "    time.sleep(0.1)\n"
        "print('done', n, flush=True)\n"
    )
    return ["python3", "-c", code, marker]


def pids_of(marker: str) -> list[int]:
    """Task inits (pid 1 of their pid namespace) with `marker` as their last argument."""
    found = []
    for p in processes_with(marker):
        try:
            args = Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            nspid = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines()
                         if x.startswith("NSpid:")).split()  # fmt: skip
        except (OSError, StopIteration):
            continue
        if args[-1] == marker.encode() and nspid[-1] == "1":
            found.append(p)
    return found


def cgroup_of(pid: int) -> str:
    """`NAME@ID` of the cgroup2 node process `pid` is in (names are reused, ids are not)."""
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x[:3] == "0::")
    path = task_mod._instance().dirs()[0].parents[1] / line[3:].strip().lstrip("/")
    return f"{path.name}@{path.stat().st_ino}"


def task_dirs(d: Daemon) -> set[str]:
    """`NAME@ID` of the node's task cgroups in cgroup2 (tasks', zygotes', made-ahead ones)."""
    return {
        f"{t.name}@{t.stat().st_ino}"
        for inst in leftover_cgroups(d.data)
        if inst.parent == task_mod._instance().dirs()[0].parent
        for t in inst.iterdir()
        if t.is_dir()
    }


def no_pins(d: Daemon) -> None:
    """After a clean stop: the exit recorder's pins and the node's own bpffs are gone."""
    assert not d.pins_left()
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert str(d.data / "bpf") not in mounts
    assert not (d.data / "bpf").exists()


def lines_of(d: Daemon, task_id: str) -> list[str]:
    return d.log(task_id).splitlines()


def test_tasks_outlive_a_kill_9_and_are_re_adopted(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG)
    d.start()
    tag = f"rs{os.getpid()}x{time.time_ns() % 10**6}"
    try:
        # Gated ones end while no agent runs (the test opens the gate then); the others run
        # across the gap and end after it.
        gate = tmp_path / "gate"
        gate.mkdir()
        specs: dict[str, tuple[list[str], int, int]] = {}
        for i in range(N - 2):
            marker, code = f"{tag}-{i}", i % 4
            if i % 3 == 0:
                specs[marker] = (gated(marker, code), 0, code)
            else:
                specs[marker] = (writer(marker, 150, code), 150, code)
        tasks = {
            m: d.submit(cmd, cpus=0.05, ro=[f"{gate}:/gate"])["id"]
            for m, (cmd, _, _) in specs.items()
        }
        probe = d.submit(prober(f"{tag}-probe", 12.0), cpus=0.05)["id"]
        # Its deadline is from its start: the restart does not give it a new 14 s.
        late = d.submit(["sh", "-c", "sleep 300", f"{tag}-late"], timeout="14s")["id"]
        for t in (*tasks.values(), probe, late):
            d.wait(t, states=("running",), timeout=60)
        before = {t: d.task(t).get("stats") for t in tasks.values()}
        inits = {m: pids_of(m) for m in specs}
        assert all(len(p) == 1 for p in inits.values()), inits
        d.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        (gate / "end").touch()
        time.sleep(3.0)  # the gap: tasks write on, gated ones end, the prober is refused
        alive = {m for m, p in inits.items() if start_ticks(p[0]) is not None}
        assert alive, "long tasks outlive their agent"
        running_cgroups = {cgroup_of(p) for m in [*alive, f"{tag}-probe", f"{tag}-late"]
                           for p in pids_of(m)}  # fmt: skip
        gap_dirs = task_dirs(d)
        assert running_cgroups < gap_dirs, "zygotes' and made-ahead cgroups are left too"
        [node] = [
            i for i in leftover_cgroups(d.data) if i.parent == task_mod._instance().dirs()[0].parent
        ]
        for other in gap_dirs - running_cgroups:
            procs = (node / other.split("@")[0] / "cgroup.procs").read_text().split()
            assert procs == [], f"{other}: zygotes die with their daemon, {procs}"
        # What runs at the restart is re-adopted; the gated ones ended. On a loaded host a long
        # one may end too before the restart: count what runs just before and just after it.
        longs = [m for m, (_, lines, _) in specs.items() if lines == 150]
        longs += [f"{tag}-probe", f"{tag}-late"]
        running_before = sum(1 for m in longs if pids_of(m))
        d.start()
        restarted_at = time.time()
        running_after = sum(1 for m in longs if pids_of(m))
        restart_s = time.monotonic() - killed_at
        adopted = int(next(x for x in d.lines if "capacity" in x).split(" re-adopted")[0]
                      .rsplit(" ", 1)[1])  # fmt: skip
        assert running_after <= adopted <= running_before, (running_after, running_before)
        assert adopted >= len(longs) // 2, "most long tasks outlived the gap"
        # The sweep spared the adopted tasks' cgroups and removed the rest (the zygotes', the
        # made-ahead ones, those of tasks that ended).
        kept = task_dirs(d) & gap_dirs
        assert kept <= running_cgroups, kept - running_cgroups
        assert {cgroup_of(p) for m in alive for p in pids_of(m)} <= kept
        checked = 0
        for t in tasks.values():
            now, then = d.task(t), before[t]
            if now["state"] == "running" and then is not None:
                s = now["stats"]
                assert s["cpu_user_s"] + s["cpu_system_s"] >= (
                    then["cpu_user_s"] + then["cpu_system_s"]
                ), "accounting is the cgroup's: it goes on"
                assert s["wall_s"] >= then["wall_s"] + restart_s - 0.5
                checked += 1
        assert checked > 0
        done = {m: d.wait(tasks[m], timeout=60) for m in specs}
        for m, (_, lines, code) in specs.items():
            t = done[m]
            assert t["attempt"] == 1, (m, t)
            assert t["exit_code"] == code, (m, t)
            assert t["state"] == ("succeeded" if code == 0 else "failed"), (m, t)
            out = lines_of(d, tasks[m])
            assert out == [f"{m} line {i}" for i in range(lines or len(out))] and out, m
        p = d.wait(probe, timeout=60)
        assert (p["state"], p["exit_code"]) == ("succeeded", 0), p
        out = lines_of(d, probe)
        numbered = [int(x.split()[1]) for x in out if x.startswith("line ")]
        assert numbered == list(range(len(numbered))) and out[-1] == f"done {len(numbered)}"
        assert "CONNECTED" not in out and sum(x.startswith("refused") for x in out) >= 5
        t = d.wait(late, timeout=60)
        assert t["state"] == "timed_out", t
        ran = t["history"][-1][1] - next(at for s, at in t["history"] if s == "running")
        # Re-armed from its start, not the restart's; a restart after the deadline (a loaded
        # host) ends it at once.
        started = next(at for s, at in t["history"] if s == "running")
        latest = max(16.0, restarted_at - started + 2.0)
        assert 13.5 < ran < latest, f"timed out {ran:.1f} s after its start: deadline re-armed"
        assert task_dirs(d) & gap_dirs == set(), "the adopted tasks' cgroups go when they end"
    finally:
        if d.proc is not None:
            d.stop()
    assert leftover_cgroups(d.data) == []
    no_pins(d)


#: Uses the task API (checkpoint and heartbeats, through agentnode.sdk) before the daemon goes,
#: heartbeats on through the gap (refused then), and uses it again once its gate opens.
API_USER = """
import os, time
from agentnode.sdk import ThisTask
t = ThisTask(timeout=5)
t.save_checkpoint(b"before")
t.heartbeat()
print("before", t.checkpoint().decode(), flush=True)
refused = 0
while not os.path.exists("/workspace/go"):
    try:
        t.heartbeat()
    except Exception:
        refused += 1
    time.sleep(0.2)
t.save_checkpoint(b"after")
t.heartbeat()
print("after", t.checkpoint().decode(), refused > 0, flush=True)
"""


def test_a_re_adopted_task_reaches_the_new_daemon_and_is_judged_on_heartbeats(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, CONFIG)
    d.start()
    tag = f"hb{os.getpid()}x{time.time_ns() % 10**6}"
    try:
        user = d.submit([sys.executable, "-c", API_USER, tag], heartbeat="3s", **PYTHON)
        silent = d.submit(["sh", "-c", "sleep 300", f"{tag}-silent"], heartbeat="6s")["id"]
        d.wait(silent, states=("running",))
        seen_running = time.monotonic()
        deadline = seen_running + 30
        while not lines_of(d, user["id"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lines_of(d, user["id"]) == ["before before"], "it reaches the first daemon"
        # The silent task has ~2.5 s of its 6 s left when its daemon goes.
        time.sleep(max(0.0, seen_running + 3.5 - time.monotonic()))
        d.stop(signal.SIGKILL)
        time.sleep(3.0)  # longer than the first task's heartbeat period
        d.start()
        restarted = time.time()
        assert "2 re-adopted" in next(x for x in d.lines if "capacity" in x)
        # Its heartbeats after the restart reach the new daemon (it is not judged for the gap,
        # and well past its 3 s period it still runs).
        time.sleep(4.0)
        assert d.task(user["id"])["state"] == "running", d.task(user["id"])
        open_gate(d, user)
        done = d.wait(user["id"], timeout=60)
        assert (done["state"], done["exit_code"], done["attempt"]) == ("succeeded", 0, 1), done
        assert lines_of(d, user["id"]) == ["before before", "after after True"]
        # The silent one is judged from its last heartbeat (its start), the gap not counted:
        # neither at once nor a whole new period after the restart.
        quiet = d.wait(silent, timeout=60)
        assert quiet["state"] == "timed_out" and "no heartbeat" in quiet["reason"], quiet
        assert ended_at(quiet) - started_at(quiet) > 6.0 + 3.0, quiet["history"]
        assert ended_at(quiet) - restarted < 4.5, (ended_at(quiet) - restarted, quiet["history"])
        assert not (d.data / "beats" / silent).exists(), "an ended task's times go"
    finally:
        if d.proc is not None:
            d.stop()
    assert leftover_cgroups(d.data) == []
    no_pins(d)


def test_a_heartbeat_deadline_goes_on_from_the_last_check(tmp_path: Path) -> None:
    beats = BeatLog(tmp_path / "beats")
    assert beats.missed_s("a") == 0.0, "nothing recorded: a whole period"
    for name in ("a", "b", "c"):
        beats.beat(name)
    beats.checked()
    now = time.time()
    os.utime(tmp_path / "beats" / "a", (now, now - 5.0))
    os.utime(tmp_path / "beats" / "b", (now, now + 1.0))  # a beat after the last check
    os.utime(tmp_path / "beats" / ".checked", (now, now))
    assert 4.9 < beats.missed_s("a") <= 5.0 and beats.missed_s("b") == 0.0
    beats.ended("c")
    beats.ended("c")
    beats.sweep(keep={"a"})
    assert sorted(p.name for p in (tmp_path / "beats").iterdir()) == [".checked", "a"]


def test_sigterm_with_keep_tasks_leaves_them_for_the_next_start(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG.replace("[node]\n", "[node]\nkeep_tasks = true\n"))
    d.start()
    tag = f"kt{os.getpid()}x{time.time_ns() % 10**6}"
    # Gated: they run until the test opens the gate after the restart, however long the stop
    # and start take on a busy box.
    gate = tmp_path / "gate"
    gate.mkdir()
    try:
        ids = {
            code: d.submit(gated(f"{tag}-{code}", code), ro=[f"{gate}:/gate"])["id"]
            for code in (0, 3, 9)
        }
        for t in ids.values():
            d.wait(t, states=("running",))
        assert d.stop(signal.SIGTERM) == 0
        assert "run on, for the next start" in "\n".join(d.lines)
        assert all(pids_of(f"{tag}-{c}") for c in ids), "the tasks run on"
        assert leftover_cgroups(d.data), "their cgroups stay"
        assert d.pins_left(), "and the exit recorder's pins"
        d.config.write_text(CONFIG)
        d.start()
        assert "3 re-adopted" in next(x for x in d.lines if "capacity" in x)
        (gate / "end").touch()
        for code, t in ids.items():
            done = d.wait(t, timeout=60)
            assert (done["exit_code"], done["attempt"]) == (code, 1), done
            got = lines_of(d, t)
            assert got and got == [f"{tag}-{code} line {i}" for i in range(len(got))], got
    finally:
        if d.proc is not None:
            d.stop()
    assert leftover_cgroups(d.data) == []
    no_pins(d)


def test_a_host_reboot_loses_tasks_and_retries_them_once(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG)
    d.start()
    tag = f"rb{os.getpid()}x{time.time_ns() % 10**6}"
    try:
        again = d.submit(["sh", "-c", "sleep 60; :", f"{tag}-a"])["id"]
        once = d.submit(["sh", "-c", "sleep 60; :", f"{tag}-b"], retry_lost=False)["id"]
        assert d.task(once)["retry_lost"] is False
        for t in (again, once):
            d.wait(t, states=("running",))
        before = task_dirs(d)
        d.stop(signal.SIGKILL)
        # The reboot: the tasks die with the host, and so do bpffs and its pins.
        inits = [p for m in ("a", "b") for p in pids_of(f"{tag}-{m}")]
        assert len(inits) == 2, inits
        for p in inits:
            os.kill(p, signal.SIGKILL)
        _native.ExitRecorder.remove(pin_dir(d.data))
        subprocess.run(["umount", str(d.data / "bpf")], check=False, capture_output=True)
        d.start()
        assert "2 lost in the last run" in next(x for x in d.lines if "capacity" in x)
        gone = d.task(once)
        assert gone["state"] == "lost" and "nothing recorded how" in gone["reason"], gone
        retried = d.wait(again, states=("running",), timeout=30)
        assert retried["attempt"] == 2
        assert [s for s, _ in retried["history"]][3:5] == ["lost", "queued"]
        assert task_dirs(d) & before == set(), "the dead tasks' cgroups are swept"
        d.client.call("POST", f"/v1/tasks/{again}/cancel")
        assert d.wait(again)["state"] == "cancelled"
    finally:
        if d.proc is not None:
            d.stop()
    no_pins(d)


def test_a_recycled_pid_is_never_adopted_nor_killed(tmp_path: Path) -> None:
    # A process that is not the task: the recorded pid, with another start time.
    other = subprocess.Popen(["sleep", "60"])
    try:
        ticks = start_ticks(other.pid)
        assert ticks is not None
        d = Daemon(tmp_path, CONFIG)
        (d.data / "tasks").mkdir(parents=True)
        [rec] = seed(d.data, small(["true"], retry_lost=False), state=State.RUNNING)
        _set_process(d.data, rec, (other.pid, ticks - 1))
        d.start()
        try:
            t = d.task(rec)
            assert t["state"] == "lost", t
            assert "1 lost in the last run" in next(x for x in d.lines if "capacity" in x)
            assert other.poll() is None, "the process the pid now names is left alone"
        finally:
            d.stop()
        no_pins(d)
    finally:
        other.kill()
        other.wait()


def _set_process(data: Path, task_id: str, process: tuple[int, int]) -> None:
    from dataclasses import replace

    from agentnode.tasks import TaskStore
    from agentnode.tasks.store import decode

    store = TaskStore(data / "tasks")
    raw = store.get(task_id)
    assert raw is not None
    task: Any = decode(raw)
    store.put_now(replace(task, process=process))
    store.close()


def test_the_kernel_records_exit_statuses_of_watched_processes(tmp_path: Path) -> None:
    where = pin_dir(tmp_path)
    try:
        recorder = _native.ExitRecorder(where)
        code = (
            "import os, sys, threading, time\n"
            "how = sys.argv[1]\n"
            "if how == 'thread':\n"
            "    threading.Thread(target=lambda: os._exit(7)).start(); time.sleep(30)\n"
            "time.sleep(0.2 if how == 'code' else 30)\n"
            "sys.exit(3)\n"
        )
        procs = {
            how: subprocess.Popen(["python3", "-c", code, how])
            for how in ("code", "kill", "thread")
        }
        ticks = {how: start_ticks(p.pid) for how, p in procs.items()}
        for how, p in procs.items():
            t = ticks[how]
            assert t is not None
            recorder.watch(p.pid, t)
        procs["kill"].kill()
        for p in procs.values():
            p.wait()  # reaped here: the record does not depend on who reaps
        statuses = {how: recorder.status(p.pid, ticks[how] or 0) for how, p in procs.items()}
        assert statuses == {"code": 3 << 8, "kill": signal.SIGKILL, "thread": 7 << 8}
        p = procs["code"]
        assert recorder.status(p.pid, (ticks["code"] or 0) + 1) is None, "another process"
        again = _native.ExitRecorder(where)
        assert again.status(p.pid, ticks["code"] or 0) == 3 << 8, "the pins outlive the handle"
        again.forget(p.pid)
        assert recorder.status(p.pid, ticks["code"] or 0) is None
        again.forget(p.pid)  # a pid no longer watched: nothing to do, no error
    finally:
        release_pins(tmp_path)
    assert not (tmp_path / "bpf").exists()


def test_the_launcher_reads_an_outliving_task_start_time(ws: Path) -> None:
    """The start time a node records and watches comes with the started task (read on the
    spawning thread, not the node's event loop), from zygotes and clones alike; a task that
    dies with its starter has none."""
    from agentnode.isolation import spawn

    tasks = [spawn(["sleep", "30"], workspace=ws, outlive=True) for _ in range(3)]
    plain = spawn(["sleep", "30"], workspace=ws)
    try:
        for t in tasks:
            assert t.start_ticks is not None and t.start_ticks == start_ticks(t.pid), t.pid
        assert plain.start_ticks is None
    finally:
        for t in (*tasks, plain):
            t.close()


def test_a_discarded_node_killed_and_never_restarted_leaves_nothing(tmp_path: Path) -> None:
    """What the test harness does with a node whose daemon was killed and will not start again
    (`Daemon.discard`, at the end of every test that made one): its outliving tasks are
    killed, and its cgroup subtree and pins removed."""
    d = Daemon(tmp_path, CONFIG)
    d.start()
    marker = f"dc{os.getpid()}x{time.time_ns() % 10**6}"
    t = d.submit(["sh", "-c", "sleep 300", marker])["id"]
    d.wait(t, states=("running",))
    d.stop(signal.SIGKILL)
    assert pids_of(marker) and leftover_cgroups(d.data) and d.pins_left(), "all outlive it"
    d.discard()
    assert pids_of(marker) == []
    assert leftover_cgroups(d.data) == []
    no_pins(d)
    d.discard()  # again, or of a node that never ran: nothing to do
    Daemon(tmp_path / "never").discard()
    # A node's own bpffs left mounted with nothing pinned in it goes too.
    empty = Daemon(tmp_path / "empty")
    (empty.data / "bpf").mkdir(parents=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(empty.data / "bpf")], check=True)
    empty.discard()
    no_pins(empty)


# -- tasks with network egress ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """Test hosts in a netns of the test's own: HOST4:8080 and :9090 (allowed), OTHER4:8080
    (denied), and a DNS server at HOST4:53 answering allowed.test."""
    with World() as w:
        w.serve(
            tcp=[[HOST4, 8080], [HOST4, 9090], [OTHER4, 8080]],
            dns={"addrs": [HOST4], "records": {"allowed.test": [HOST4]}, "ttl": 60,
                 "log": os.devnull},
        )  # fmt: skip
        yield w


def egress_config() -> str:
    """CONFIG with the node's bridge on a random subnet and DNS upstream the world's server."""
    return CONFIG + f'[network]\nsubnet = "{subnet()}"\ndns_upstream = "{HOST4}:53"\n'


def ops(*items: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).parent / "support" / "egress_client.py"),
            json.dumps(list(items))]  # fmt: skip


def connect(host: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"op": "connect", "host": host, "port": port, "timeout": 2, **kw}


def resolve(name: str) -> dict[str, Any]:
    return {"op": "resolve", "name": name, "server": OTHER4}


#: A task that runs egress_client.py (as root, this checkout bound in), with the gate.
def prober_fields(gate: Path) -> dict[str, Any]:
    return {"user": "0", "ro": [str(REPO), f"{gate}:/gate"],
            "env": {"PYTHONPATH": str(REPO / "python")}}  # fmt: skip


#: What an egress prober does: before the daemon goes, in the gap (denied, allowed, DNS), and
#: after the restart (DNS answers again, from the new forwarder, which learns the address).
PROBE = (
    connect(HOST4, 8080),
    {"op": "wait_for", "path": "/gate/gap"},
    connect(OTHER4, 8080),
    connect(HOST4, 8080, send=10),
    resolve("allowed.test"),
    {"op": "wait_for", "path": "/gate/after"},
    resolve("allowed.test"),
    connect("allowed.test", 9090),
    connect(OTHER4, 8080),
)
#: The same in the host's netns (--net host): no DNS of its own, the CIDR rules alone.
HOST_PROBE = (
    connect(HOST4, 8080),
    {"op": "wait_for", "path": "/gate/gap"},
    connect(OTHER4, 8080),
    connect(HOST4, 8080, send=10),
    {"op": "wait_for", "path": "/gate/after"},
    connect(HOST4, 8080, send=10),
)


def results(d: Daemon, task_id: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in lines_of(d, task_id)]


def wait_lines(d: Daemon, task_id: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(lines_of(d, task_id)) < n:
        assert time.monotonic() < deadline, (task_id, lines_of(d, task_id))
        time.sleep(0.05)


def check_probe(out: list[dict[str, Any]], *, updated: bool = False) -> None:
    """The egress prober's results: the gap's denial enforced, its allowed connection made, its
    DNS failed closed; after the restart, DNS answers and the learned address is reachable, and
    OTHER4 only if its policy was `updated` to allow it."""
    assert len(out) == 7, out
    before, denied, allowed, gap_dns, dns, by_name, other = out
    assert before["ok"] and allowed == {**allowed, "ok": True, "reply": "10"}, out
    assert (denied["ok"], denied["errno"]) == (False, errno.EPERM), out
    assert not gap_dns["ok"], f"no DNS answer while no agent runs: {out}"
    assert dns["ok"] and dns["addrs"] == [HOST4], out
    assert by_name["ok"], f"the new forwarder learned the address into the task's map: {out}"
    assert other["ok"] if updated else other["errno"] == errno.EPERM, out


def check_host_probe(out: list[dict[str, Any]]) -> None:
    before, denied, allowed, after = out
    assert before["ok"] and allowed["reply"] == "10" and after["reply"] == "10", out
    assert (denied["ok"], denied["errno"]) == (False, errno.EPERM), out


def task_netns(pid: int) -> str:
    """The /run/netns name of the netns process `pid` is in."""
    inode = os.stat(f"/proc/{pid}/ns/net").st_ino
    return next(p.name for p in Path("/run/netns").iterdir() if p.stat().st_ino == inode)


def egress_pins(d: Daemon) -> Path:
    """The node's per-task egress pins (without mounting a bpffs to look)."""
    own = d.data / "bpf" / "node" / "egress"
    return (
        own if own.parent.exists() else Path("/sys/fs/bpf/agentnode") / node_id(d.data) / "egress"
    )


def pin_of(pid: int) -> str:
    return "c" + cgroup_of(pid).split("@")[1]


def kernel_objects(world: World) -> dict[str, set[str]]:
    """What task networks hold in the node's netns (the test's own): task veths and the bridge,
    and the nftables tables."""
    links = subprocess.run(["ip", "-n", world.task, "-o", "link"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    tables = subprocess.run(["ip", "netns", "exec", world.task, "nft", "list", "tables"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {
        "links": {x.split(":")[1].strip().split("@")[0] for x in links.splitlines()
                  if ": anv" in x or ": agentnode" in x},
        "nft": {x for x in tables.splitlines() if "agentnode" in x},
    }  # fmt: skip


def netns_left(names: set[str]) -> set[str]:
    """Those of the task netns `names` that still exist (other tests make and remove theirs)."""
    return {n for n in names if (Path("/run/netns") / n).exists()}


def stop_all(d: Daemon, config: str) -> None:
    """Stops the daemon and every task it left, also when a test failed in a gap: a daemon on
    `config` (no keep_tasks) is started to re-adopt them first."""
    if d.proc is None:
        d.config.write_text(config)
        d.start()
    d.stop()


def audit_denials(d: Daemon, task_id: str) -> list[dict[str, Any]]:
    log = (d.data / "audit" / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, log)
            if r["kind"] == "egress_denied" and r["task"] == task_id]  # fmt: skip


def test_egress_tasks_outlive_a_kill_9_with_their_policy_enforced(
    tmp_path: Path, world: World
) -> None:
    netns = ("nsenter", f"--net=/run/netns/{world.task}")
    config = egress_config()
    d = Daemon(tmp_path, config, netns)
    base = kernel_objects(world)
    mine: set[str] = set()
    d.start()
    tag = f"eg{os.getpid()}x{time.time_ns() % 10**6}"
    gate = tmp_path / "gate"
    gate.mkdir()
    try:
        # Network none and egress tasks, each writing steadily; some of each end in the gap.
        specs: dict[str, tuple[list[str], int, int, str]] = {}
        # 48 of them and the two probers: the 50 tasks across a kill -9.
        for i in range(48):
            marker, code, net = f"{tag}-{i}", i % 4, ("none", "egress")[i % 2]
            if i % 6 < 2:
                specs[marker] = (gated(marker, code), 0, code, net)
            else:
                specs[marker] = (writer(marker, 120, code), 120, code, net)
        policy = {"allow": [f"{HOST4}:8080"], "allow_hosts": ["allowed.test:9090"]}
        tasks = {
            m: d.submit(cmd, cpus=0.03, ro=[f"{gate}:/gate"], network=net,
                        **(policy if net == "egress" else {}))["id"]
            for m, (cmd, _, _, net) in specs.items()
        }  # fmt: skip
        probe = d.submit(ops(*PROBE), network="egress", **policy, **prober_fields(gate))["id"]
        host = d.submit(ops(*HOST_PROBE), network="host", allow=[f"{HOST4}:8080"],
                        **prober_fields(gate))["id"]  # fmt: skip
        for t in (*tasks.values(), probe, host):
            d.wait(t, states=("running",), timeout=60)
        wait_lines(d, probe, 1)
        wait_lines(d, host, 1)
        # The probers run until the test lets them end: accounting is checked on them at least.
        watched = {**tasks, "probe": probe, "host": host}
        before = {m: d.task(t).get("stats") for m, t in watched.items()}
        inits = {m: pids_of(m) for m in specs}
        assert all(len(p) == 1 for p in inits.values()), inits
        mine = {task_netns(p[0]) for m, p in inits.items() if specs[m][3] == "egress"}
        # The egress tasks that end in the gap: their netns and pins must go at the restart.
        ending = {m for m, (_, lines, _, net) in specs.items() if lines == 0 and net == "egress"}
        gone = {(task_netns(inits[m][0]), pin_of(inits[m][0])) for m in ending}
        assert netns_left({ns for ns, _ in gone}) == {ns for ns, _ in gone}
        assert {p for _, p in gone} <= {p.name for p in egress_pins(d).iterdir()}
        # The node's programs, loaded once for all its tasks, pinned for the next agent.
        programs = pinned_program_ids(egress_pins(d) / PROGRAMS_PIN)
        assert len(programs) == 9
        maps = maps_of(programs.values())
        d.stop(signal.SIGKILL)
        (gate / "end").touch()
        (gate / "gap").touch()
        # The gap: the probers are denied and allowed as before, with no agent at all.
        wait_lines(d, probe, 4)
        wait_lines(d, host, 3)
        time.sleep(1.0)
        running_before = sum(1 for m in specs if pids_of(m))
        d.start()
        running_after = sum(1 for m in specs if pids_of(m))
        assert pinned_program_ids(egress_pins(d) / PROGRAMS_PIN) == programs, (
            "taken over, not reloaded"
        )
        for ns, pin in gone:
            assert not netns_left({ns}), "an ended task's netns goes"
            assert not (egress_pins(d) / pin).exists(), "and its pinned enforcement"
        adopted = int(next(x for x in d.lines if "capacity" in x).split(" re-adopted")[0]
                      .rsplit(" ", 1)[1])  # fmt: skip
        # The probers wait for the test; a writer may end between the counts and the restart.
        assert running_after + 2 <= adopted <= running_before + 2, (adopted, running_before)
        # Accounting goes on: the cgroups' and the pinned maps' own counters.
        checked = 0
        for m, t in watched.items():
            now, then = d.task(t), before[m]
            if now["state"] == "running" and then is not None and now["network"] != "none":
                cpu = [x["cpu_user_s"] + x["cpu_system_s"] for x in (now["stats"], then)]
                assert cpu[0] >= cpu[1] and now["stats"]["wall_s"] > then["wall_s"], m
                checked += 1
        assert checked >= 2
        # The prober's counters went on through the gap (the maps are the pinned ones).
        stats = d.task(probe)["stats"]["network"]
        assert stats["connections_denied"] >= 1 and stats["connections_allowed"] >= 2, stats
        (gate / "after").touch()
        done = {m: d.wait(tasks[m], timeout=90) for m in specs}
        for m, (_, lines, code, net) in specs.items():
            t = done[m]
            assert (t["attempt"], t["exit_code"]) == (1, code), (m, net, t.get("reason"), t)
            assert t["state"] == ("succeeded" if code == 0 else "failed"), (m, t)
            out = lines_of(d, tasks[m])
            assert out and out == [f"{m} line {i}" for i in range(lines or len(out))], (m, net)
        for t, check in ((probe, check_probe), (host, check_host_probe)):
            p = d.wait(t, timeout=60)
            assert (p["state"], p["exit_code"], p["attempt"]) == ("succeeded", 0, 1), p
            check(results(d, t))
        # The gap's denial reached the audit log after the restart (its ring buffer is pinned).
        assert any(a["address"] == OTHER4 and a["port"] == 8080 for a in audit_denials(d, probe))
        assert any(a["address"] == OTHER4 for a in audit_denials(d, host))
    finally:
        stop_all(d, config)
    assert leftover_cgroups(d.data) == []
    no_pins(d)
    assert kernel_objects(world) == base and not netns_left(mine), "no task network stays"
    assert wait_gone("prog", programs.values()) == [], "nor the node's programs"
    assert wait_gone("map", maps) == [], "nor their maps"


def test_egress_tasks_outlive_a_stop_with_keep_tasks(tmp_path: Path, world: World) -> None:
    netns = ("nsenter", f"--net=/run/netns/{world.task}")
    config = egress_config()
    d = Daemon(tmp_path, config.replace("[node]\n", "[node]\nkeep_tasks = true\n"), netns)
    base = kernel_objects(world)
    d.start()
    tag = f"ek{os.getpid()}x{time.time_ns() % 10**6}"
    gate = tmp_path / "gate"
    gate.mkdir()
    policy = {"allow": [f"{HOST4}:8080"], "allow_hosts": ["allowed.test:9090"]}
    mine: set[str] = set()
    try:
        probe = d.submit(ops(*PROBE), network="egress", **policy, **prober_fields(gate))["id"]
        kept = d.submit(gated(f"{tag}-k", 3), network="egress", ro=[f"{gate}:/gate"],
                        **policy)["id"]  # fmt: skip
        # Its enforcement is removed while no agent runs: it cannot be re-adopted safely.
        broken = d.submit(["sh", "-c", "sleep 300", f"{tag}-b"], network="egress",
                          retry_lost=False, **policy)["id"]  # fmt: skip
        for t in (probe, kept, broken):
            d.wait(t, states=("running",), timeout=60)
        wait_lines(d, probe, 1)
        [broken_pid] = pids_of(f"{tag}-b")
        mine = {task_netns(p) for m in ("k", "b") for p in pids_of(f"{tag}-{m}")}
        assert d.stop(signal.SIGTERM) == 0
        assert "run on, for the next start" in "\n".join(d.lines)
        during = kernel_objects(world)
        # The three tasks' veths are new; the bridge may be an earlier test's, kept by then.
        new_veths = {link for link in during["links"] - base["links"] if link.startswith("anv")}
        assert netns_left(mine) == mine and len(new_veths) == 3, (
            "the tasks' networks stay",
            new_veths,
        )
        assert "agentnode0" in during["links"], "on the bridge"
        assert "table ip agentnode0" in during["nft"], "and the masquerade"
        pinned = [p.name for p in egress_pins(d).iterdir() if p.name.startswith("c")]
        assert len(pinned) == 3, "and their pinned enforcement"
        _native.EgressHandle.remove_pins(egress_pins(d) / pin_of(broken_pid))
        (gate / "gap").touch()
        wait_lines(d, probe, 4)
        d.config.write_text(config)
        d.start()
        assert "2 re-adopted" in next(x for x in d.lines if "capacity" in x), d.lines
        lost = d.wait(broken, timeout=30)
        assert lost["state"] == "lost" and "network" in lost["reason"], lost
        assert not pids_of(f"{tag}-b"), "killed: never a task without its policy"
        # Its rules change live as a task's started by this daemon would.
        d.client.call("PUT", f"/v1/tasks/{probe}/egress",
                      {**policy, "allow": [f"{HOST4}:8080", f"{OTHER4}:8080"]})  # fmt: skip
        (gate / "after").touch()
        (gate / "end").touch()
        p = d.wait(probe, timeout=60)
        assert (p["state"], p["exit_code"]) == ("succeeded", 0), p
        check_probe(results(d, probe), updated=True)
        assert any(a["address"] == OTHER4 for a in audit_denials(d, probe))
        k = d.wait(kept, timeout=60)
        assert (k["exit_code"], k["attempt"]) == (3, 1), k
        got = lines_of(d, kept)
        assert got and got == [f"{tag}-k line {i}" for i in range(len(got))]
    finally:
        stop_all(d, config)
    assert leftover_cgroups(d.data) == []
    no_pins(d)
    assert kernel_objects(world) == base and not netns_left(mine), "no task network stays"


def test_a_node_killed_with_9_has_its_bridge_removed_by_its_next_run(
    tmp_path: Path, world: World
) -> None:
    """The bridge and nft table a node killed with -9 left go when its next run stops, though
    that run started no network task (it made neither)."""
    netns = ("nsenter", f"--net=/run/netns/{world.task}")

    def left() -> tuple[bool, bool]:
        links = subprocess.run(["ip", "-n", world.task, "-o", "link"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        tables = subprocess.run([*netns, "nft", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        return " agentnode0:" in links, "agentnode0" in tables

    d = Daemon(tmp_path, egress_config(), netns)
    d.start()
    try:
        task = d.submit(["true"], network="egress", user="0")
        assert d.wait(task["id"], timeout=60)["state"] == "succeeded"
        d.stop(signal.SIGKILL)
        assert left() == (True, True)
        d.start()
        d.wait(d.submit(["true"])["id"], timeout=60)
    finally:
        d.stop()
    assert left() == (False, False)


def test_a_bridge_removed_from_outside_is_made_again(tmp_path: Path, world: World) -> None:
    """`ip link del` of the node's bridge while it runs (an operator, a network manager): the
    next egress task's start makes it again, with its address and rules, and that task's
    policy holds as before: allowed address and name reachable, the rest denied, its DNS
    answered by the node's forwarder."""
    netns = ("nsenter", f"--net=/run/netns/{world.task}")
    d = Daemon(tmp_path, egress_config(), netns)
    d.start()
    policy = {"allow": [f"{HOST4}:8080"], "allow_hosts": ["allowed.test:9090"]}
    probe = (
        connect(HOST4, 8080),
        connect(OTHER4, 8080),
        resolve("allowed.test"),
        connect("allowed.test", 9090),
    )
    try:
        for round_ in range(3):
            task = d.submit(ops(*probe), network="egress", user="0", ro=[str(REPO)], **policy)
            done = d.wait(task["id"], timeout=60)
            assert done["state"] == "succeeded", (round_, done)
            allowed, denied, resolved, by_name = results(d, task["id"])
            assert allowed["ok"] and by_name["ok"], (round_, allowed, by_name)
            assert not denied["ok"] and denied["errno"] == errno.EPERM, (round_, denied)
            assert resolved["addrs"] == [HOST4], (round_, resolved)
            # Removed after each round (after the last too: the stop copes with it gone).
            subprocess.run(["ip", "-n", world.task, "link", "del", "agentnode0"], check=True)
        assert "the node's bridge agentnode0 was removed; making it again" in "\n".join(d.lines)
    finally:
        d.stop()


def test_the_node_table_flushed_from_outside_is_made_again(tmp_path: Path, world: World) -> None:
    """`nft flush ruleset` while the node runs (an operator, a firewall reload) takes the
    bridge's inbound drop and masquerade with it, and the running tasks' published ports:
    within one look (10 s) the node makes its table again, with those ports mapped to the same
    tasks, with no task started meanwhile; a task ended after it leaves none behind."""
    netns = ("nsenter", f"--net=/run/netns/{world.task}")
    d = Daemon(tmp_path, egress_config(), netns)
    d.start()

    def nft(*args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", world.task, "nft", *args],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    def mapped() -> set[str]:
        listed = nft("-j", "list", "map", "ip", "agentnode0", "publish")
        elems = json.loads(listed)["nftables"][1]["map"].get("elem", [])
        return {f"{port}->{'.'.join(map(str, t['concat']))}" for port, t in elems}

    try:
        task = d.submit(["sleep", "60"], network="egress", allow=[f"{HOST4}:8080"],
                        publish=["18083:5000"])  # fmt: skip
        other = d.submit(["sleep", "60"], network="egress", publish=["18084:5001"])
        d.wait(task["id"], states=("running",))
        d.wait(other["id"], states=("running",))
        assert "table ip agentnode0" in kernel_objects(world)["nft"]
        before = mapped()
        assert len(before) == 2 and all(m.startswith(("18083->", "18084->")) for m in before)
        subprocess.run(["ip", "netns", "exec", world.task, "nft", "flush", "ruleset"], check=True)
        assert "table ip agentnode0" not in kernel_objects(world)["nft"]
        deadline = time.monotonic() + 30
        while "table ip agentnode0" not in kernel_objects(world)["nft"]:
            assert time.monotonic() < deadline, "the node's table was not made again"
            time.sleep(0.5)
        forward = nft("list", "chain", "ip", "agentnode0", "forward")
        assert 'oifname "agentnode0" drop' in forward, forward
        wait_for(lambda: mapped() == before)
        assert "was changed from outside; making it again" in "\n".join(d.lines)
        d.client.call("POST", f"/v1/tasks/{other['id']}/cancel", {})
        d.wait(other["id"], timeout=60)
        wait_for(lambda: {m[:5] for m in mapped()} == {"18083"})
        d.client.call("POST", f"/v1/tasks/{task['id']}/cancel", {})
    finally:
        d.stop()
