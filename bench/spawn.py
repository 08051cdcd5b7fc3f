"""Start->exit of /bin/true with full isolation (pid, mount, uts, ipc, net, cgroup namespaces,
read-only root, /proc, /dev, tmpfs /tmp, cgroup limits, seccomp) through `agentnode.spawn`,
against plain subprocess, bubblewrap and firejail in the same run; and teardown (kill -> reaped).

Runs are interleaved round-robin so machine noise hits every contender alike.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

from _harness import Bench, percentile
from agentnode.isolation import Limits, spawn

LIMITS = Limits(cpus=1.0, memory=256 << 20, pids=64, tmp_size=16 << 20)
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
BWRAP += ["--tmpfs", "/tmp", "/bin/true"]
FIREJAIL = ["firejail", "--quiet", "--noprofile", "--net=none", "/bin/true"]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    bench = Bench.from_args("spawn")
    runs = 60 if bench.quick else 500
    workspace = tempfile.mkdtemp(prefix="agentnode-bench-")

    def ours() -> None:
        t = spawn(["/bin/true"], limits=LIMITS, workspace=workspace)
        t.wait()

    contenders: dict[str, Callable[[], object]] = {
        "agentnode": ours,
        "subprocess": lambda: subprocess.run(["/bin/true"], check=True),
    }
    if shutil.which("bwrap"):
        contenders["bwrap"] = lambda: subprocess.run(BWRAP, check=True)
    if shutil.which("firejail"):
        contenders["firejail"] = lambda: subprocess.run(FIREJAIL, check=True, capture_output=True)
    for fn in contenders.values():  # warm-up: page cache, first cgroup manager, imports
        fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(runs):
        for name, fn in contenders.items():
            if name == "firejail" and i % 5:
                continue  # ~30x slower than the rest; a fifth of the runs gives a stable median
            samples[name].append(timed(fn))
    ours_ms = samples["agentnode"]
    for peer in [k for k in contenders if k != "agentnode"]:
        for q in (50, 99):
            bench.record(
                f"start_exit_p{q}_vs_{peer}",
                percentile(ours_ms, q),
                percentile(samples[peer], q),
                "ms",
                peer_name=f"{peer}, /bin/true",
            )

    kill_ours: list[float] = []
    kill_peer: list[float] = []
    for _ in range(runs // 2):
        t = spawn(["/bin/sleep", "100"], limits=LIMITS, workspace=workspace)
        kill_ours.append(timed(t.kill))
        p = subprocess.Popen(["/bin/sleep", "100"])
        kill_peer.append(timed(lambda p=p: (p.kill(), p.wait())))  # type: ignore[misc]
    bench.record(
        "teardown_p50",
        percentile(kill_ours, 50),
        percentile(kill_peer, 50),
        "ms",
        peer_name="subprocess kill+wait (no cgroup, no namespaces)",
    )
    shutil.rmtree(workspace)
    bench.save()


if __name__ == "__main__":
    main()
