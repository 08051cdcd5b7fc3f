"""The vector routes of the memory API: each tenant's own collections over one `VectorStore`.

`make_app(..., vectors=vectors_app(store))` mounts them at /v1/memory/vectors/ (bodies and
answers in JSON or msgpack, errors `{"error", "kind"}` like every memory route):

    GET    /                     -> {"collections": [name, ...]}
    PUT    /{collection}         {"dims", "metric"?: cos|l2|ip, "dtype"?: f32|f16|i8|i8+f32}
                                 201 created, 200 if it exists alike, 409 if it exists otherwise
    DELETE /{collection}
    POST   /{collection}/upsert  {"items": [{"key", "vector", "metadata"?, "namespace"?, "task"?}]}
    POST   /{collection}/search  {"vector" | "vectors", "k"?, "with_metadata"?,
                                  "filter"?: {"namespace"?, "task"?, "keys"? (with "vector")}}
                                 -> {"matches": [{"key", "distance", "metadata"?}]}
                                    (one list per query for "vectors")
    GET    /{collection}/{key}   -> {"key", "vector", "namespace", "task", "metadata"}
    DELETE /{collection}/{key}

Tenancy: the tenant comes from the credential. A tenant's `docs` is the store's
`<digest of tenant>.docs`, so no name a client sends reaches another tenant's collection; every
record is labelled with the caller's tenant and every search filtered on it. A task-pinned
credential (the daemon's task tokens) reads and searches its whole tenant, but labels what it
writes with its own task and may not overwrite or delete another task's record, nor delete a
collection (which holds every task's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from array import array
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from agentnode.errors import (
    AuthError,
    CollectionExistsError,
    NotFoundError,
    StorageError,
    UnknownCollectionError,
    VectorError,
)
from agentnode.storage.api import check_task, principal, read_body, reply
from agentnode.storage.tenancy import Principal
from agentnode.storage.vectors import Collection, Match, Record, VectorStore, check_key

__all__ = ["STORE", "vectors_app"]

STORE = web.AppKey("vector_store", VectorStore)
# The store allows 64 characters; the tenant's tag and a dot take 25 of them.
_MAX_NAME = 39
_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{_MAX_NAME}}}")
_MAX_K = 10_000


def vectors_app(store: VectorStore) -> web.Application:
    """The vector routes over `store`, to pass as `make_app(..., vectors=...)`."""
    app = web.Application()
    app[STORE] = store
    app.router.add_get("/", _list)
    app.router.add_put("/{collection}", _create)
    app.router.add_delete("/{collection}", _drop)
    app.router.add_post("/{collection}/upsert", _upsert)
    app.router.add_post("/{collection}/search", _search)
    app.router.add_get("/{collection}/{key}", _get)
    app.router.add_delete("/{collection}/{key}", _delete)
    return app


def _tag(tenant: str) -> str:
    # A digest rather than the tenant itself: tenant names may be longer than store names and
    # use characters store names may not. 120 bits keep any two tenants apart.
    return base64.b32encode(hashlib.blake2b(tenant.encode(), digest_size=15).digest()).decode()


def _names(request: web.Request) -> tuple[str, str]:
    """The collection in the URL: the name its tenant uses, and the name in the store."""
    name = request.match_info["collection"]
    if not _NAME.fullmatch(name):
        raise VectorError(
            f"bad collection name {name!r} (use 1-{_MAX_NAME} letters, digits, '_', '.' or '-')"
        )
    return name, f"{_tag(principal(request).tenant)}.{name}"


async def _open(request: web.Request) -> tuple[str, Collection]:
    name, internal = _names(request)
    try:
        return name, await asyncio.to_thread(request.app[STORE].collection, internal)
    except UnknownCollectionError:
        raise UnknownCollectionError(
            f"no vector collection {name!r} (create it: PUT /v1/memory/vectors/{name} "
            'with {"dims": <embedding length>})'
        ) from None


@contextlib.contextmanager
def _about(field: str) -> Iterator[None]:
    """Names the request field a validation error raised inside concerns."""
    try:
        yield
    except StorageError as e:
        raise type(e)(f"{field}: {e}") from None


def _object(value: Any, field: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VectorError(f"{field} must be an object")
    # Refused rather than ignored: a misspelt filter would otherwise widen a search silently.
    unknown = [repr(k) for k in value if k not in allowed]
    if unknown:
        raise VectorError(
            f"{field} has unknown fields {', '.join(unknown)} (use {', '.join(sorted(allowed))})"
        )
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise VectorError(f"{field} must be a string, got {type(value).__name__}")
    return value


def _vector(value: Any, field: str, dims: int, into: array[float]) -> None:
    """Appends `value`, a list of `dims` numbers, to `into` as float32."""
    start = len(into)
    try:
        into.fromlist(value)  # TypeError unless a list of numbers; nothing appended then
    except TypeError:
        raise VectorError(f"{field} must be a list of {dims} numbers") from None
    if len(into) - start != dims:
        raise VectorError(
            f"{field} has {len(into) - start} dimensions but the collection has {dims} "
            f"(send vectors of length {dims})"
        )


def _writable(rec: Record | None, p: Principal) -> None:
    if rec is not None and p.task is not None and rec.task != p.task:
        raise AuthError(
            f"key {rec.key} holds a record of task {rec.task!r}; this credential writes only "
            f"task {p.task!r}'s (use another key)"
        )


def _record(coll: Collection, key: int, p: Principal, name: str) -> Record:
    rec = coll.get(key)
    # Every record carries its tenant: one is visible to that tenant only, wherever it sits.
    if rec is None or rec.tenant != p.tenant:
        raise NotFoundError(f"no vector with key {key} in collection {name!r}")
    return rec


def _key(request: web.Request) -> int:
    raw = request.match_info["key"]
    with _about("key"):
        if not (raw.isascii() and raw.isdigit()):
            raise VectorError(f"{raw!r} is not a key (keys are integers from 0 to 2**64-2)")
        return check_key(int(raw))


def _wire(m: Match) -> dict[str, Any]:
    hit: dict[str, Any] = {"key": m.key, "distance": m.distance}
    if m.metadata is not None:
        hit["metadata"] = m.metadata
    return hit


async def _list(request: web.Request) -> web.Response:
    prefix = _tag(principal(request).tenant) + "."
    names = await asyncio.to_thread(request.app[STORE].collections)
    return reply(
        request, {"collections": [n[len(prefix) :] for n in names if n.startswith(prefix)]}
    )


async def _create(request: web.Request) -> web.Response:
    name, internal = _names(request)
    body = _object(await read_body(request), "body", {"dims", "metric", "dtype"})
    if "dims" not in body:
        raise VectorError("dims is missing (the length of the embeddings, e.g. 384)")
    # The store checks the values (dims in range, a known metric and dtype).
    wanted: dict[str, Any] = {
        "dims": body["dims"],
        "metric": _string(body.get("metric", "cos"), "metric"),
        "dtype": _string(body.get("dtype", "f32"), "dtype"),
    }
    try:
        coll = await asyncio.to_thread(request.app[STORE].create_collection, internal, **wanted)
        status = 201
    except CollectionExistsError:
        _, coll = await _open(request)
        status = 200
    c = coll.config
    config = {"dims": c.dims, "metric": c.metric, "dtype": c.dtype}
    if config != wanted:
        raise CollectionExistsError(
            f"collection {name!r} exists with dims={c.dims}, metric={c.metric!r}, "
            f"dtype={c.dtype!r} (create it with those, or delete it first)"
        )
    return reply(request, {"name": name, **config}, status=status)


async def _drop(request: web.Request) -> web.Response:
    p = principal(request)
    if p.task is not None:
        name = request.match_info["collection"]
        raise AuthError(
            f"this credential is limited to task {p.task!r}: it cannot delete collection "
            f"{name!r}, which holds its tenant's records of every task (delete the task's own "
            "records, or use a tenant key)"
        )
    _, coll = await _open(request)
    await asyncio.to_thread(request.app[STORE].drop_collection, coll.name)
    return web.Response(status=204)


async def _upsert(request: web.Request) -> web.Response:
    body = _object(await read_body(request), "body", {"items"})
    _, coll = await _open(request)
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise VectorError("items must be a non-empty list of {key, vector, metadata?, ...}")
    p = principal(request)
    keys: list[int] = []
    namespaces: list[str] = []
    tasks: list[str] = []
    metadata: list[dict[str, Any]] = []
    flat = array("f")
    for i, raw in enumerate(items):
        at = f"items[{i}]"
        item = _object(raw, at, {"key", "vector", "metadata", "namespace", "task"})
        with _about(f"{at}.key"):
            keys.append(check_key(item.get("key")))
        _vector(item.get("vector"), f"{at}.vector", coll.config.dims, flat)
        meta = item.get("metadata", {})
        if not isinstance(meta, dict):
            raise VectorError(f"{at}.metadata must be an object")
        metadata.append(meta)
        namespaces.append(_string(item.get("namespace", ""), f"{at}.namespace"))
        task = _string(item.get("task", p.task or ""), f"{at}.task")
        with _about(f"{at}.task"):
            tasks.append(check_task(request, task))
    if p.task is not None:
        for rec in await asyncio.to_thread(lambda: [coll.get(k) for k in keys]):
            _writable(rec, p)
    with _about("items"):
        await asyncio.to_thread(
            coll.upsert_batch,
            keys,
            flat,
            tenant=p.tenant,
            namespace=namespaces,
            task=tasks,
            metadata=metadata,
        )
    return reply(request, {"upserted": len(keys)})


async def _search(request: web.Request) -> web.Response:
    body = _object(
        await read_body(request), "body", {"vector", "vectors", "k", "filter", "with_metadata"}
    )
    _, coll = await _open(request)
    if ("vector" in body) == ("vectors" in body):
        raise VectorError("send either vector (one query) or vectors (a list of queries)")
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= _MAX_K:
        raise VectorError(f"k must be an integer from 1 to {_MAX_K}, got {k!r}")
    with_metadata = body.get("with_metadata", False)
    if not isinstance(with_metadata, bool):
        raise VectorError(f"with_metadata must be true or false, not {with_metadata!r}")
    where = _object(body.get("filter", {}), "filter", {"namespace", "task", "keys"})
    namespace, task = where.get("namespace"), where.get("task")  # None: any
    for field, value in (("namespace", namespace), ("task", task)):
        if value is not None:
            _string(value, f"filter.{field}")
    # The tenant filter comes from the credential only; there is no field to send one.
    tenant = principal(request).tenant
    dims = coll.config.dims
    flat = array("f")
    if "vector" in body:
        _vector(body["vector"], "vector", dims, flat)
        keys = where.get("keys")
        if keys is not None:
            if not isinstance(keys, list):
                raise VectorError("filter.keys must be a list of keys")
            with _about("filter.keys"):
                keys = [check_key(x) for x in keys]
        hits = await asyncio.to_thread(
            coll.search,
            flat,
            k,
            tenant=tenant,
            namespace=namespace,
            task=task,
            keys=keys,
            with_metadata=with_metadata,
        )
        return reply(request, {"matches": [_wire(m) for m in hits]})
    queries = body["vectors"]
    if not isinstance(queries, list) or not queries:
        raise VectorError("vectors must be a non-empty list of vectors")
    if "keys" in where:
        raise VectorError("filter.keys works with vector only (send one query at a time)")
    for i, query in enumerate(queries):
        _vector(query, f"vectors[{i}]", dims, flat)
    found = await asyncio.to_thread(
        coll.search_batch,
        memoryview(flat).cast("B").cast("f", (len(queries), dims)),
        k,
        tenant=tenant,
        namespace=namespace,
        task=task,
        with_metadata=with_metadata,
    )
    return reply(request, {"matches": [[_wire(m) for m in hits] for hits in found]})


async def _get(request: web.Request) -> web.Response:
    name, coll = await _open(request)
    rec = await asyncio.to_thread(_record, coll, _key(request), principal(request), name)
    return reply(
        request,
        {
            "key": rec.key,
            "vector": rec.vector,
            "namespace": rec.namespace,
            "task": rec.task,
            "metadata": rec.metadata,
        },
    )


async def _delete(request: web.Request) -> web.Response:
    name, coll = await _open(request)
    p = principal(request)
    rec = await asyncio.to_thread(_record, coll, _key(request), p, name)
    _writable(rec, p)
    await asyncio.to_thread(coll.delete, rec.key)
    return web.Response(status=204)
