"""`agentnode doctor`: does this host have what the node needs?

The probes live in Rust (`agentnode_core::doctor`) and try each capability for real; this module
renders their report. The JSON form (`--json`) follows `docs/doctor.schema.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from typing import TYPE_CHECKING, Any

from agentnode import _native

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser

__all__ = ["add_parser", "render", "report"]

_STATUS = {"ok": "ok", "missing": "MISSING", "needs_root": "needs root"}


def report() -> dict[str, Any]:
    """Runs every probe and returns the report (a dict following docs/doctor.schema.json)."""
    result: dict[str, Any] = json.loads(_native.doctor())
    result["checks"].extend(_agent_check(name) for name in ("openclaw", "autogpt"))
    return result


def _agent_check(name: str) -> dict[str, Any]:
    """Whether `--agent NAME` tasks can run here (optional: other kinds need nothing)."""
    from agentnode.agents import autogpt, openclaw
    from agentnode.agents.kinds import agents_cache
    from agentnode.node.paths import DEFAULT_DATA_DIR

    cache = agents_cache(DEFAULT_DATA_DIR)
    found = (openclaw if name == "openclaw" else autogpt).status(cache)
    on = f" on node {found['node']}" if found and "node" in found else ""
    return {
        "id": f"agents.{name}",
        "feature": f"{'OpenClaw' if name == 'openclaw' else 'AutoGPT'} agent runtime",
        "status": "ok" if found else "missing",
        "required": False,
        "detail": (
            f"{name} {found[name]}{on} in {found['home']}"
            if found
            else f"not installed in {cache / name}"
        ),
        "fix": "" if found else f"sudo agentnode agents install {name}",
    }


def render(rep: dict[str, Any], *, width: int | None = None) -> str:
    """The report for a terminal `width` columns wide (default: this one's): a table of
    feature, status, detail and what to do when it fits, else one block per check with the
    detail and the fix wrapped under it; then a verdict."""
    cols = width or shutil.get_terminal_size((80, 24)).columns
    rows = [("FEATURE", "STATUS", "DETAIL", "WHAT TO DO")]
    for c in rep["checks"]:
        status = _STATUS[c["status"]] + ("" if c["required"] else " (optional)")
        rows.append((c["feature"], status, c["detail"], c["fix"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    if sum(widths) + 6 <= cols:
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)).rstrip() for r in rows]
    else:
        lines = [f"{rows[0][0].ljust(widths[0])}  {rows[0][1]}"]
        for feature, status, detail, fix in rows[1:]:
            lines.append(f"{feature.ljust(widths[0])}  {status}".rstrip())
            lines += _wrapped(detail, cols, "    ")
            if fix:
                lines += _wrapped(f"fix: {fix}", cols, "    ")
    lines.append("")
    lines.append(verdict(rep))
    return "\n".join(lines)


def _wrapped(text: str, cols: int, indent: str) -> list[str]:
    # Paths do not break at hyphens: a user copies them.
    return textwrap.wrap(
        text,
        max(cols, 40) - 1,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
    )


def verdict(rep: dict[str, Any]) -> str:
    """One line: ready, or what is missing and what was not tried."""
    missing = [c["id"] for c in rep["checks"] if c["required"] and c["status"] == "missing"]
    untried = [c["id"] for c in rep["checks"] if c["required"] and c["status"] == "needs_root"]
    if rep["ok"]:
        return f"ready: this host has everything agentnode needs (kernel {rep['kernel']})"
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if untried:
        parts.append(f"{len(untried)} required checks need root (run: sudo agentnode doctor)")
    return "not ready: " + "; ".join(parts)


def _run(args: argparse.Namespace) -> int:
    rep = report()
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 0 if rep["ok"] else 1


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Registers `agentnode doctor`."""
    p = sub.add_parser(
        "doctor",
        description=(
            "Probe this host by trying each capability for real (cgroups, namespaces, clone3, "
            "pidfds, seccomp, BPF, networking) and clean up after. Exit 0 when everything "
            "required works, 1 otherwise. Unprivileged, probes that need root are reported "
            "as 'needs root'."
        ),
    )
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON (docs/doctor.schema.json)"
    )
    p.set_defaults(func=_run)
