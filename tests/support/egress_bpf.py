"""What the kernel holds for egress enforcement, read with bpftool: the programs attached to a
cgroup, the maps they use, and a task's entries in the node maps (keys start with its id)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The node maps whose keys start with a task's id, and where in the key it starts (the LPM
#: trie's key starts with its prefix length).
ENTRY_MAPS = {"allow": 4, "allow_host": 0, "exact": 0}


def _json(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip() or "[]")


def attached_programs(cg: Path) -> list[str]:
    """The names of the programs attached to cgroup `cg`."""
    return [p["name"] for p in _json("cgroup", "show", str(cg))]


def program_ids(cg: Path) -> set[int]:
    """The ids of the programs attached to cgroup `cg`."""
    return {int(p["id"]) for p in _json("cgroup", "show", str(cg))}


def map_ids(cg: Path) -> set[int]:
    """The ids of the maps the programs attached to cgroup `cg` use."""
    return maps_of(program_ids(cg))


def maps_of(progs: Iterable[int]) -> set[int]:
    """The ids of the maps programs `progs` use."""
    ids: set[int] = set()
    for prog in progs:
        ids.update(_json("prog", "show", "id", str(prog)).get("map_ids", []))
    return ids


def exists(kind: str, obj_id: int) -> bool:
    """Whether the kernel still has the program or map (`kind`) `obj_id`."""
    r = subprocess.run(["bpftool", kind, "show", "id", str(obj_id)], capture_output=True)
    return r.returncode == 0


def task_entries(maps: set[int], task_id: int) -> int:
    """How many entries of the task with id `task_id` the node maps among `maps` hold (rules
    and learned addresses; a task's storage is the cgroup's, freed with it)."""
    n = 0
    for m in maps:
        info = _json("map", "show", "id", str(m))
        start = ENTRY_MAPS.get(info.get("name", ""))
        if start is None:
            continue
        for e in _json("map", "dump", "id", str(m)):
            key = bytes(int(b, 16) for b in e["key"])
            n += int.from_bytes(key[start : start + 8], "little") == task_id
    return n


def pinned_program_ids(pin_dir: Path) -> dict[str, int]:
    """The ids of the programs pinned in `pin_dir` (the node's egress programs), by name."""
    return {
        p.name: int(_json("prog", "show", "pinned", str(p))["id"])
        for p in sorted(pin_dir.iterdir())
        if p.name.startswith("egress_")
    }


def wait_gone(kind: str, ids: Iterable[int], timeout: float = 5) -> list[int]:
    """Waits until the kernel has none of the programs or maps (`kind`) `ids` (it frees them
    after an RCU grace period); returns those still there."""
    deadline = time.monotonic() + timeout
    left = list(ids)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [i for i in left if exists(kind, i)]
    return left
