"""What a task can reach past its namespaces, tried several ways: the host's unix sockets (by
path anywhere in the read-only host root and in binds, and abstract ones), socket address
families other than unix, IP and netlink, io_uring, and identities the kernel reads as "leave
unchanged". Each class through `spawn`, `agentnode exec` and the daemon, as the default user, as
root with capabilities and in a user namespace (which take the template's and the whole plan's
paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentnode.errors import AgentnodeError
from agentnode.isolation import Mount, spawn
from agentnode.node.runner import MCP_SOCKET, MCP_STDIO_SOCKET, SOCKET_DIR, TASK_SOCKET
from conftest import public_dir, run_cli
from support.node_daemon import daemon

pytestmark = pytest.mark.root

#: Connects to each argument (`@name`: an abstract socket) and prints what happened, as JSON.
CONNECT = textwrap.dedent(
    """
    import errno, json, socket, sys
    out = {}
    for target in sys.argv[1:]:
        address = "\\0" + target[1:] if target.startswith("@") else target
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(address)
            out[target] = "connected"
        except OSError as e:
            out[target] = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
    print(json.dumps(out))
    """
)

#: Ways to run a task as someone other than the default user: root with capabilities (from the
#: template), root with CAP_SYS_ADMIN and in a user namespace (both from the whole plan).
IDENTITIES: list[dict[str, Any]] = [
    {},
    {"user": 0, "caps": ["CAP_DAC_OVERRIDE", "CAP_NET_ADMIN"]},
    {"user": 0, "caps": ["CAP_SYS_ADMIN"]},
    {"user": 0, "userns": True},
]


def run_probe(ws: Path, argv: list[str], **kw: Any) -> tuple[int | None, str]:
    # Task root in a user namespace is an unprivileged host id: pytest's 0700 tmp_path is out of
    # its reach, so it gets a workspace of the node's making.
    workspace = None if kw.get("userns") else ws
    t = spawn(argv, workspace=workspace, stdout="pipe", stderr="pipe", **kw)
    assert t.stdout is not None and t.stderr is not None
    out = t.stdout.read().decode() + t.stderr.read().decode()
    res = t.wait(60)
    t.close()
    assert res is not None
    return res.exit_status, out


@contextlib.contextmanager
def listening(paths: list[str]) -> Iterator[list[socket.socket]]:
    """World-writable listening unix sockets at `paths` (`@name`: abstract), closed and removed
    after; the test asserts nobody connected to any."""
    socks = []
    try:
        for p in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            if p.startswith("@"):
                s.bind("\0" + p[1:])
            else:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(Path(p).parent, 0o777)
                s.bind(p)
                os.chmod(p, 0o777)
            s.listen()
            s.setblocking(False)
        # The node reads the host's bound sockets again every second (sandbox/sockets.rs).
        time.sleep(2.5)
        yield socks
    finally:
        for s, p in zip(socks, paths, strict=False):
            s.close()
            if not p.startswith("@"):
                Path(p).unlink(missing_ok=True)


def assert_untouched(socks: list[socket.socket]) -> None:
    for s in socks:
        with pytest.raises(BlockingIOError):
            s.accept()


@pytest.fixture
def places() -> Iterator[dict[str, str]]:
    """Host places a socket may sit in: /run, a directory under /var/lib, and a directory the
    task gets bound read-only (at `/tmp/bound`, and at `/srv/bound` which the host lacks)."""
    tag = uuid.uuid4().hex[:8]
    var = Path(f"/var/lib/agentnode-test-{tag}")
    bound = Path(f"/var/tmp/agentnode-test-{tag}")
    bound.mkdir(mode=0o755)
    yield {
        "run": f"/run/agentnode-test-{tag}.sock",
        "var": str(var / "s.sock"),
        "bound": str(bound / "s.sock"),
        "bound_dir": str(bound),
        "var_dir": str(var),
    }
    shutil.rmtree(var, ignore_errors=True)
    shutil.rmtree(bound, ignore_errors=True)


@pytest.mark.parametrize("who", IDENTITIES, ids=["nobody", "root-caps", "root-sysadmin", "userns"])
def test_no_host_socket_is_reachable_by_path(
    who: dict[str, Any], places: dict[str, str], ws: Path
) -> None:
    host = [places["run"], places["var"], places["bound"]]
    with listening(host) as socks:
        inside = [
            places["run"],
            places["run"].replace("/run/", "/var/run/"),  # the same through /var/run's symlink
            places["var"],
            "/tmp/bound/s.sock",
            "/srv/bound/s.sock",
        ]
        mounts = [Mount(places["bound_dir"], dest) for dest in ("/tmp/bound", "/srv/bound")]
        status, out = run_probe(
            ws, ["/usr/bin/python3", "-c", CONNECT, *inside], mounts=mounts, **who
        )
        assert status == 0, out
        got = json.loads(out)
        assert all(r != "connected" for r in got.values()), got
        assert_untouched(socks)


def test_a_socket_bound_after_the_template_is_masked_for_the_next_tasks(
    places: dict[str, str], ws: Path
) -> None:
    status, out = run_probe(ws, ["/usr/bin/python3", "-c", CONNECT, places["var"]])
    assert status == 0 and json.loads(out) == {places["var"]: "ENOENT"}, out
    late = str(Path(places["var_dir"]) / "late.sock")
    with listening([late]) as socks:
        deadline = time.monotonic() + 10
        while True:
            status, out = run_probe(ws, ["/usr/bin/python3", "-c", CONNECT, late])
            assert status == 0, out
            if json.loads(out)[late] != "connected":
                break
            assert time.monotonic() < deadline, "the late socket stayed reachable"
            time.sleep(0.3)
        # Drain what the probes before the refresh reached, then check nothing more came.
        with contextlib.suppress(BlockingIOError):
            while True:
                socks[0].accept()[0].close()
        status, out = run_probe(ws, ["/usr/bin/python3", "-c", CONNECT, late])
        assert json.loads(out)[late] != "connected"
        assert_untouched(socks)


def test_a_task_reaches_its_own_sockets_by_path_and_abstract(ws: Path) -> None:
    script = textwrap.dedent(
        """
        import os, socket, sys
        for address in ("/tmp/own.sock", "\\0own-" + str(os.getpid())):
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(address)
            srv.listen()
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(address)
            print("ok")
        """
    )
    for net in ("none", f"/proc/{os.getpid()}/ns/net"):
        status, out = run_probe(ws, ["/usr/bin/python3", "-c", script], network=net)
        assert status == 0 and out.split() == ["ok", "ok"], out


@pytest.mark.parametrize("who", IDENTITIES[:2], ids=["nobody", "root-caps"])
def test_no_host_abstract_socket_is_reachable(who: dict[str, Any], ws: Path) -> None:
    """A task's own network namespace has its own abstract names; a task on the host's network
    is kept to its own by Landlock's abstract-socket scope."""
    name = f"@agentnode-test-{uuid.uuid4().hex[:8]}"
    with listening([name]) as socks:
        argv = ["/usr/bin/python3", "-c", CONNECT, name]
        status, out = run_probe(ws, argv, **who)
        assert status == 0 and json.loads(out) == {name: "ECONNREFUSED"}, out
        status, out = run_probe(ws, argv, network=f"/proc/{os.getpid()}/ns/net", **who)
        assert status == 0 and json.loads(out) == {name: "EPERM"}, out
        assert_untouched(socks)


def test_exec_reaches_no_host_socket(places: dict[str, str], tmp_path: Path) -> None:
    with listening([places["run"], places["var"], places["bound"]]) as socks:
        for extra in ([], ["--user", "0", "--cap-add", "CAP_DAC_OVERRIDE"]):
            r = run_cli(["exec", "--ro", f"{places['bound_dir']}:/srv/bound", *extra, "--",
                         "/usr/bin/python3", "-c", CONNECT, places["run"], places["var"],
                         "/srv/bound/s.sock"])  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "connected" not in json.loads(r.stdout).values(), r.stdout
        assert_untouched(socks)


def test_daemon_tasks_reach_their_task_socket_and_no_other(
    places: dict[str, str], tmp_path: Path
) -> None:
    # The sockets are made after the daemon started (and built its template).
    with daemon(tmp_path) as d, listening([places["run"], places["var"]]) as socks:
        for user in ("65534", "0"):
            argv = ["/usr/bin/python3", "-c", CONNECT, places["run"], places["var"],
                    TASK_SOCKET, MCP_SOCKET, MCP_STDIO_SOCKET]  # fmt: skip
            t = d.submit(argv, user=user)
            assert d.wait(t["id"])["state"] == "succeeded", d.log(t["id"])
            got = json.loads(d.log(t["id"]))
            assert got == {
                places["run"]: "ENOENT",
                places["var"]: "ECONNREFUSED",
                TASK_SOCKET: "connected",
                MCP_SOCKET: "connected",
                MCP_STDIO_SOCKET: "connected",
            }, got
        assert_untouched(socks)


#: Lists the node's socket directory in a task and tries to add to it several ways.
SOCKET_DIR_PROBE = textwrap.dedent(
    """
    import errno, json, os, socket, sys
    d = sys.argv[1]
    out = {"list": sorted(os.listdir(d))}
    def attempt(name, f):
        try:
            f()
            out[name] = "done"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
    attempt("create", lambda: open(os.path.join(d, "x"), "w").close())
    attempt("mkdir", lambda: os.mkdir(os.path.join(d, "y")))
    attempt("unlink", lambda: os.unlink(os.path.join(d, "task.sock")))
    attempt("rename", lambda: os.rename(os.path.join(d, "task.sock"), os.path.join(d, "z")))
    attempt("bind", lambda: socket.socket(socket.AF_UNIX).bind(os.path.join(d, "w.sock")))
    attempt("chmod", lambda: os.chmod(d, 0o777))
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("who", [{"user": "65534"}, {"user": "0"}], ids=["nobody", "root"])
def test_the_socket_directory_shows_the_node_sockets_only_and_takes_no_writes(
    who: dict[str, str], tmp_path: Path
) -> None:
    # The host directory bound in is the daemon's own: a task must see nothing else of the
    # host there, and must not change what the next task (or a later daemon) finds.
    with daemon(tmp_path) as d:
        t = d.submit(["/usr/bin/python3", "-c", SOCKET_DIR_PROBE, SOCKET_DIR], **who)
        assert d.wait(t["id"])["state"] == "succeeded", d.log(t["id"])
        got = json.loads(d.log(t["id"]))
        assert got.pop("list") == ["mcp.sock", "mcps.sock", "memory.sock", "task.sock"], got
        assert all(v in ("EROFS", "EACCES", "EPERM") for v in got.values()), got
        host = d.data / "run" / "sockets"
        assert sorted(p.name for p in host.iterdir()) == [
            "mcp.sock",
            "mcps.sock",
            "memory.sock",
            "task.sock",
        ]
        assert (host.stat().st_mode & 0o7777, host.stat().st_uid) == (0o755, 0)
        run = host.parent.stat()
        assert (run.st_mode & 0o7777, run.st_uid, run.st_gid) == (0o710, 0, 100000)


# -- address families and io_uring -----------------------------------------------------------

FAMILIES = textwrap.dedent(
    """
    import ctypes, json, socket
    libc = ctypes.CDLL(None, use_errno=True)
    def err(r):
        return ctypes.get_errno() if r == -1 else 0
    out = {}
    for name, family, kind in [
        ("unix", 1, 1), ("inet", 2, 2), ("inet6", 10, 2), ("netlink", 16, 3),
        ("vsock", 40, 1), ("packet", 17, 3), ("bluetooth", 31, 3), ("alg", 38, 5),
        ("key", 15, 3), ("appletalk", 5, 2), ("tipc", 30, 2), ("rds", 21, 5), ("unspec", 0, 1),
        ("mctp", 45, 2), ("beyond", 1000, 1), ("negative", -1, 1),
    ]:
        fd = libc.socket(family, kind, 0)
        out[name] = err(fd)
        if fd >= 0:
            libc.close(fd)
    # Garbage above the int the kernel reads: the filter compares all 64 bits.
    out["high-vsock"] = err(libc.syscall(41, ctypes.c_uint64((1 << 32) | 40), 1, 0))
    pair = (ctypes.c_int * 2)()
    out["pair-unix"] = err(libc.socketpair(1, 1, 0, pair))
    out["pair-vsock"] = err(libc.socketpair(40, 1, 0, pair))
    out["pair-packet"] = err(libc.socketpair(17, 3, 0, pair))
    params = (ctypes.c_char * 120)()
    out["io_uring_setup"] = err(libc.syscall(425, 4, params))
    out["io_uring_enter"] = err(libc.syscall(426, 0, 0, 0, 0, 0, 0))
    out["io_uring_register"] = err(libc.syscall(427, 0, 0, 0, 0))
    print(json.dumps(out))
    """
)

ALLOWED = {"unix", "inet", "inet6", "netlink", "pair-unix"}
EAFNOSUPPORT, EPERM = 97, 1


def check_families(out: str) -> None:
    got = json.loads(out)
    for name, errno in got.items():
        if name in ALLOWED:
            assert errno == 0, (name, got)
        elif name.startswith("io_uring"):
            assert errno == EPERM, (name, got)
        else:
            assert errno == EAFNOSUPPORT, (name, got)


@pytest.mark.parametrize("who", IDENTITIES, ids=["nobody", "root-caps", "root-sysadmin", "userns"])
def test_only_unix_ip_and_netlink_sockets_and_no_io_uring(who: dict[str, Any], ws: Path) -> None:
    status, out = run_probe(ws, ["/usr/bin/python3", "-c", FAMILIES], **who)
    assert status == 0, out
    check_families(out)


def test_the_x32_abi_ends_the_task(ws: Path) -> None:
    """x32 numbers (bit 30 set) are the same architecture to seccomp: the filter must not let
    `socket` in through them."""
    probe = "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 41, 40, 1, 0); print('alive')"
    t = spawn(["/usr/bin/python3", "-c", probe], workspace=ws, stdout="pipe", stderr="pipe")
    assert t.stdout is not None
    out = t.stdout.read().decode()
    res = t.wait(60)
    t.close()
    assert res is not None and res.signal == 31 and "alive" not in out, (res, out)


def test_exec_and_daemon_refuse_other_families(tmp_path: Path) -> None:
    r = run_cli(["exec", "--", "/usr/bin/python3", "-c", FAMILIES])
    assert r.returncode == 0, r.stderr
    check_families(r.stdout)
    with daemon(tmp_path) as d:
        t = d.submit(["/usr/bin/python3", "-c", FAMILIES], user="0", caps=["CAP_NET_RAW"])
        assert d.wait(t["id"])["state"] == "succeeded", d.log(t["id"])
        check_families(d.log(t["id"]))


# -- identities --------------------------------------------------------------------------------

IDS = "grep -E '^(Uid|Gid|Groups):' /proc/self/status | tr -s '\\t ' ' '"


@pytest.mark.parametrize("user", ["4294967294", "1234:5678", "0"])
def test_real_effective_saved_ids_and_groups_are_the_ones_asked(user: str, ws: Path) -> None:
    uid, _, gid = user.partition(":")
    gid = gid or uid
    status, out = run_probe(ws, ["sh", "-c", IDS], user=user)
    assert status == 0, out
    lines = [line.strip() for line in out.splitlines()]
    assert lines == [f"Uid: {uid} {uid} {uid} {uid}", f"Gid: {gid} {gid} {gid} {gid}", "Groups:"]


def test_uid_minus_one_is_refused_on_every_door(ws: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for user in ("4294967295", "4294967295:0", "0:4294967295"):
        # Refused where the spec is made (SpecError); the binding refuses it too (SandboxError).
        with pytest.raises(AgentnodeError, match="4294967295"):
            run_probe(ws, ["true"], user=user)
        r = run_cli(["exec", "--user", user, "--", "true"], timeout=60)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "4294967295" in r.stderr and "Traceback" not in r.stderr
    # exec keeps the workspaces it makes: a data dir of its own shows none was left.
    res = _exec_with_data(data, ["--user", "4294967295", "--", "true"])
    assert res.returncode != 0
    workspaces = data / "workspaces"
    assert not workspaces.exists() or not any(workspaces.iterdir()), "no workspace left"


def _exec_with_data(data: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentnode", "exec", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"AGENTNODE_DATA_DIR": str(data)},
    )


def test_exec_workspace_is_owned_by_the_task_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for user, owner in (("4294967294", (4294967294, 4294967294)), ("1234:5678", (1234, 5678))):
        res = _exec_with_data(data, ["--user", user, "--", "sh", "-c", "touch /workspace/f; id -u"])
        assert res.returncode == 0, res.stderr
        made = [p for p in (data / "workspaces").iterdir() if (p / "f").exists()]
        assert len(made) == 1
        assert (made[0].stat().st_uid, made[0].stat().st_gid) == owner
        assert (made[0] / "f").stat().st_uid == owner[0]
        shutil.rmtree(made[0])


def test_daemon_tasks_get_exactly_their_ids(tmp_path: Path) -> None:
    with daemon(tmp_path) as d:
        for user, (uid, gid) in (
            ("4294967294", ("4294967294",) * 2),
            ("1234:5678", ("1234", "5678")),
        ):
            t = d.submit(["sh", "-c", IDS], user=user)
            assert d.wait(t["id"])["state"] == "succeeded", d.log(t["id"])
            lines = [line.strip() for line in d.log(t["id"]).splitlines()]
            assert lines == [
                f"Uid: {uid} {uid} {uid} {uid}",
                f"Gid: {gid} {gid} {gid} {gid}",
                "Groups:",
            ]
            ws = d.data / "workspaces" / t["id"]
            assert (str(ws.stat().st_uid), str(ws.stat().st_gid)) == (uid, gid)


#: In the task: the data dir's listing, whether a store file there reads, and the own workspace.
_PEEK = """
import os, sys
data = sys.argv[1]
try:
    seen = sorted(os.listdir(data))
except OSError as e:
    seen = [type(e).__name__]
try:
    leaked = open(os.path.join(data, "tasks", "db", "000001.log")).read()
except OSError:
    leaked = ""
open("/workspace/mine", "w").write("ok")
print(seen, repr(leaked), open("/workspace/mine").read())
"""


@pytest.mark.parametrize(
    "args",
    [[], ["--user", "0"], ["--userns"], ["--ro", "/etc:/mnt/etc"], ["--user", "0", "--userns"]],
    ids=["nobody", "uid0", "userns", "whole-plan", "uid0-userns"],
)
def test_no_task_sees_the_nodes_data_dir(args: list[str]) -> None:
    """Every tenant's stores and workspaces live in the data dir, and a task sees the host's
    root: the data dir is an empty, read-only directory in every task, whatever its identity
    and however its root is made, while its own workspace still comes from there."""
    # Outside /tmp, which every task gets fresh: the default data dir is /var/lib/agentnode.
    with public_dir("hide") as data:
        store = data / "tasks" / "db"
        store.mkdir(parents=True)
        (store / "000001.log").write_text("SECRET-OF-ANOTHER-TENANT")
        (store / "000001.log").chmod(0o644)
        store.chmod(0o755)
        (data / "tasks").chmod(0o755)
        res = _exec_with_data(data, [*args, "--", "/usr/bin/python3", "-c", _PEEK, str(data)])
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["[]", "''", "ok"], res.stdout
        # The workspace the task wrote is the host's, under the data dir.
        [ws] = (data / "workspaces").iterdir()
        assert (ws / "mine").read_text() == "ok"
