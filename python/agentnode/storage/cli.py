"""`agentnode memory`: look at and fix a tenant's memory (episodic records, objects, vector
collections) through the memory API, and `memory serve` to run that API on its own.

Things are named by path: `episodic[/NAMESPACE/TASK[/ID]]`, `objects[/NAME]`,
`vectors[/COLLECTION[/KEY]]`. On the node, the admin socket serves every tenant to the
operator (`--tenant` picks one); inside a task, or against `memory serve`, the endpoint and token
come from AGENTNODE_URL and AGENTNODE_TOKEN and the token decides the tenant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from agentnode.errors import MemoryKeyError, UsageError
from agentnode.storage import serve

if TYPE_CHECKING:
    from agentnode.cli import ArgumentParser
    from agentnode.sdk.memory import Memory

__all__ = ["add_parser"]

KINDS = ("episodic", "objects", "vectors")


def add_parser(sub: argparse._SubParsersAction[ArgumentParser]) -> None:
    """Registers `agentnode memory` and its commands."""
    p = sub.add_parser(
        "memory",
        description="Inspect and fix a tenant's memory. Paths: episodic[/NAMESPACE/TASK[/ID]], "
        "objects[/NAME], vectors[/COLLECTION[/KEY]].",
    )
    cmds = p.add_subparsers(title="memory commands", metavar="COMMAND", parser_class=type(p))

    s = cmds.add_parser("ls", help="list tasks, records, objects or collections")
    s.add_argument("path", nargs="?", default="", metavar="PATH", help="what to list (all kinds)")
    s.add_argument("--limit", type=int, default=100, help="records at most (default 100)")
    _connection(s)
    s.set_defaults(func=_ls)

    s = cmds.add_parser("get", help="print a record, an object or a vector")
    s.add_argument("path", metavar="PATH", help="episodic/NS/TASK/ID, objects/NAME, vectors/C/KEY")
    s.add_argument("-o", "--output", type=Path, metavar="FILE", help="write an object to FILE")
    _connection(s)
    s.set_defaults(func=_get)

    s = cmds.add_parser(
        "put",
        help="add a record, store an object, create a collection or upsert a vector",
        description="episodic/NS/TASK VALUE (JSON) appends a record; objects/NAME [FILE] stores "
        "FILE (default stdin); vectors/C --dims N creates a collection; vectors/C/KEY VECTOR "
        "(a JSON list) upserts a vector.",
    )
    s.add_argument("path", metavar="PATH")
    s.add_argument("value", nargs="?", metavar="VALUE", help="JSON value, vector or FILE")
    s.add_argument("--id", help="record id (default: a new one)")
    s.add_argument("--ttl", type=float, metavar="SECONDS", help="record lifetime")
    s.add_argument("--dims", type=int, help="a new collection's dimensions")
    s.add_argument("--metric", default="cos", choices=("cos", "l2", "ip"), help="default cos")
    s.add_argument("--metadata", metavar="JSON", help="a vector's metadata (a JSON object)")
    _connection(s)
    s.set_defaults(func=_put)

    s = cmds.add_parser("rm", help="delete a record, an object, a vector or a collection")
    s.add_argument("path", metavar="PATH", help="episodic/NS/TASK/ID, objects/NAME, vectors/C[/K]")
    _connection(s)
    s.set_defaults(func=_rm)

    s = cmds.add_parser("search", help="the nearest vectors of a collection")
    s.add_argument("path", metavar="vectors/COLLECTION")
    s.add_argument("vector", metavar="VECTOR", help="the query, a JSON list of numbers")
    s.add_argument("-k", type=int, default=10, help="how many (default 10)")
    _connection(s)
    s.set_defaults(func=_search)

    serve.add_parser(cmds)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="on the node's admin socket: whose memory (default: default)")
    p.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="node socket ($AGENTNODE_SOCKET, default /run/agentnode/api.sock)",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines")


def _memory(args: argparse.Namespace) -> Memory:
    """The node's admin socket for the operator, or the AGENTNODE_URL endpoint with its token
    (in a task, or a `memory serve`) when that is set and no socket or tenant is asked for."""
    from agentnode.node.client import default_socket
    from agentnode.node.paths import ADMIN_MEMORY
    from agentnode.sdk.memory import Memory
    from agentnode.storage.keys import check_name
    from agentnode.storage.tenancy import OPERATOR_PREFIX

    url, token = os.environ.get("AGENTNODE_URL"), os.environ.get("AGENTNODE_TOKEN")
    if url and token and args.socket is None and args.tenant is None:
        return Memory(url, token)
    try:
        tenant = check_name("tenant", args.tenant or "default")
    except MemoryKeyError as e:
        raise UsageError(f"--tenant: {e}") from None
    socket = quote(str(args.socket or default_socket()), safe="")
    return Memory(f"http+unix://{socket}{ADMIN_MEMORY}", OPERATOR_PREFIX + tenant)


@contextlib.contextmanager
def _session(args: argparse.Namespace) -> Iterator[Memory]:
    """A memory client for the command; a name the API finds malformed is a usage error."""
    with _memory(args) as mem:
        try:
            yield mem
        except MemoryKeyError as e:
            raise UsageError(str(e)) from None


def _split(path: str, *, lo: int, hi: int, command: str) -> list[str]:
    """`path`'s parts, checked: a known kind, then `lo` to `hi` names in all."""
    parts = path.strip("/").split("/") if path.strip("/") else []
    if parts and parts[0] not in KINDS:
        raise UsageError(
            f"{command}: {path!r} does not start with {', '.join(KINDS)} "
            "(e.g. episodic/NAMESPACE/TASK/ID, objects/NAME, vectors/COLLECTION/KEY)"
        )
    if not lo <= len(parts) <= hi or "" in parts:
        raise UsageError(
            f"{command}: {path!r} does not name what {command} works on "
            "(see 'agentnode memory --help')"
        )
    return parts


def _q(name: str) -> str:
    # The API checks every name; escaping keeps a malformed one from reaching another route.
    return quote(name, safe="")


def _key(text: str) -> int:
    try:
        key = int(text)
    except ValueError:
        raise UsageError(f"vector key {text!r} is not a whole number (keys are integers)") from None
    if not 0 <= key < 1 << 64:
        raise UsageError(f"vector key {text!r} is out of range (0 to 2^64-1)")
    return key


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{what} is not JSON ({e}; quote strings: '\"text\"')") from None


def _vector(text: str) -> list[float]:
    value = _json(text, "the vector")
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, int | float) and math.isfinite(x) for x in value)
    ):
        raise UsageError("the vector must be a JSON list of finite numbers (e.g. '[0.1, 0.2]')")
    return [float(x) for x in value]


def _emit(args: argparse.Namespace, data: Any, line: str) -> None:
    print(json.dumps(data) if args.json else line)


def _ls(args: argparse.Namespace) -> int:
    parts = _split(args.path, lo=0, hi=3, command="ls")
    if args.limit < 1:
        raise UsageError(f"--limit: {args.limit} must be at least 1")
    kind, rest = (parts[0], parts[1:]) if parts else ("", [])
    with _session(args) as mem:
        if kind in ("", "episodic") and len(rest) < 2:
            prefix = rest[0] if rest else ""
            for ns, task in mem.tasks(prefix):
                _emit(args, {"namespace": ns, "task": task}, f"episodic/{ns}/{task}")
        elif kind == "episodic":
            for r in mem.scan(_q(rest[0]), _q(rest[1]), limit=args.limit):
                _emit(args, r, f"{r['id']}  {json.dumps(r['value'])[:200]}")
        if kind in ("", "objects"):
            if len(rest) > 1:
                raise UsageError(
                    "ls: objects/PREFIX takes one name (see 'agentnode memory --help')"
                )
            for o in mem.objects(rest[0] if rest else ""):
                _emit(args, o, f"objects/{o['name']}  {o['size']}")
        if kind in ("", "vectors"):
            if rest:
                raise UsageError("ls: vectors lists collections (get vectors/COLLECTION/KEY)")
            for name in mem.collections():
                _emit(args, {"collection": name}, f"vectors/{name}")
    return 0


def _get(args: argparse.Namespace) -> int:
    parts = _split(args.path, lo=2, hi=4, command="get")
    kind = parts[0]
    with _session(args) as mem:
        if kind == "episodic" and len(parts) == 4:
            print(json.dumps(mem.get(*map(_q, parts[1:]))))
        elif kind == "objects" and len(parts) == 2:
            out = args.output.open("wb") if args.output else sys.stdout.buffer
            try:
                for chunk in mem.get_object(_q(parts[1])):
                    out.write(chunk)
                out.flush()
            finally:
                if args.output:
                    out.close()
        elif kind == "vectors" and len(parts) == 3:
            print(json.dumps(mem.get_vector(_q(parts[1]), _key(parts[2]))))
        else:
            raise UsageError(
                f"get: {args.path!r} names no single thing "
                "(episodic/NS/TASK/ID, objects/NAME, vectors/COLLECTION/KEY)"
            )
    return 0


def _put(args: argparse.Namespace) -> int:
    parts = _split(args.path, lo=2, hi=3, command="put")
    kind = parts[0]
    with _session(args) as mem:
        if kind == "episodic" and len(parts) == 3:
            if args.value is None:
                raise UsageError("put: a record needs a VALUE (JSON, e.g. '{\"step\": 1}')")
            if args.ttl is not None and not (math.isfinite(args.ttl) and args.ttl > 0):
                raise UsageError(f"--ttl: {args.ttl} must be a positive number of seconds")
            value = _json(args.value, "VALUE")
            print(mem.append(_q(parts[1]), _q(parts[2]), value, id=args.id, ttl=args.ttl))
        elif kind == "objects" and len(parts) == 2:
            if args.value in (None, "-"):
                info = mem.put_object(_q(parts[1]), sys.stdin.buffer)
            else:
                with open(args.value, "rb") as f:
                    info = mem.put_object(_q(parts[1]), f)
            _emit(args, info, f"objects/{info['name']}  {info['size']}  {info['digest']}")
        elif kind == "vectors" and len(parts) == 2:
            from agentnode.storage.vectors import MAX_DIMS

            if args.dims is None or not 1 <= args.dims <= MAX_DIMS:
                raise UsageError(f"put: a new collection needs --dims N (N within 1..{MAX_DIMS})")
            info = mem.create_collection(_q(parts[1]), dims=args.dims, metric=args.metric)
            _emit(args, info, f"vectors/{info['name']}  {info['dims']} dims, {info['metric']}")
        elif kind == "vectors" and len(parts) == 3:
            if args.value is None:
                raise UsageError("put: a vector needs a VECTOR (a JSON list, e.g. '[0.1, 0.2]')")
            item: dict[str, Any] = {"key": _key(parts[2]), "vector": _vector(args.value)}
            if args.metadata is not None:
                item["metadata"] = _json(args.metadata, "--metadata")
            mem.upsert(_q(parts[1]), [item])
        else:
            raise UsageError(
                f"put: {args.path!r} is not where things are put "
                "(episodic/NS/TASK, objects/NAME, vectors/COLLECTION[/KEY])"
            )
    return 0


def _rm(args: argparse.Namespace) -> int:
    parts = _split(args.path, lo=2, hi=4, command="rm")
    kind = parts[0]
    with _session(args) as mem:
        if kind == "episodic" and len(parts) == 4:
            mem.delete(*map(_q, parts[1:]))
        elif kind == "objects" and len(parts) == 2:
            mem.delete_object(_q(parts[1]))
        elif kind == "vectors" and len(parts) == 2:
            mem.drop_collection(_q(parts[1]))
        elif kind == "vectors" and len(parts) == 3:
            mem.delete_vector(_q(parts[1]), _key(parts[2]))
        else:
            raise UsageError(
                f"rm: {args.path!r} names no single thing "
                "(episodic/NS/TASK/ID, objects/NAME, vectors/COLLECTION[/KEY])"
            )
    return 0


def _search(args: argparse.Namespace) -> int:
    parts = _split(args.path, lo=2, hi=2, command="search")
    if parts[0] != "vectors":
        raise UsageError("search: works on vectors/COLLECTION (episodic: use ls)")
    if not 1 <= args.k <= 10_000:
        raise UsageError(f"-k: {args.k} is out of range (1 to 10000)")
    with _session(args) as mem:
        for hit in mem.search(_q(parts[1]), _vector(args.vector), args.k, with_metadata=True):
            _emit(args, hit, f"{hit['key']}  {hit['distance']:.6g}  {hit.get('metadata') or ''}")
    return 0
