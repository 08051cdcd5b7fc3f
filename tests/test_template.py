"""Tasks started from the template mount namespace: what they share (a read-only skeleton) and
what they must not (/tmp, /dev/shm, workspace), rebuilds when the host's mounts change, and the
tasks that take the whole mount plan instead.

A task's root file system tells the two ways apart: every template task's root is the one
read-only tmpfs of the template (one device number), each whole-plan task has a tmpfs of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agentnode.isolation import Mount, spawn

pytestmark = pytest.mark.root


def sh(script: str, ws: Path, **kw: object) -> str:
    """Runs a shell script in a task to completion; returns its stdout and stderr."""
    t = spawn(["sh", "-c", script], workspace=ws, stdout="pipe", stderr="pipe", **kw)  # type: ignore[arg-type]
    assert t.stdout is not None and t.stderr is not None
    out = t.stdout.read().decode() + t.stderr.read().decode()
    res = t.wait(60)
    t.close()
    assert res is not None and res.exit_status == 0, out
    return out


def root_dev(ws: Path, **kw: object) -> str:
    return sh("stat -c %d /", ws, **kw).strip()


def same_root(script: str, ws: Path, **kw: object) -> tuple[str, bool]:
    """Runs `script` (whose output ends in its root's device) and a plain task after it: its
    output, and whether both had the same root. Tries again when they differ, as a mount on
    the host (other tests do some) rebuilds the template in between."""
    for _ in range(5):
        out = sh(script, ws, **kw)
        if out.split()[-1] == root_dev(ws):
            return out, True
    return out, False


def test_template_tasks_share_a_read_only_skeleton_even_as_root(ws: Path) -> None:
    assert same_root("stat -c %d /", ws)[1]
    out = sh(
        "touch /x 2>/dev/null && echo root-writable; "
        "mkdir /dev/x 2>/dev/null && echo dev-writable; "
        "echo ok > /dev/null && echo null-ok",
        ws,
        user=0,
    )
    assert "writable" not in out and "null-ok" in out, out


def test_concurrent_tasks_see_only_their_own_tmp_and_shm(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    a_ws, b_ws = tmp_path / "a", tmp_path / "b"
    for d in (a_ws, b_ws):
        d.mkdir()
        os.chown(d, 65534, 65534)
    a = spawn(
        ["sh", "-c", f"touch /tmp/{marker} /dev/shm/{marker} /workspace/{marker}; sleep 30"],
        workspace=a_ws,
    )
    try:
        deadline = time.monotonic() + 10
        while not (a_ws / marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (a_ws / marker).exists()
        out = sh(
            f"ls /tmp /dev/shm /workspace; cat /tmp/{marker} /dev/shm/{marker} 2>&1; true", b_ws
        )
        assert out.count(marker) == 2, out  # only cat's two "No such file" lines
    finally:
        a.kill()
        a.close()


def test_a_host_mount_made_after_the_start_is_seen_by_later_tasks(ws: Path) -> None:
    sh("true", ws)  # the template exists before the host mount
    point = Path("/mnt", f"agentnode-tmpl-{uuid.uuid4().hex[:12]}")
    point.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
        try:
            (point / "f").write_text("fresh")
            assert sh(f"cat {point}/f", ws) == "fresh"
        finally:
            subprocess.run(["umount", str(point)], check=True)
        assert sh(f"ls {point}", ws) == ""
    finally:
        point.rmdir()


def test_bind_onto_an_existing_host_path_uses_the_template(ws: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("bound")
    out, shared = same_root(
        "cat /opt/f; echo; touch /opt/x 2>/dev/null && echo ro-writable; stat -c %d /",
        ws,
        mounts=[Mount(str(src), "/opt")],
    )
    assert out.startswith("bound") and "writable" not in out and shared, out


def own_root(ws: Path | None, **kw: object) -> bool:
    """Whether a task gets a root of its own rather than the template's. Compared while it
    runs: once it ends, a rebuilt template may get its freed device number."""
    t = spawn(["sh", "-c", "stat -c %d /; exec sleep 30"], workspace=ws, stdout="pipe", **kw)  # type: ignore[arg-type]
    try:
        assert t.stdout is not None
        dev = t.stdout.readline().decode().strip()
        return bool(dev) and dev != root_dev(ws or Path(t.workspace))
    finally:
        t.kill()
        t.close()
        if ws is None:
            shutil.rmtree(t.workspace)


def test_tasks_the_template_cannot_hold_take_the_whole_plan(ws: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    mounts = [Mount(str(src), "/agentnode-new")]
    assert sh("cat /agentnode-new/f", ws, mounts=mounts) == "new"
    assert own_root(ws, mounts=mounts)
    assert own_root(None, user=0, userns=True)


def test_a_custom_rootfs_takes_the_whole_plan(ws: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr").mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(os.readlink(f"/{link}"), rootfs / link)
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "marker").write_text("custom")
    subprocess.run(["mount", "--bind", "/usr", str(rootfs / "usr")], check=True)
    try:
        assert sh("cat /etc/marker", ws, rootfs=str(rootfs)) == "custom"
        assert own_root(ws, rootfs=str(rootfs))
    finally:
        subprocess.run(["umount", str(rootfs / "usr")], check=True)


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs mkfs.ext4 and a loop device")
def test_a_file_system_unmounted_on_the_host_is_not_kept_busy(ws: Path, tmp_path: Path) -> None:
    """The template holds copies of the host's mounts: a watcher drops it once they change, so
    the unmounted file system goes (ext4 lists each live one under /sys/fs/ext4)."""
    img = tmp_path / "img"
    with img.open("wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(img)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    point = Path("/mnt", f"agentnode-tmpl-{uuid.uuid4().hex[:12]}")
    point.mkdir()
    try:
        subprocess.run(["mount", loop, str(point)], check=True)
        try:
            assert "lost+found" in sh(f"ls {point}", ws)
        finally:
            subprocess.run(["umount", str(point)], check=True)
        live = Path("/sys/fs/ext4", Path(loop).name)
        # Every template on the host (other tests' daemons too) drops its copy once its watcher
        # runs: seconds on a loaded host.
        deadline = time.monotonic() + 30
        while live.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not live.exists()
    finally:
        point.rmdir()
        subprocess.run(["losetup", "-d", loop], check=True)


def test_network_namespaces_coming_and_going_keep_the_template(ws: Path) -> None:
    """`ip netns add` pins a namespace with an nsfs mount (egress tasks make one each): the
    template neither copies those pins nor counts them as a change of the host's mounts.

    Other tests mount things on the host meanwhile, and each such mount is a real change: a
    round that sees a new template is tried again, and one round of five keeping it is enough,
    as a template that counted the pins would be rebuilt in every round."""
    names: list[str] = []

    def netns(verb: str, name: str) -> None:
        subprocess.run(["ip", "netns", verb, name], check=True)

    try:
        kept = False
        for _ in range(5):
            names += [f"agentnode-tmpl-{uuid.uuid4().hex[:8]}" for _ in range(2)]
            netns("add", names[-2])
            # The first namespace may make /run/netns a mount point: a real change, a new template.
            first = root_dev(ws)
            # (A task's /run is empty besides: the pin is not even there.)
            assert "nsfs" not in sh(f"stat -f -c %T /run/netns/{names[-2]} 2>&1 || true", ws)
            netns("add", names[-1])
            netns("del", names[-2])
            if root_dev(ws) == first:
                kept = True
                break
        assert kept
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
