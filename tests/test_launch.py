"""The one spec a start hands to Rust (`agentnode.isolation.launch.Launch`) and the native
launcher that takes it: every field read by name, a Python hook's error passed on as it is,
nothing left behind by a start that fails."""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import pytest

from agentnode.isolation import Limits, Mount, Sandbox
from agentnode.isolation import task as task_mod
from agentnode.isolation.launch import CPU_PERIOD_US, USERNS_BASE, Launch


def launch(ws: Path, sandbox: Sandbox | None = None, argv: tuple[str, ...] = ("true",)) -> Launch:
    return Launch.of(
        sandbox or Sandbox(), argv, env={"PATH": "/bin"}, stage=task_mod.DATA_DIR / "stage",
        workspace=ws,
    )  # fmt: skip


def task_cgroups() -> set[str]:
    """The task cgroups of this process's instance, in every hierarchy, but for those made
    ahead of the next starts (spares and zygotes)."""
    launcher = task_mod._instance()
    ahead = {*launcher.spares(), *launcher.zygotes().values()}
    return {
        str(t) for d in launcher.dirs() for t in d.iterdir() if t.is_dir() and t.name not in ahead
    }


def settled(before: set[str]) -> set[str]:
    """`task_cgroups()` once it is `before` again, or after 15 s (a loaded host): a cgroup made
    ahead in the meantime is not one until it is listed as made ahead."""
    deadline = time.monotonic() + 15
    while (now := task_cgroups()) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


def test_of_puts_the_sandbox_in_the_kernels_terms(tmp_path: Path) -> None:
    sandbox = Sandbox(
        limits=Limits(cpus=0.25, cpu_weight=7, memory=64 << 20, swap=0, pids=9, nofile=99),
        uid=5,
        gid=6,
        userns=True,
        caps=("CAP_NET_BIND_SERVICE", "chown"),
        mounts=(Mount("/etc", "/mnt/etc"), Mount("/tmp", "/mnt/tmp", writable=True)),
        hostname="h1",
        cwd="/",
    )
    got = Launch.of(
        sandbox, ["sh", "-c", "x"], env={"A": "1", "B": "2=3"}, stage=tmp_path, workspace=None,
        netns="/run/netns/x", stdio=(0, None, 7), seccomp=False,
    )  # fmt: skip
    assert got.argv == ("sh", "-c", "x") and got.env == ("A=1", "B=2=3")
    assert (got.stage, got.workspace, got.netns) == (str(tmp_path), None, "/run/netns/x")
    assert (got.uid, got.gid, got.userns_base) == (5, 6, USERNS_BASE)
    assert got.keep_caps == (10, 0)
    assert got.binds == (("/etc", "/mnt/etc", False), ("/tmp", "/mnt/tmp", True))
    assert (got.cpu_quota_us, got.cpu_period_us) == (CPU_PERIOD_US // 4, CPU_PERIOD_US)
    assert (got.cpu_weight, got.memory_max, got.memory_high, got.swap_max) == (7, 64 << 20, None, 0)
    assert (got.pids_max, got.nofile, got.tmp_size) == (9, 99, Limits().tmp_size)
    assert (got.stdio, got.seccomp, got.hostname, got.cwd) == ((0, None, 7), False, "h1", "/")
    no_userns = Launch.of(Sandbox(), ["true"], env={}, stage=tmp_path, workspace=tmp_path)
    assert no_userns.userns_base is None and no_userns.cpu_quota_us is None


@pytest.mark.root
def test_the_launcher_reads_every_field_by_name(ws: Path) -> None:
    """A spec without one of `Launch`'s fields is refused with a TypeError naming it, before
    anything is made: so each field reaches Rust under the name the dataclass gives it."""
    whole = launch(ws)._asdict()
    before = task_cgroups()
    for name in whole:
        partial = types.SimpleNamespace(**{k: v for k, v in whole.items() if k != name})
        with pytest.raises(TypeError, match=rf"^Launch\.{name}: AttributeError"):
            task_mod._instance().start(partial)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^Launch\.uid: OverflowError"):
        task_mod._instance().start(launch(ws)._replace(uid=-1))
    with pytest.raises(TypeError, match=r"^Launch\.binds: "):
        bad: dict[str, Any] = {"binds": "/etc"}  # a str is a sequence, but not of binds
        task_mod._instance().start(launch(ws)._replace(**bad))
    assert settled(before) == before
    # The same object in full starts (a SimpleNamespace: any object with the attributes).
    native = task_mod._instance().start(types.SimpleNamespace(**whole))  # type: ignore[arg-type]
    assert native.wait(30) == (0, None)
    native.close()


@pytest.mark.root
def test_a_failing_hook_ends_the_start_and_leaves_nothing(ws: Path) -> None:
    """`before_start` sees the task's cgroup empty; what it raises reaches the caller as the
    same exception, and the cgroup made for the start is removed."""
    seen: list[str] = []

    class Refused(Exception):
        pass

    refusal = Refused("the hook says no")

    def hook(cgroup: Path) -> None:
        seen.append((cgroup / "cgroup.procs").read_text())
        raise refusal

    first = task_mod._instance().start(launch(ws))  # sets the zygotes going
    assert first.wait(30) == (0, None)
    first.close()
    deadline = time.monotonic() + 5
    while not task_mod._instance().zygotes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert task_mod._instance().zygotes()
    before = settled(set())  # the first task's cgroups go on a background thread
    for _ in range(3):  # a start with a hook never takes a zygote, ready as they are
        with pytest.raises(Refused) as caught:
            task_mod._instance().start(launch(ws), before_start=hook)
        assert caught.value is refusal
    assert seen == ["", "", ""]
    assert settled(before) == before
