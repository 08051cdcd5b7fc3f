"""`agentnode doctor`: its JSON against the schema, and what it finds on this host."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agentnode import doctor
from conftest import run_cli

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "doctor.schema.json").read_text())


def expected_layout() -> str:
    """The layout, read independently of the code under test."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    fstypes = [line.split(" - ")[1].split()[0] for line in lines]
    v2, v1 = "cgroup2" in fstypes, "cgroup" in fstypes
    return "hybrid" if v2 and v1 else "unified" if v2 else "legacy"


def leftovers() -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d.startswith("agentnode-doctor")]
        if top.count("/") > 6:
            dirs.clear()
    return found


@pytest.fixture(scope="module")
def root_report() -> tuple[int, dict[str, Any]]:
    r = run_cli(["doctor", "--json"])
    assert "Traceback" not in r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.root
def test_json_matches_schema_and_exits_0_as_root(root_report: tuple[int, dict[str, Any]]) -> None:
    code, rep = root_report
    jsonschema.validate(rep, SCHEMA)
    failed = [c for c in rep["checks"] if c["required"] and c["status"] != "ok"]
    assert failed == []
    assert rep["ok"] is True
    assert code == 0


@pytest.mark.root
def test_reports_this_hosts_layout_and_working_bpf(root_report: tuple[int, dict[str, Any]]) -> None:
    _, rep = root_report
    assert rep["hierarchy"]["layout"] == expected_layout()
    checks = {c["id"]: c for c in rep["checks"]}
    assert checks["bpf.cgroup_skb"]["status"] == "ok", checks["bpf.cgroup_skb"]
    assert "attached to and detached from" in checks["bpf.cgroup_skb"]["detail"]
    for ns in ("pid", "net", "mnt", "uts", "ipc", "cgroup", "user"):
        assert checks[f"ns.{ns}"]["status"] == "ok"
    assert checks["cgroup.create"]["status"] == "ok"
    assert checks["net.veth_bridge"]["status"] == "ok"


@pytest.mark.root
def test_cleans_up_after_itself(root_report: tuple[int, dict[str, Any]]) -> None:
    assert leftovers() == []


@pytest.mark.root
def test_unprivileged_reports_what_needs_root() -> None:
    r = run_cli(["doctor", "--json"], user=65534)
    assert "Traceback" not in r.stderr
    rep = json.loads(r.stdout)
    jsonschema.validate(rep, SCHEMA)
    assert rep["root"] is False
    statuses = {c["id"]: c["status"] for c in rep["checks"]}
    assert statuses["bpf.cgroup_skb"] == "needs_root"
    assert statuses["cgroup.create"] == "needs_root"
    assert statuses["kernel.version"] == "ok"
    assert r.returncode == 1
    table = run_cli(["doctor"], user=65534)
    assert "need root" in table.stdout.splitlines()[-1]


def test_table_has_a_verdict() -> None:
    r = run_cli(["doctor"])
    assert r.stdout.splitlines()[0].startswith("FEATURE")
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(("ready:", "not ready:"))


@pytest.mark.parametrize("width", [80, 100, 132])
def test_table_fits_the_terminal(width: int) -> None:
    """No line is wider than the terminal (a word longer than the width, a path, aside), and
    every check's fix is still shown."""
    rep = doctor.report()
    text = doctor.render(rep, width=width)
    for line in text.splitlines():
        assert len(line) <= width or " " not in line.strip(), line
    for c in rep["checks"]:
        assert c["feature"] in text
        for word in c["fix"].split()[:3]:
            assert word in text
