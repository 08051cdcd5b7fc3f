"""`Memory`: the agent-side client of the node's memory API (episodic records, objects, vectors).

The endpoint and credential come from the environment the node gives every task
(`AGENTNODE_URL`, `AGENTNODE_TOKEN`) unless passed explicitly. It speaks msgpack over one
keep-alive connection and is synchronous on purpose (agents are often plain scripts); one
`Memory` per thread. Errors are the `agentnode.errors` classes the server named.

Episodic records go over the node's memory socket when there is one (`socket=`, or
$AGENTNODE_MEMORY_SOCKET, which the node sets in every task, when no `url` is passed): the same
operations as the HTTP API at a fraction of its cost per request (`agentnode.sdk.memsocket`).
Objects and vectors always go over HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any
from urllib.parse import urlencode

import msgpack

from agentnode.errors import ConfigError, NotFoundError, StorageError
from agentnode.sdk.memsocket import ENV, SocketClient, error_of
from agentnode.sdk.transport import connect
from agentnode.sdk.working import WorkingMemory

__all__ = ["Memory"]

_MSGPACK = "application/msgpack"


class Memory:
    """Client of the memory API at `url` (default $AGENTNODE_URL) with `token` ($AGENTNODE_TOKEN)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        socket: str | None = None,
    ) -> None:
        if socket is None and url is None:
            socket = os.environ.get(ENV) or None
        url = url or os.environ.get("AGENTNODE_URL")
        token = token or os.environ.get("AGENTNODE_TOKEN")
        if not (url or socket) or not token:
            raise ConfigError(
                "memory endpoint or token missing (set AGENTNODE_URL and AGENTNODE_TOKEN)"
            )
        self._url = url or ""
        self._socket = SocketClient(socket, token, timeout=timeout) if socket else None
        # http.client connects at the first request: a Memory on the socket that stores only
        # episodic records never opens it.
        self._conn: http.client.HTTPConnection | None = None
        self._base = ""
        if url:
            self._conn, self._base = connect(url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {token}", "Accept": _MSGPACK}
        self._timeout = timeout
        self._working: dict[str, WorkingMemory] = {}

    @property
    def over_socket(self) -> bool:
        """Whether episodic records go over the node's memory socket."""
        return self._socket is not None

    # -- transport ------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, body: Any = None, *, raw: Iterable[bytes] | None = None
    ) -> http.client.HTTPResponse:
        if self._conn is None:
            raise ConfigError(
                f"no memory API URL for {path} (set AGENTNODE_URL: objects and vectors are "
                "not on the memory socket)"
            )
        headers = dict(self._headers)
        payload: bytes | Iterable[bytes] | None = None
        if raw is not None:
            headers["Content-Type"] = "application/octet-stream"
            headers["Transfer-Encoding"] = "chunked"
            payload = raw
        elif body is not None:
            headers["Content-Type"] = _MSGPACK
            try:
                payload = msgpack.packb(body)
            except (OverflowError, TypeError, ValueError) as e:
                raise StorageError(
                    f"cannot send {path}: {e} (numbers are within -2**63..2**64-1; values are "
                    "JSON-like: str, bytes, numbers, lists, dicts)"
                ) from None
        try:
            self._conn.request(
                method, self._base + path, payload, headers, encode_chunked=raw is not None
            )
            resp = self._conn.getresponse()
        except (ConnectionError, http.client.HTTPException, TimeoutError) as e:
            self._conn.close()
            raise StorageError(
                f"memory API at {self._url} unreachable ({e}; is the node running?)"
            ) from e
        if resp.status >= 400:
            data = resp.read()
            try:
                problem = (
                    msgpack.unpackb(data) if resp.getheader("Content-Type") == _MSGPACK else None
                )
            except ValueError:
                problem = None
            if problem is None:
                try:
                    problem = json.loads(data)
                except ValueError:
                    problem = {"error": data.decode(errors="replace")}
            if isinstance(problem, dict):
                problem.setdefault("error", f"HTTP {resp.status}")
            raise error_of(problem)
        return resp

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._send(method, path, body)
        data = resp.read()
        return msgpack.unpackb(data) if data else None

    def _episodic(
        self,
        op: str,
        args: dict[str, Any],
        method: str,
        path: str,
        body: Any = None,
        *,
        retry: bool = False,
    ) -> Any:
        """Operation `op` (`storage.operations`) over the memory socket, or its HTTP route;
        `retry`: safe to send again if the socket's connection breaks mid-request."""
        if self._socket is not None:
            return self._socket.call(f"episodic.{op}", args, retry=retry)
        return self._call(method, path, body)

    # -- episodic -------------------------------------------------------------------------------

    def append(
        self,
        namespace: str,
        task: str,
        value: Any,
        *,
        id: str | None = None,
        ttl: float | None = None,
        sync: bool = False,
    ) -> str:
        """Stores a record and returns its id; `sync=True` returns only once it is on disk."""
        body: dict[str, Any] = {"value": value, "sync": sync}
        if id is not None:
            body["id"] = id
        if ttl is not None:
            body["ttl"] = ttl
        ids: list[str] = self._episodic(
            "append", {**body, "namespace": namespace, "task": task}, "POST",
            f"/v1/memory/episodic/{namespace}/{task}", body, retry=id is not None,
        )["ids"]  # fmt: skip
        return ids[0]

    def append_many(
        self,
        namespace: str,
        task: str,
        records: Sequence[Mapping[str, Any]],
        *,
        sync: bool = False,
    ) -> list[str]:
        """Stores records (`{"value", "id"?, "ttl"?}`) atomically; returns their ids."""
        body = {"records": list(records), "sync": sync}
        # Records that all name their ids replace themselves when sent again.
        ids: list[str] = self._episodic(
            "append", {**body, "namespace": namespace, "task": task}, "POST",
            f"/v1/memory/episodic/{namespace}/{task}", body,
            retry=all(r.get("id") is not None for r in records),
        )["ids"]  # fmt: skip
        return ids

    def get(self, namespace: str, task: str, id: str) -> dict[str, Any]:
        """One record (`id`, `value`, `created_ms`, `expires_ms`, …); NotFoundError if gone."""
        rec: dict[str, Any] = self._episodic(
            "get", {"namespace": namespace, "task": task, "id": id}, "GET",
            f"/v1/memory/episodic/{namespace}/{task}/{id}", retry=True,
        )  # fmt: skip
        return rec

    def get_many(
        self, namespace: str, task: str, ids: Sequence[str]
    ) -> list[dict[str, Any] | None]:
        """The records of `ids`, in order (None for one that does not exist): over the memory
        socket in one round trip, over HTTP one request each."""
        if self._socket is None:
            found: list[dict[str, Any] | None] = []
            for rid in ids:
                try:
                    found.append(self.get(namespace, task, rid))
                except NotFoundError:
                    found.append(None)
            return found
        answers = self._socket.pipeline(
            [("episodic.get", {"namespace": namespace, "task": task, "id": rid}) for rid in ids],
            retry=True,
        )
        for answer in answers:
            if isinstance(answer, Exception) and not isinstance(answer, NotFoundError):
                raise answer
        return [None if isinstance(a, NotFoundError) else a for a in answers]

    def scan(
        self,
        namespace: str,
        task: str,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """A task's live records in a time range, newest first unless told otherwise."""
        q: dict[str, Any] = {"limit": limit, "order": "newest" if newest_first else "oldest"}
        if since_ns is not None:
            q["since_ns"] = since_ns
        if until_ns is not None:
            q["until_ns"] = until_ns
        path = f"/v1/memory/episodic/{namespace}/{task}?{urlencode(q)}"
        records: list[dict[str, Any]] = self._episodic(
            "scan", {**q, "namespace": namespace, "task": task}, "GET", path, retry=True
        )["records"]
        return records

    def delete(self, namespace: str, task: str, id: str) -> None:
        """Deletes a record; NotFoundError if it does not exist."""
        self._episodic("delete", {"namespace": namespace, "task": task, "id": id}, "DELETE",
                       f"/v1/memory/episodic/{namespace}/{task}/{id}")  # fmt: skip

    def end_task(self, namespace: str, task: str, *, ttl: float) -> int:
        """Ends a task: its records expire `ttl` seconds from now. Returns the expiry (ms)."""
        expires: int = self._episodic(
            "end", {"namespace": namespace, "task": task, "ttl": ttl}, "POST",
            f"/v1/memory/episodic/{namespace}/{task}/end", {"ttl": ttl},
        )["expires_ms"]  # fmt: skip
        return expires

    def tasks(self, prefix: str = "") -> list[tuple[str, str]]:
        """The (namespace, task) pairs holding records, for namespaces starting with `prefix`."""
        found = self._episodic("tasks", {"prefix": prefix}, "GET",
                               f"/v1/memory/episodic?{urlencode({'prefix': prefix})}", retry=True)  # fmt: skip
        return [(ns, task) for ns, task in found["tasks"]]

    # -- objects --------------------------------------------------------------------------------

    def put_object(self, name: str, data: bytes | IO[bytes] | Iterable[bytes]) -> dict[str, Any]:
        """Streams `data` to the object store under `name`; returns `{name, digest, size}`."""
        chunks: Iterable[bytes]
        if isinstance(data, bytes | bytearray | memoryview):
            chunks = [bytes(data)]
        elif hasattr(data, "read"):
            stream = data

            def read_all() -> Iterator[bytes]:
                while block := stream.read(1 << 16):
                    yield block

            chunks = read_all()
        else:
            chunks = data
        resp = self._send("PUT", f"/v1/objects/{name}", raw=chunks)
        info: dict[str, Any] = msgpack.unpackb(resp.read())
        return info

    def get_object(self, name: str, *, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The object's content in chunks. Consume it before the next call on this client."""
        resp = self._send("GET", f"/v1/objects/{name}")

        def chunks() -> Iterator[bytes]:
            while block := resp.read(chunk_size):
                yield block

        return chunks()

    def delete_object(self, name: str) -> None:
        """Drops the reference `name` (the node reclaims unreferenced content)."""
        self._call("DELETE", f"/v1/objects/{name}")

    def objects(self, prefix: str = "") -> list[dict[str, Any]]:
        """The tenant's objects whose name starts with `prefix`."""
        found: list[dict[str, Any]] = self._call(
            "GET", f"/v1/objects?{urlencode({'prefix': prefix})}"
        )["objects"]
        return found

    # -- vectors --------------------------------------------------------------------------------

    def create_collection(
        self, name: str, *, dims: int, metric: str = "cos", dtype: str = "f32"
    ) -> dict[str, Any]:
        """Creates the tenant's vector collection `name` (metric cos|l2|ip, dtype f32|f16|i8|i8+f32).

        Creating one that exists with the same settings is a no-op; with other settings it
        raises CollectionExistsError. Returns `{name, dims, metric, dtype}`.
        """
        body = {"dims": dims, "metric": metric, "dtype": dtype}
        info: dict[str, Any] = self._call("PUT", f"/v1/memory/vectors/{name}", body)
        return info

    def collections(self) -> list[str]:
        """The names of the tenant's vector collections."""
        names: list[str] = self._call("GET", "/v1/memory/vectors/")["collections"]
        return names

    def drop_collection(self, name: str) -> None:
        """Deletes a vector collection and every vector in it."""
        self._call("DELETE", f"/v1/memory/vectors/{name}")

    def upsert(self, collection: str, items: Iterable[Mapping[str, Any]]) -> int:
        """Inserts or replaces vectors in one atomic batch; returns how many.

        Items are `{"key": int, "vector": floats, "metadata"?: dict, "namespace"?: str,
        "task"?: str}`; a vector may be a list or a numpy array.
        """
        body = {"items": [{**item, "vector": _floats(item["vector"])} for item in items]}
        count: int = self._call("POST", f"/v1/memory/vectors/{collection}/upsert", body)["upserted"]
        return count

    def search(
        self,
        collection: str,
        vector: Sequence[float] | Any,
        k: int = 10,
        *,
        namespace: str | None = None,
        task: str | None = None,
        keys: Iterable[int] | None = None,
        with_metadata: bool = False,
    ) -> list[dict[str, Any]]:
        """The `k` nearest vectors passing the filters, closest first: `{key, distance,
        metadata?}`. Only the tenant's own vectors are ever searched."""
        where = _filter(namespace, task)
        if keys is not None:
            where["keys"] = list(keys)
        body = {"vector": _floats(vector), "k": k, "filter": where, "with_metadata": with_metadata}
        hits: list[dict[str, Any]] = self._call(
            "POST", f"/v1/memory/vectors/{collection}/search", body
        )["matches"]
        return hits

    def search_batch(
        self,
        collection: str,
        vectors: Iterable[Sequence[float] | Any],
        k: int = 10,
        *,
        namespace: str | None = None,
        task: str | None = None,
        with_metadata: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """`search` for many queries at once (a list of vectors or a 2-D numpy array)."""
        body = {
            "vectors": [_floats(v) for v in vectors],
            "k": k,
            "filter": _filter(namespace, task),
            "with_metadata": with_metadata,
        }
        hits: list[list[dict[str, Any]]] = self._call(
            "POST", f"/v1/memory/vectors/{collection}/search", body
        )["matches"]
        return hits

    def get_vector(self, collection: str, key: int) -> dict[str, Any]:
        """One vector: `{key, vector, namespace, task, metadata}`; NotFoundError if absent."""
        rec: dict[str, Any] = self._call("GET", f"/v1/memory/vectors/{collection}/{key}")
        return rec

    def delete_vector(self, collection: str, key: int) -> None:
        """Deletes one vector; NotFoundError if absent."""
        self._call("DELETE", f"/v1/memory/vectors/{collection}/{key}")

    # -- working memory -------------------------------------------------------------------------

    def working(self, task: str, *, maxsize: int = 256) -> WorkingMemory:
        """The in-process LRU of `task` (created on first use; see `WorkingMemory`)."""
        if task not in self._working:
            self._working[task] = WorkingMemory(maxsize=maxsize)
        return self._working[task]

    def close(self) -> None:
        """Closes the connections."""
        if self._conn is not None:
            self._conn.close()
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _floats(vector: Any) -> list[float]:
    # Embedding models hand out numpy arrays, which msgpack cannot pack; their tolist() can.
    floats: list[float] = vector.tolist() if hasattr(vector, "tolist") else list(vector)
    return floats


def _filter(namespace: str | None, task: str | None) -> dict[str, Any]:
    return {
        name: value
        for name, value in (("namespace", namespace), ("task", task))
        if value is not None
    }
