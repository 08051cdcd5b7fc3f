"""Layer 1 isolation, against the real kernel: namespaces, mounts, cgroups, seccomp, lifecycle.

Each test process is its own node instance (`agentnode/n<pid>-<start>`), so the leak checks look
only at this instance's subtree and at processes these tests can attribute by a unique marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from agentnode import _native
from agentnode.errors import CgroupError, SandboxError, UsageError
from agentnode.isolation import ExitReason, Limits, Mount, Task, parse_duration, parse_size, spawn
from agentnode.isolation import task as task_mod
from conftest import processes_with, run_cli

T = TypeVar("T")

pytestmark = pytest.mark.root


def run(argv: list[str], ws: Path, **kw: object) -> tuple[int | None, str, Task]:
    """Runs argv to completion with stdout and stderr piped; returns (status, output, task)."""
    t = spawn(argv, workspace=ws, stdout="pipe", stderr="pipe", **kw)  # type: ignore[arg-type]
    assert t.stdout is not None and t.stderr is not None
    out = t.stdout.read().decode() + t.stderr.read().decode()
    res = t.wait(60)
    assert res is not None
    t.close()
    return res.exit_status, out, t


def sh(script: str, ws: Path, **kw: object) -> tuple[int | None, str, Task]:
    return run(["sh", "-c", script], ws, **kw)


def settled(find: Callable[[], list[T]], timeout: float) -> list[T]:
    """What `find` returns once it is empty, or after `timeout` seconds: the background work of
    the launcher (cgroup removal, zygotes made ahead) gets time to finish, a leak stays."""
    deadline = time.monotonic() + timeout
    while True:
        found = find()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def our_children(timeout: float = 5.0) -> list[str]:
    """Pids of this process's child processes (tasks not reaped, or their escapees), of every
    thread (a zygote's task is a child of the pool's thread), but for the zygotes ready, once
    up to `timeout` seconds passed without one: the pool makes zygotes ahead at any time (one
    being made is a child not ready yet) and ends those made from a template gone stale."""

    def children() -> list[str]:
        ready = {str(pid) for pid in task_mod._instance().zygotes()}
        return [
            pid
            for t in Path("/proc/self/task").iterdir()
            for pid in (t / "children").read_text().split()
            if pid not in ready
        ]

    return settled(children, timeout)


def instance_tasks(timeout: float = 5.0) -> list[Path]:
    """Task cgroups left under this process's instance, in every hierarchy, once the background
    thread that removes ended tasks' cgroups has had up to `timeout` seconds to do so. The
    spares and zygotes made ahead of time for the next starts are not leftovers."""

    def left() -> list[Path]:
        launcher = task_mod._instance()
        spares = {*launcher.spares(), *launcher.zygotes().values()}
        return [
            t
            for d in launcher.dirs()
            if d.exists()
            for t in d.iterdir()
            if t.is_dir() and t.name not in spares
        ]

    return settled(left, timeout)


def test_task_is_pid_one_and_sees_no_host_pid(ws: Path) -> None:
    status, out, _ = sh("echo $$; ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '", ws)
    assert status == 0
    first, pids = out.splitlines()[:2]
    assert first == "1"
    assert str(os.getpid()) not in pids.split()
    assert all(int(p) < 10 for p in pids.split())


def test_task_gets_no_descriptor_of_the_daemon_but_its_stdio(ws: Path, tmp_path: Path) -> None:
    """Zygotes share the daemon's descriptor table until they take a task: a descriptor the
    daemon opens, inheritable even, is not the task's (nor is any pipe of the pool)."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        for i in range(3):  # the first start sets the zygotes going; later ones take them
            _status, out, _ = sh(f"ls /proc/self/fd; cat /proc/self/fd/{fd} 2>&1", ws)
            assert "s3cret" not in out
            assert sorted(out.split()[:4]) == ["0", "1", "2", "3"]  # 3: ls's own directory
            deadline = time.monotonic() + 5
            while i == 0 and not task_mod._instance().zygotes() and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        os.close(fd)


def test_root_is_read_only_and_only_binds_are_writable(ws: Path, tmp_path: Path) -> None:
    rw = tmp_path / "rw"
    ro = tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    os.chmod(rw, 0o777)
    os.chmod(ro, 0o777)
    script = (
        "touch /etc/agentnode-x 2>/dev/null && echo etc-writable; "
        f"touch {Path.cwd()}/agentnode-x 2>/dev/null && echo host-writable; "
        "touch /workspace/ok && echo ws-ok; "
        "touch /data/rw/ok && echo rw-ok; "
        "touch /data/ro/x 2>/dev/null && echo ro-writable; "
        "echo $HOME $PATH"
    )
    status, out, _ = sh(
        script,
        ws,
        mounts=[Mount(str(rw), "/data/rw", writable=True), Mount(str(ro), "/data/ro")],
    )
    assert status == 0, out
    assert "writable" not in out
    assert "ws-ok" in out and "rw-ok" in out
    assert (ws / "ok").exists() and (rw / "ok").exists()
    assert "/workspace /usr/local/sbin" in out


def test_binds_into_tmp_and_workspace_land_on_those_mounts(ws: Path, tmp_path: Path) -> None:
    """/tmp and /workspace are mounted fresh, so binds under them need points made after."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("hello")
    (tmp_path / "one").write_text("file")
    script = "cat /tmp/a/b/f /workspace/in/f /tmp/one; touch /tmp/a/b/x 2>/dev/null || echo ro"
    status, out, _ = sh(
        script,
        ws,
        mounts=[
            Mount(str(src), "/tmp/a/b"),
            Mount(str(src), "/workspace/in"),
            Mount(str(tmp_path / "one"), "/tmp/one"),
        ],
    )
    assert (status, out) == (0, "hellohellofilero\n"), out


def test_tmp_is_private_and_size_limited(ws: Path) -> None:
    marker = f"agentnode-{uuid.uuid4().hex}"
    script = (
        f"echo x > /tmp/{marker} && echo wrote; "
        "dd if=/dev/zero of=/tmp/big bs=1k count=2048 2>/dev/null || echo full"
    )
    _status, out, _ = sh(script, ws, limits=Limits(tmp_size=1 << 20))
    assert "wrote" in out and "full" in out, out
    assert not Path("/tmp", marker).exists()


def test_masked_proc_paths_and_read_only_proc_sys(ws: Path) -> None:
    masked = [
        p
        for p in (
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/proc/sched_debug",
            "/proc/sysrq-trigger",
        )
        if os.path.exists(p)
    ]
    # Directories are masked with an empty read-only tmpfs (the host's kind is tried first).
    masked_dirs = [p for p in ("/proc/acpi", "/proc/scsi", "/sys/firmware") if os.path.isdir(p)]
    assert masked
    script = (
        "".join(f"wc -c < {p}; " for p in masked)
        + "".join(
            f"ls -A {d} | wc -l; (touch {d}/x) 2>/dev/null && echo {d}-writable; "
            for d in masked_dirs
        )
        + "(echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo procsys-writable; "
        "(echo x > /sys/kernel/uevent_helper) 2>/dev/null && echo sys-writable; true"
    )
    status, out, _ = sh(script, ws, user=0)
    assert status == 0
    assert out.split() == ["0"] * (len(masked) + len(masked_dirs)), out


def test_capabilities_dropped_and_no_new_privs(ws: Path) -> None:
    for user in (65534, 0):
        _status, out, _ = sh(
            "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status", ws, user=user
        )
        fields = dict(line.split(":\t") for line in out.splitlines())
        assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == "0000000000000000"
        assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_listed_capability_is_kept_and_nothing_else(ws: Path) -> None:
    probe = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); print('bound 80'); "
        "print(open('/proc/self/status').read())"
    )
    status, out, _ = run(["/usr/bin/python3", "-c", probe], ws, caps=["CAP_NET_BIND_SERVICE"])
    assert status == 0 and "bound 80" in out, out
    fields = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    assert fields["CapEff"] == fields["CapBnd"] == fields["CapAmb"] == f"{1 << 10:016x}"
    status, out, _ = run(["/usr/bin/python3", "-c", probe], ws)
    assert status == 1 and "Permission denied" in out
    with pytest.raises(UsageError, match="CAP_NOPE"):
        spawn(["true"], caps=["CAP_NOPE"])


def test_task_starts_with_default_signal_dispositions(ws: Path) -> None:
    """pytest's Python ignores SIGPIPE and SIGXFSZ; a task must not inherit that."""
    status, out, _ = sh("grep SigIgn /proc/self/status; yes | head -1 >/dev/null; echo done", ws)
    assert status == 0
    assert out.split() == ["SigIgn:", "0000000000000000", "done"], out


def test_seccomp_denies_mount_bpf_unshare_ns_clone_and_ptrace(ws: Path) -> None:
    probe = textwrap.dedent(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        def err(r):
            return ctypes.get_errno() if r == -1 else 0
        print("mount", err(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
        print("bpf", err(libc.syscall(321, 0, 0, 0)))
        print("unshare", err(libc.unshare(0x04000000)))
        print("clone_newuts", err(libc.syscall(56, 0x04000000 | 17, 0, 0, 0, 0)))
        print("clone3", err(libc.syscall(435, 0, 0)))
        print("ptrace", err(libc.ptrace(16, 1, 0, 0)))
        import threading  # pthread_create meets clone3's ENOSYS and falls back to clone
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        print("thread", 0)
        """
    )
    status, out, _ = run(["/usr/bin/python3", "-c", probe], ws, user=0)
    assert status == 0, out
    got = dict(line.split() for line in out.splitlines())
    eperm, enosys = "1", "38"
    assert got == {
        "mount": eperm,
        "bpf": eperm,
        "unshare": eperm,
        "clone_newuts": eperm,
        "clone3": enosys,
        "ptrace": eperm,
        "thread": "0",
    }


def test_escape_attempts_fail(ws: Path) -> None:
    host = subprocess.Popen(["sleep", "60"])
    try:
        script = (
            "kill -9 -1 2>/dev/null; "
            "ls -A /sys/fs/cgroup | wc -l; "
            "(echo 1 > /sys/fs/cgroup/cgroup.procs) 2>/dev/null && echo cgroup-escape; "
            "(nsenter -t 1 -m true) 2>/dev/null && echo nsenter; "
            "(chroot / true) 2>/dev/null && echo chroot; "
            "(mknod /tmp/sda b 8 0) 2>/dev/null && echo mknod; true"
        )
        status, out, _ = sh(script, ws, user=0)
        assert status == 0
        assert out.split() == ["0"], out
        assert host.poll() is None  # kill -1 inside reached nothing outside
    finally:
        host.kill()
        host.wait()


def test_no_new_privs_stops_setuid(ws: Path) -> None:
    shutil.copy("/usr/bin/id", ws / "suid-id")
    os.chown(ws / "suid-id", 0, 0)
    os.chmod(ws / "suid-id", 0o4755)
    status, out, _ = run(["/workspace/suid-id", "-u"], ws)
    assert status == 0
    assert out.strip() == "65534"


def test_memory_hog_is_oom_killed_and_reported(ws: Path) -> None:
    t = spawn(
        ["/usr/bin/python3", "-c", "s = 'x' * (512 << 20)"],
        workspace=ws,
        limits=Limits(memory=48 << 20),
        stderr="null",
    )
    res = t.wait(60)
    assert res is not None
    assert res.reason is ExitReason.OOM
    assert res.stats.oom_kills >= 1
    assert res.signal == signal.SIGKILL


def test_fork_bomb_stops_at_pids_limit(ws: Path) -> None:
    _status, out, t = sh(
        "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done", ws, limits=Limits(pids=16)
    )
    assert t.result is not None and t.result.reason is ExitReason.PIDS, out
    assert t.result.stats.pids_peak <= 16
    assert subprocess.run(["true"], check=False).returncode == 0  # the host still forks


def test_each_start_gets_its_own_limits_whatever_came_before(ws: Path) -> None:
    """Starts from zygotes one after another, with the same limits, other ones or none: each
    gets exactly its own (none: the kernel's default)."""
    launcher = task_mod._instance()

    def pids_max(limits: Limits) -> str:
        deadline = time.monotonic() + 5
        while len(launcher.zygotes()) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with spawn(["sleep", "5"], workspace=ws, limits=limits) as t:
            assert t.cgroup_dir is not None
            name = t.cgroup_dir.name
            found = [
                d / name / "pids.max" for d in launcher.dirs() if (d / name / "pids.max").exists()
            ]
            return found[0].read_text().strip()

    assert [pids_max(Limits(pids=n)) for n in (20, 20, 30, 30)] == ["20", "20", "30", "30"]
    assert pids_max(Limits()) == "max"
    assert pids_max(Limits(pids=20)) == "20"


def cpu_stat(cpu_dir: Path) -> dict[str, int]:
    return {
        k: int(v) for k, v in (ln.split() for ln in (cpu_dir / "cpu.stat").read_text().splitlines())
    }


def test_cpus_half_is_enforced(ws: Path) -> None:
    with spawn(
        ["sh", "-c", "yes > /dev/null & yes > /dev/null & wait"],
        workspace=ws,
        limits=Limits(cpus=0.5),
    ) as t:
        assert t.cgroup_dir is not None
        cpu_dir = (
            next(d for d in task_mod._instance().dirs() if "/cpu/" in str(d)) / t.cgroup_dir.name
        )
        assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cpu_dir / "cpu.cfs_period_us").read_text().strip() == "100000"
        time.sleep(0.3)  # past the first period, which runs before throttling starts
        s0, c0, t0 = t.stats(), cpu_stat(cpu_dir), time.monotonic()
        time.sleep(3)
        s1, c1, t1 = t.stats(), cpu_stat(cpu_dir), time.monotonic()
    used = (s1.cpu_user_s + s1.cpu_system_s - s0.cpu_user_s - s0.cpu_system_s) / (t1 - t0)
    throttled = (c1["nr_throttled"] - c0["nr_throttled"]) / max(
        1, c1["nr_periods"] - c0["nr_periods"]
    )
    assert used <= 0.575, used
    # The task reaches its quota in every period it is not starved by other load on this shared
    # 2-core host; where it reached it (throttled periods), it got 0.5 CPU within 15%.
    assert used >= 0.425 * min(1.0, throttled / 0.9), (used, throttled)


def test_final_accounting_splits_user_and_system_time(ws: Path) -> None:
    # The exact CPU total is split in the proportion of the tick-sampled user and system times.
    # About 0.3 s of CPU each here; the kernel samples the split at each tick.
    busy = spawn(["sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"], workspace=ws)
    calls = spawn(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=600000"], workspace=ws)
    for t, mostly in ((busy, "user"), (calls, "system")):
        r = t.wait(timeout=60)
        assert r is not None and r.code == 0
        s = r.stats
        user, system = s.cpu_user_s, s.cpu_system_s
        assert user + system > 0.05, s
        assert (user > system) if mostly == "user" else (system > user), s
        assert s.memory_peak > 0 and s.pids_peak >= 1 and s.pids_current == 0, s


def test_usage_is_the_cpu_and_memory_peak_of_stats_while_it_runs(ws: Path) -> None:
    # The two figures a tool call takes before and after itself (two files, not eight).
    t = spawn(["sh", "-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; sleep 60"],
              workspace=ws)  # fmt: skip
    try:
        time.sleep(0.3)
        before, s, after = t.usage(), t.stats(), t.usage()
        assert before is not None and after is not None
        # Microseconds (v2's cpu.stat) or nanoseconds (v1's cpuacct.usage), both exact.
        assert before[0] - 1e-3 <= s.cpu_user_s + s.cpu_system_s <= after[0] + 1e-3
        assert before[1] == s.memory_peak == after[1] > 0
    finally:
        t.close()
    assert t.usage() is None


def test_usage_reads_fresh_figures_each_time_and_the_cgroups_still_go(ws: Path) -> None:
    # The files usage() reads are opened once and read again from their start: each reading
    # must be the kernel's figure of now, and the open files must not keep the cgroups.
    code = "import time; time.sleep(0.4); b = bytearray(48 << 20); t = time.time()\n" \
        "while time.time() < t + 60: pass"  # fmt: skip
    t = spawn(["python3", "-c", code], workspace=ws)
    try:
        time.sleep(0.2)
        first = t.usage()
        assert first is not None and first[1] < 48 << 20
        seen = [first]
        for _ in range(4):
            time.sleep(0.25)
            now = t.usage()
            assert now is not None
            seen.append(now)
        cpus = [u[0] for u in seen]
        assert cpus == sorted(cpus) and cpus[-1] > cpus[1] > cpus[0]
        assert seen[-1][1] >= 48 << 20
        directory = t.cgroup_dir
        assert directory is not None
    finally:
        t.close()
    assert t.usage() is None and t.cgroup_dir is None
    assert instance_tasks() == [] and not Path(directory).exists()


def test_timeout_kills_a_tree_with_a_double_forked_daemon(ws: Path) -> None:
    marker = f"{1000 + uuid.uuid4().int % 1000}.{os.getpid()}"
    t = spawn(
        ["sh", "-c", f"(setsid sh -c 'sleep {marker}' &); sleep {marker}"],
        workspace=ws,
        limits=Limits(timeout=0.5),
    )
    time.sleep(0.2)
    assert len(processes_with(f"sleep {marker}")) >= 2
    res = t.wait()
    assert res is not None and res.reason is ExitReason.TIMEOUT
    assert processes_with(f"sleep {marker}") == []
    assert t.cgroup_dir is None and instance_tasks() == []


def test_freeze_stops_progress_and_thaw_resumes(ws: Path) -> None:
    with spawn(["sh", "-c", "while :; do :; done"], workspace=ws) as t:
        time.sleep(0.2)
        t.freeze()
        time.sleep(0.05)
        frozen_at = t.stats().cpu_user_s + t.stats().cpu_system_s
        time.sleep(0.3)
        still = t.stats().cpu_user_s + t.stats().cpu_system_s
        assert still - frozen_at < 0.02
        t.thaw()
        # Progress again: on a loaded host a thawed task may wait a while for a CPU.
        deadline = time.monotonic() + 10
        while (now := t.stats().cpu_user_s + t.stats().cpu_system_s) <= still + 0.05:
            assert time.monotonic() < deadline, (still, now)
            time.sleep(0.05)
    assert t.result is not None and t.result.signal == signal.SIGKILL


def test_terminate_gives_grace_then_kills(ws: Path) -> None:
    t = spawn(["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 0.01; done"], workspace=ws)
    time.sleep(0.2)
    assert t.terminate(grace=5).code == 7
    # pid 1 without a handler ignores SIGTERM: the whole task is killed after the grace period.
    t = spawn(["sleep", "100"], workspace=ws)
    t0 = time.monotonic()
    res = t.terminate(grace=0.3)
    assert res.signal == signal.SIGKILL and time.monotonic() - t0 >= 0.3


def test_wait_async_polls_the_pidfd(ws: Path) -> None:
    async def main() -> tuple[int | None, ExitReason]:
        t = spawn(["sh", "-c", "sleep 0.2; exit 5"], workspace=ws)
        t2 = spawn(["sleep", "100"], workspace=ws, limits=Limits(timeout=0.3))
        r1, r2 = await asyncio.gather(t.wait_async(), t2.wait_async())
        return r1.code, r2.reason

    assert asyncio.run(main()) == (5, ExitReason.TIMEOUT)


def test_stdio_to_files_and_env(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    t = spawn(
        ["sh", "-c", "echo $A-$HOME; env | cut -d= -f1 | sort | tr '\\n' ' '"],
        workspace=ws,
        env={"A": "b"},
        stdout=out,
    )
    assert t.wait(30) is not None
    assert out.read_text().split() == ["b-/workspace", "A", "HOME", "LANG", "PATH", "PWD"]


def test_userns_maps_task_root_to_an_unprivileged_host_id() -> None:
    # The default workspace is created for and owned by the mapped id.
    with spawn(["sleep", "100"], user=0, userns=True) as t:
        time.sleep(0.1)
        status = Path(f"/proc/{t.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] == str(task_mod.USERNS_BASE)
    shutil.rmtree(t.workspace)
    t = spawn(
        ["sh", "-c", "id -u; touch /etc/x 2>/dev/null || echo ro"],
        user=0,
        userns=True,
        stdout="pipe",
    )
    assert t.stdout is not None
    out = t.stdout.read().decode()
    t.close()
    shutil.rmtree(t.workspace)
    assert out.split() == ["0", "ro"]


def test_network_is_loopback_only_and_a_netns_can_be_joined(ws: Path) -> None:
    _, out, _ = sh("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '", ws)
    assert out.split() == ["lo"]
    probe = (
        "import socket; s = socket.create_server(('127.0.0.1', 0)); "
        "c = socket.create_connection(s.getsockname()); print('loopback ok'); "
        "socket.create_connection(('10.255.255.1', 9), timeout=1)"
    )
    status, out, _ = run(["/usr/bin/python3", "-c", probe], ws)
    assert "loopback ok" in out and "Network is unreachable" in out and status == 1, out
    name = f"agentnode-t{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = Path("/run/netns") / name
        _, out, _ = run(["readlink", "/proc/self/ns/net"], ws, network=str(path))
        assert out.strip() == f"net:[{os.stat(path).st_ino}]"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_every_task_gets_fresh_net_and_ipc_namespaces_of_its_own_with_loopback_up(
    ws: Path,
) -> None:
    # Most network namespaces come from the pool made ahead of time: none may be handed out
    # twice, none may be this process's, and each must have its loopback up. IPC namespaces
    # (made at clone) likewise belong to one task each.
    tasks = [spawn(["sleep", "100"], workspace=ws) for _ in range(10)]
    try:
        for kind in ("net", "ipc"):
            inodes = {os.stat(f"/proc/{t.pid}/ns/{kind}").st_ino for t in tasks}
            assert len(inodes) == len(tasks), kind
            assert os.stat(f"/proc/self/ns/{kind}").st_ino not in inodes, kind
    finally:
        for t in tasks:
            t.close()
    for _ in range(6):
        _, out, _ = sh("ls /sys/class/net; cat /sys/class/net/lo/flags", ws)
        assert out.split() == ["lo", "0x9"]  # IFF_UP | IFF_LOOPBACK


def test_each_tasks_sys_shows_its_own_network_namespace(ws: Path) -> None:
    # /sys is mounted ahead of most starts (with the network namespace made ahead): a link
    # moved into one running task's namespace must show in that task's /sys and no other's.
    tasks = [
        spawn(["sh", "-c", "read _; ls /sys/class/net"], workspace=ws, stdin="pipe", stdout="pipe")
        for _ in range(4)
    ]
    host, probe = f"agn{uuid.uuid4().hex[:8]}", "agnprobe"
    try:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                host,
                "type",
                "veth",
                "peer",
                "name",
                probe,
                "netns",
                f"/proc/{tasks[1].pid}/ns/net",
            ],
            check=True,
        )
        seen = []
        for t in tasks:
            assert t.stdin is not None and t.stdout is not None
            t.stdin.write(b"\n")
            t.stdin.close()
            seen.append(t.stdout.read().decode().split())
            assert t.wait(30) is not None
        assert seen == [["lo"], ["agnprobe", "lo"], ["lo"], ["lo"]]
    finally:
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)
        for t in tasks:
            t.close()


def test_task_sits_in_its_v1_and_cgroup2_nodes(ws: Path) -> None:
    with spawn(["sleep", "100"], workspace=ws) as t:
        assert t.cgroup_dir is not None
        lines = Path(f"/proc/{t.pid}/cgroup").read_text()
        inst = task_mod._instance().name
        assert f"0::/agentnode/{inst}/" in lines
        assert all(
            f"agentnode/{inst}/" in line
            for line in lines.splitlines()
            if ":memory:" in line or ":pids:" in line
        )


def test_200_cycles_leave_nothing_behind(ws: Path) -> None:
    def our_mounts() -> list[str]:
        # Other tests and helpers add netns mounts host-wide; ours would involve these paths.
        ours = (task_mod.DATA_DIR, ws)
        return [
            m
            for m in Path("/proc/self/mountinfo").read_text().splitlines()
            if any(Path(m.split()[4]).is_relative_to(o) for o in ours)
        ]

    before_mounts = our_mounts()
    for i in range(200):
        if i % 20 == 5:
            with pytest.raises(SandboxError):
                spawn(["/nonexistent"], workspace=ws)
        elif i % 20 == 15:
            with pytest.raises(SandboxError):
                spawn(["no-such-command-agentnode"], workspace=ws)
        else:
            t = spawn(["/bin/true"], workspace=ws)
            assert t.wait(30) is not None
    assert instance_tasks() == []
    assert our_mounts() == before_mounts == []
    assert our_children() == []


def test_a_limit_the_host_refuses_ends_the_start_before_the_task_runs(ws: Path) -> None:
    """A limit the kernel refuses fails the start with an error naming it, before the task has
    run anything, and leaves no cgroup or process behind."""
    if len(task_mod._instance().dirs()) == 1:
        pytest.skip("pure cgroup v2 has memory.high; refusing it needs a v1 memory controller")
    with pytest.raises(CgroupError, match=r"memory\.high"):
        spawn(["touch", "/workspace/ran"], limits=Limits(memory_high=64 << 20), workspace=ws)
    assert not (ws / "ran").exists()
    assert instance_tasks() == []
    assert our_children() == []


def test_threads_start_tasks_at_once(tmp_path: Path) -> None:
    """The launcher locks its cgroups only while a task's cgroup is made, so starts overlap."""
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> tuple[int | None, str]:
        out = tmp_path / f"out{i}"
        with out.open("wb") as f:
            t = spawn(["sh", "-c", f"echo {i}"], workspace=tmp_path / f"w{i}", stdout=f.fileno())
            result = t.wait(30)
            t.close()
        assert result is not None
        return result.code, out.read_text()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(24)))
    assert results == [(0, f"{i}\n") for i in range(24)]
    assert instance_tasks() == []


def test_starts_never_hang_while_other_threads_come_and_go(tmp_path: Path) -> None:
    """The cloned child copies the parent's thread list and locks mid-change; a child that
    waited on them (glibc's set*id wrappers did) hung before exec a few times in every few
    hundred starts while threads were being created. Threads here start tasks, churn and allocate at once."""
    workers, starts, deadline = 6, 30, time.monotonic() + 20
    stop = threading.Event()
    done = [0] * workers
    errors: list[BaseException] = []

    def start_tasks(i: int) -> None:
        ws = tmp_path / f"w{i}"
        ws.mkdir()
        os.chown(ws, 65534, 65534)
        try:
            for n in range(starts):
                # Every fifth start uses a user namespace, where the child switches ids twice;
                # its workspace is the default one, which the mapped root can reach.
                if n % 5 == 0:
                    with spawn(["/bin/true"], user=0, userns=True) as t:
                        assert t.wait(10) is not None
                    shutil.rmtree(t.workspace)
                else:
                    with spawn(["/bin/true"], workspace=ws) as t:
                        assert t.wait(10) is not None
                done[i] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def churn_threads() -> None:
        while not stop.is_set():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()

    def allocate() -> None:
        while not stop.is_set():
            garbage = [bytearray(4096) for _ in range(1000)]
            del garbage

    background = [threading.Thread(target=f, daemon=True) for f in (churn_threads, allocate)]
    threads = [threading.Thread(target=start_tasks, args=(i,), daemon=True) for i in range(workers)]
    for t in background + threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    started, stuck = sum(done), [t for t in threads if t.is_alive()]
    hung: dict[str, str] = {}
    if stuck:
        # Children that never exec'd still run this interpreter: record where they wait, then
        # kill them so the blocked starts return and the test ends.
        exe = os.readlink("/proc/self/exe")
        for task_dir in Path("/proc/self/task").iterdir():
            for pid in (task_dir / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/exe") == exe:
                        hung[pid] = Path(f"/proc/{pid}/wchan").read_text()
                        os.kill(int(pid), signal.SIGKILL)
        for t in threads:
            t.join(10)
    for t in background:
        t.join(10)
    assert not stuck, f"{started}/{workers * starts} started; children stuck before exec: {hung}"
    assert errors == []
    assert done == [starts] * workers


PARENT = """
import sys, time
from agentnode import _native
from agentnode.isolation import spawn, task
m = task._instance()
t = spawn(["sleep", sys.argv[1]], workspace=sys.argv[2])
deadline = time.monotonic() + 10  # the cgroups and zygotes made ahead are left too
while (len(m.spares()) < 4 or len(m.zygotes()) < 4) and time.monotonic() < deadline:
    time.sleep(0.01)
ready = m.zygotes()
z = spawn(["sleep", sys.argv[1]], workspace=sys.argv[2])  # a task started from a zygote
while len(m.zygotes()) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
zygotes = ",".join(map(str, m.zygotes()))
print(m.name, len(m.spares()), z.pid in ready, zygotes, flush=True)
time.sleep(100)
"""


def test_sigkill_of_the_parent_kills_the_task_and_next_start_sweeps(ws: Path) -> None:
    marker = f"{2000 + uuid.uuid4().int % 1000}.{os.getpid()}"
    # This process's own instance first: making it sweeps dead instances, the crashed one too.
    dirs = task_mod._instance().dirs()
    p = subprocess.Popen(
        [sys.executable, "-c", PARENT, marker, str(ws)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    instance, spares, from_zygote, zygotes = p.stdout.readline().split()
    assert spares == "4" and from_zygote == "True"
    ready = [Path(f"/proc/{pid}") for pid in zygotes.split(",")]
    assert len(ready) == 4 and all(z.exists() for z in ready)
    p.stdout.close()
    assert len(processes_with(f"sleep\0{marker}", exact=True)) == 2
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes_with(f"sleep\0{marker}") == []
    # The zygotes shared the dead process's memory and descriptors: they died with it.
    while any(z.exists() for z in ready) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(z.exists() for z in ready)
    # The crash left its cgroups behind (unless a start in another test's process, which
    # sweeps dead instances too, got there first), and the next start sweeps them.
    left = [d.parent / instance for d in dirs]
    code = "from agentnode import _native; _native.Launcher().close()"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not any(d.exists() for d in left)  # ...and the next start swept them


SPARES = """
import json, sys, time
from agentnode.isolation import spawn, task
m = task._instance()
spawn(["true"], workspace=sys.argv[1]).wait()  # the first start sets the spares going
deadline = time.monotonic() + 10
while len(m.spares()) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
spares = m.spares()
made = all((d / s).is_dir() for d in m.dirs() for s in spares)
# A task no zygote can serve (one in a user namespace) takes a spare.
t = spawn(["true"], userns=True)
taken = t.cgroup_dir.name
t.wait()
print(json.dumps({"spares": spares, "made": made, "taken": taken, "left": m.spares()}))
"""


def test_cgroups_made_ahead_are_handed_out_once_and_removed_at_exit(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    p = subprocess.Popen([sys.executable, "-c", SPARES, str(ws)], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    got = json.loads(out)
    assert len(got["spares"]) == 4 and got["made"]  # one directory in every hierarchy
    assert got["taken"] in got["spares"]  # a start takes a ready one...
    assert got["taken"] not in got["left"]  # ...once
    # The process has exited: its spares went with its instance, as its tasks' cgroups did.
    for d in task_mod._instance().dirs():
        assert not any(e.name.startswith(f"n{p.pid}-") for e in d.parent.iterdir())


ONE_SHOT = """
import json, os, sys, time
from agentnode.isolation import spawn, task
task.one_shot()
m = task._instance()
for _ in range(3):
    spawn(["true"], workspace=sys.argv[1]).wait()
time.sleep(0.3)  # what a pool would have made by now
threads = sorted(
    open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
)
print(json.dumps({"spares": m.spares(), "zygotes": len(m.zygotes()), "threads": threads}))
"""


def test_a_one_task_process_makes_nothing_ahead(tmp_path: Path) -> None:
    """`agentnode exec` starts one task: no spare cgroups, network namespaces or zygotes are
    made for starts that never come, and no thread is started to make them."""
    ws = tmp_path / "ws"
    ws.mkdir()
    p = subprocess.run(
        [sys.executable, "-c", ONE_SHOT, str(ws)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["spares"] == [] and got["zygotes"] == 0
    pools = {"agentnode-cgroups", "agentnode-netns", "agentnode-zygote", "agentnode-mounts"}
    assert not pools & set(got["threads"]), got["threads"]


ZYGOTES = """
import json, os, signal, sys, time
from agentnode.errors import SandboxError
from agentnode.isolation import spawn, task
m = task._instance()
ws = sys.argv[1]
spawn(["true"], workspace=ws).wait()  # the first start sets the pool going
script = "echo $$; hostname; cut -d' ' -f19,41 /proc/self/stat; ls /proc | grep -c '^[0-9]'"
for _ in range(10):  # a host mount made meanwhile (by a test beside) makes zygotes stale
    deadline = time.monotonic() + 10
    while len(m.zygotes()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = m.zygotes()
    t = spawn(["sh", "-c", script], workspace=ws, hostname="zyg", stdout="pipe")
    cgroup = t.cgroup_dir.name
    out = t.stdout.read().decode().split()
    t.wait()
    if t.pid in ready:
        break
# A bad start from a zygote is the same one-line error, and the zygote goes with it.
bad = []
for argv, kw in ((["/nonexistent"], {}), (["true"], {"cwd": "/no-such-dir"})):
    deadline = time.monotonic() + 10
    while len(m.zygotes()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    before = set(m.zygotes())
    try:
        spawn(argv, workspace=ws, **kw)
        bad.append(["started", False])
    except SandboxError as e:
        bad.append([str(e), all(os.path.exists(f"/proc/{p}") for p in before)])
# Zygotes killed from outside are never handed a task: those starts take the usual way.
for pid in m.zygotes():
    os.kill(pid, signal.SIGKILL)
after_kill = [spawn(["true"], workspace=ws).wait().code for _ in range(6)]
deadline = time.monotonic() + 10
while len(m.zygotes()) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({
    "ready": {str(k): v for k, v in ready.items()}, "pid": t.pid, "cgroup": cgroup,
    "out": out, "bad": bad, "after_kill": after_kill, "left": list(m.zygotes()),
}))
"""


def test_a_zygote_starts_the_task_isolated_and_dies_with_its_pool(tmp_path: Path) -> None:
    """A task started from a zygote is the zygote: its pid, its cgroup, its namespaces, and the
    spawner's priority, not the pool thread's. A killed zygote is never handed a task, and the
    pool's zygotes end with the process."""
    ws = tmp_path / "ws"
    ws.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", ZYGOTES, str(ws)], stdout=subprocess.PIPE, text=True
    )
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    got = json.loads(out)
    assert len(got["ready"]) == 4
    assert got["ready"].get(str(got["pid"])) == got["cgroup"]  # a zygote took it, in its cgroup
    pid1, hostname, nice, policy, procs = got["out"]
    assert (pid1, hostname, procs) == ("1", "zyg", "3")  # its own pids (sh, ls, grep), /proc
    assert (nice, policy) == ("0", "0")  # SCHED_OTHER at nice 0, like the spawner
    (missing, kept_missing), (no_cwd, kept_no_cwd) = got["bad"]
    assert missing.startswith('cannot execute "/nonexistent" in the task: No such file'), missing
    assert "cannot enter the working directory" in no_cwd, no_cwd
    assert not kept_missing and not kept_no_cwd  # each took a zygote, now killed and reaped
    assert got["after_kill"] == [0] * 6
    assert len(got["left"]) == 4  # the pool made new ones
    for pid in [*got["left"], *map(int, got["ready"])]:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zygot" not in Path(f"/proc/{pid}/comm").read_text()
        )
    for d in task_mod._instance().dirs():
        assert not any(e.name.startswith(f"n{p.pid}-") for e in d.parent.iterdir())


FORK = """
import os, sys, time
from agentnode.isolation import spawn, task
ws = sys.argv[1]
spawn(["true"], workspace=ws).wait()  # the background threads and pools are running
long = spawn(["sleep", "100"], workspace=ws)
parent = task._instance().name
deadline = time.monotonic() + 10
while len(task._instance().spares()) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.2)  # and the network namespaces made ahead are ready
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    kids = [spawn(["sleep", "100"], workspace=ws) for _ in range(4)]
    nets = " ".join(str(os.stat(f"/proc/{k.pid}/ns/net").st_ino) for k in kids)
    os.write(w, f"{task._instance().name} {nets}\\n".encode())
    time.sleep(1)  # alive while the parent starts its own
    sys.exit(0)  # atexit ends them, and must leave the parent's task and cgroups alone
os.close(w)
child = os.read(r, 4096).decode().split()
mine = [spawn(["sleep", "100"], workspace=ws) for _ in range(4)]
shared = {str(os.stat(f"/proc/{k.pid}/ns/net").st_ino) for k in mine} & set(child[1:])
_, status = os.waitpid(pid, 0)
alive = long.wait(0) is None
print(child[0], parent, os.waitstatus_to_exitcode(status), alive, len(shared), flush=True)
for k in [*mine, long]:
    k.close()
"""


def test_a_forked_child_starts_tasks_of_its_own_and_leaves_the_parents_alone(ws: Path) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", FORK, str(ws)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # a child that hung would outlive its parent
    assert p.returncode == 0, err
    child, parent, status, alive, shared = out.split()
    assert child != parent  # an instance of its own: never the parent's spare cgroups
    assert status == "0"  # it exited (it hung when its cleanup queued to the parent's thread)
    assert alive == "True"  # the parent's task outlived the child's exit
    assert shared == "0"  # no network namespace made ahead went to both


def test_sweep_never_touches_live_instances() -> None:
    dirs = task_mod._instance().dirs()
    assert _native.sweep_cgroups(dirs[0].parent, [d.parent for d in dirs[1:]]) >= 0
    assert all(d.exists() for d in dirs)


def exec_cli(args: list[str], data_dir: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    p = subprocess.Popen(
        [sys.executable, "-m", "agentnode", "exec", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"AGENTNODE_DATA_DIR": str(data_dir)},
    )
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), p.pid


def assert_nothing_left(pid: int, data_dir: Path) -> None:
    for d in task_mod._instance().dirs():
        assert not any(e.name.startswith(f"n{pid}-") for e in d.parent.iterdir())
    # A data dir of its own: workspaces are kept, and an earlier process with the same pid
    # may have left one in the shared default.
    workspaces = data_dir / "workspaces"
    assert not workspaces.exists() or not any(workspaces.iterdir())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--memory", "12XB", "--", "true"],
            2,
            "--memory '12XB': is not a size (examples: 512M, 2G)",
        ),
        (["--timeout", "soon", "--", "true"], 2, "--timeout 'soon': is not a duration"),
        (["--cpus", "zero", "--", "true"], 2, "--cpus 'zero': is not a number"),
        (["--pids", "0", "--", "true"], 2, "--pids '0': is out of range"),
        (
            ["--rootfs", "/nonexistent-agentnode", "--", "true"],
            2,
            "--rootfs '/nonexistent-agentnode': is not a directory",
        ),
        (
            ["--ro", "/nonexistent-agentnode", "--", "true"],
            2,
            "--ro '/nonexistent-agentnode': does not exist",
        ),
        (["--env", "NOEQUALS", "--", "true"], 2, "--env 'NOEQUALS': is not NAME=VALUE"),
        (["--cap-add", "CAP_NOPE", "--", "true"], 2, "--cap-add 'CAP_NOPE': unknown capability"),
        (["--"], 2, "a command is required"),
        (["--", "no-such-command-agentnode"], 1, 'command not found: "no-such-command-agentnode"'),
        (["--", "/etc/passwd"], 1, 'cannot execute "/etc/passwd" in the task: Permission denied'),
        (["--memory-high", "10M", "--", "true"], 1, "this host cannot enforce memory.high"),
    ],
)
def test_exec_bad_input_is_one_line_and_leaves_nothing(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    res, pid = exec_cli(args, tmp_path)
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentnode: error: ") and message in lines[0], (
        res.stderr
    )
    assert_nothing_left(pid, tmp_path)


def test_exec_exit_statuses(ws: Path) -> None:
    assert run_cli(["exec", "--workspace", str(ws), "--", "sh", "-c", "exit 3"]).returncode == 3
    marker = f"{3000 + uuid.uuid4().int % 1000}.{os.getpid()}"
    p = subprocess.Popen(
        [sys.executable, "-m", "agentnode", "exec", "--workspace", str(ws), "--", "sleep", marker]
    )
    deadline = time.monotonic() + 10
    while not (pids := processes_with(f"sleep\0{marker}", exact=True)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(pids.pop(), signal.SIGKILL)
    assert p.wait(30) == 128 + signal.SIGKILL
    res = run_cli(
        [
            "exec",
            "--workspace",
            str(ws),
            "--timeout",
            "200ms",
            "--stats",
            "--json",
            "--",
            "sleep",
            "10",
        ]
    )
    assert res.returncode == 124
    assert "agentnode: task killed: timeout after 0.2s" in res.stderr
    assert '"reason": "timeout"' in res.stderr
    res = run_cli(
        [
            "exec",
            "--workspace",
            str(ws),
            "--memory",
            "32M",
            "--",
            "/usr/bin/python3",
            "-c",
            "s = 'x' * (256 << 20)",
        ]
    )
    assert res.returncode == 250
    assert "task killed: out of memory (memory limit 32.0MiB)" in res.stderr


def test_exec_log_dir(tmp_path: Path, ws: Path) -> None:
    res = run_cli(
        [
            "exec",
            "--workspace",
            str(ws),
            "--log-dir",
            str(tmp_path),
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ]
    )
    assert res.returncode == 0
    assert (tmp_path / "stdout.log").read_text() == "out\n"
    assert (tmp_path / "stderr.log").read_text() == "err\n"


def test_api_bad_input() -> None:
    with pytest.raises(UsageError, match="a command is required"):
        spawn([])
    with pytest.raises(UsageError, match="cpus"):
        Limits(cpus=0)
    with pytest.raises(UsageError, match="rootfs"):
        spawn(["true"], rootfs="/nonexistent-agentnode")


def test_an_unusable_data_dir_is_one_clear_error(tmp_path: Path) -> None:
    for bad in (5, ""):
        with pytest.raises(UsageError, match="give a directory path"):
            task_mod.use_data_dir(bad)  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UsageError, match="is not a directory"):
        task_mod.use_data_dir(a_file)
    # A data dir whose staging directory cannot be made: the start fails before making anything.
    data = tmp_path / "data"
    data.mkdir()
    (data / "stage").write_text("")
    before = task_mod.DATA_DIR
    task_mod.use_data_dir(data)
    try:
        with pytest.raises(UsageError, match=r"staging directory .*: cannot create it"):
            spawn(["true"], workspace=tmp_path / "ws")
    finally:
        task_mod.use_data_dir(before)
    res, pid = exec_cli(["--", "true"], a_file)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert (
        # The staging directory is checked before a workspace is made, so none is left.
        res.stderr.startswith("agentnode: error: staging directory ")
        and "AGENTNODE_DATA_DIR" in res.stderr
    )
    assert_nothing_left(pid, tmp_path)


def test_a_file_as_workspace_or_rootfs_is_one_clear_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UsageError, match=r"workspace .*file: cannot create it"):
        spawn(["true"], workspace=a_file)
    with pytest.raises(UsageError, match=r"rootfs .* is not a directory"):
        spawn(["true"], workspace=tmp_path / "ws", rootfs=a_file)


def test_units() -> None:
    assert parse_size("512M", option="x") == 512 << 20
    assert parse_size("1.5GiB", option="x") == 3 << 29
    assert parse_size("4096", option="x") == 4096
    assert parse_duration("500ms", option="x") == 0.5
    assert parse_duration("2m", option="x") == 120
    for bad in ("12XB", "", "M", "-1G"):
        with pytest.raises(UsageError, match="is not a size"):
            parse_size(bad, option="--memory")
    with pytest.raises(UsageError, match="more than zero"):
        parse_size("0", option="--memory")
