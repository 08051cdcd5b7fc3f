"""The `agentnode` command as a user meets it: wall time of a whole process, start to exit.

- `agentnode exec -- /bin/true` against `bwrap --unshare-all ... /bin/true` (goal: p50 <= 40 ms);
- `agentnode --version` and `--help` against `python3 -c pass` (goal: p50 <= 60 ms);
- `agentnode submit -- /bin/true` and `agentnode ps` against a running node (a real
  `agentnode run` on a scratch data dir), against `python3 -c pass` (goal: p50 <= 60 ms).

Every figure is a fresh process, as a user's shell starts it; contenders alternate round-robin
so machine noise hits each alike.
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
from node_daemon import Daemon

AGENTNODE = [sys.executable, "-m", "agentnode"]
# `-m agentnode`, not the console script: the venv's script adds the same interpreter start.
PEER = [sys.executable, "-c", "pass"]
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
BWRAP += ["--tmpfs", "/tmp", "/bin/true"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - t0) * 1000


def race(
    runs: int, contenders: dict[str, list[str]], env: dict[str, str]
) -> dict[str, list[float]]:
    """Runs each argv `runs` times, interleaved; returns the wall times in ms."""
    for argv in contenders.values():  # warm-up: page cache, bytecode caches
        timed(argv, env)
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(runs):
        for name, argv in contenders.items():
            samples[name].append(timed(argv, env))
    return samples


def report(bench: Bench, samples: dict[str, list[float]], ours: str, peer: str, label: str) -> None:
    for q in (50, 90):
        bench.record(
            f"{ours}_p{q}_vs_{peer}",
            percentile(samples[ours], q),
            percentile(samples[peer], q),
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
    pycache = env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="agentnode-bench-pyc-")
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
    report(bench, samples, "exec", "python", "python3 -c pass")
    report(bench, samples, "version", "python", "python3 -c pass")
    report(bench, samples, "help", "python", "python3 -c pass")

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
        shutil.rmtree(pycache, ignore_errors=True)
    bench.save()


if __name__ == "__main__":
    main()
