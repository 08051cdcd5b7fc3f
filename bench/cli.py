"""The `agentnode` command as a user meets it: a whole process, start to exit.

- `agentnode exec -- /bin/true` against `bwrap --unshare-all ... /bin/true` and against
  `python3 -c pass` (goal: wall p50 <= 40 ms);
- `agentnode --version` and `--help` against `python3 -c pass` (goal: p50 <= 60 ms);
- `agentnode submit -- /bin/true` and `agentnode ps` against a running node (a real
  `agentnode run` on a scratch data dir), against `python3 -c pass` (goal: p50 <= 60 ms).

Every figure is a fresh process, as a user's shell starts it; contenders alternate round-robin
so machine noise hits each alike. Wall p50 and p90 are the goals; CPU p50 (user + system) is
also recorded because on a shared box waiting for a core inflates wall time, while CPU time
shows what the command itself costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import Bench, percentile

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from support.node_daemon import Daemon

# The `agentnode` console script next to this interpreter (the venv's), as a user's shell runs
# it; `python -m agentnode` where there is none (it costs ~1 ms more: runpy and its imports).
_SCRIPT = Path(sys.executable).with_name("agentnode")
AGENTNODE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "agentnode"]
PEER = [sys.executable, "-c", "pass"]
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
BWRAP += ["--tmpfs", "/tmp", "/bin/true"]

Samples = dict[str, list[tuple[float, float]]]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run, in ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - t0) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return wall, (usage.ru_utime + usage.ru_stime) * 1000


def race(runs: int, contenders: dict[str, list[str]], env: dict[str, str]) -> Samples:
    """Runs each argv `runs` times, interleaved; returns (wall, CPU) times in ms."""
    for argv in contenders.values():  # warm-up: page cache, bytecode caches
        timed(argv, env)
    samples: Samples = {k: [] for k in contenders}
    for _ in range(runs):
        for name, argv in contenders.items():
            samples[name].append(timed(argv, env))
    return samples


def report(bench: Bench, samples: Samples, ours: str, peer: str, label: str) -> None:
    for figure, index, q in (("p50", 0, 50), ("p90", 0, 90), ("cpu_p50", 1, 50)):
        bench.record(
            f"{ours}_{figure}_vs_{peer}",
            percentile([s[index] for s in samples[ours]], q),
            percentile([s[index] for s in samples[peer]], q),
            "ms",
            peer_name=label,
        )


def main() -> None:
    bench = Bench.from_args("cli")
    runs = 15 if bench.quick else 100
    env = dict(os.environ)
    # As installed: with bytecode caches (a test environment may turn their writing off, and
    # compiling every module at every start would be most of what is measured).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    workspace = tempfile.mkdtemp(prefix="agentnode-bench-")

    local = {
        "exec": [*AGENTNODE, "exec", "--workspace", workspace, "--", "/bin/true"],
        "version": [*AGENTNODE, "--version"],
        "help": [*AGENTNODE, "--help"],
        "python": PEER,
    }
    if shutil.which("bwrap"):
        local["bwrap"] = BWRAP
    samples = race(runs, local, env)
    if "bwrap" in samples:
        report(bench, samples, "exec", "bwrap", "bwrap --unshare-all, /bin/true")
    for ours in ("exec", "version", "help"):
        report(bench, samples, ours, "python", "python3 -c pass")

    root = Path(tempfile.mkdtemp(prefix="agentnode-bench-cli-"))
    daemon = Daemon(root)
    daemon.start()
    try:
        env["AGENTNODE_SOCKET"] = str(daemon.socket)
        node = {
            "submit": [*AGENTNODE, "submit", "--", "/bin/true"],
            "ps": [*AGENTNODE, "ps"],
            "python": PEER,
        }
        samples = race(runs, node, env)
        report(bench, samples, "submit", "python", "python3 -c pass")
        report(bench, samples, "ps", "python", "python3 -c pass")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)
    bench.save()


if __name__ == "__main__":
    main()
