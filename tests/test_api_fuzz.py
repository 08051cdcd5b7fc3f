"""The control API against its OpenAPI document: a bounded schemathesis run (every default
check: no 5xx, documented statuses, content types and schemas, schema-valid input accepted,
schema-invalid input refused, stateful sequences) against a real daemon's TCP listener; and
what those runs found, each class tried several ways."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.node_daemon import Daemon, daemon
from support.proxy_env import ProxyEnv
from test_node import call

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONFIG = Path(__file__).parent / "support" / "schemathesis.toml"
HOOKS = Path(__file__).parent / "support" / "schemathesis_hooks.py"
#: The proxy's routes and request bodies in brief (the wire formats are OpenAI's and Anthropic's).
PROXY_OPENAPI = Path(__file__).parent / "support" / "proxy_openapi.json"
OPENAPI = Path(__file__).parents[1] / "python/agentnode/node/openapi.json"
TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """A daemon with a TCP listener (bearer `TOKEN`) and its base URL."""
    port = random.randint(20000, 30000)
    config = f'[node]\nlisten = "127.0.0.1:{port}"\napi_token = "{TOKEN}"\ngrace = 0.2\n'
    with daemon(tmp_path_factory.mktemp("fuzz"), config) as d:
        yield d, f"http://127.0.0.1:{port}"


def schemathesis(
    url: str, *args: str, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`st run URL ARGS` with tests/support/schemathesis.toml, one worker (the box is shared),
    in `cwd` (where it keeps its cache)."""
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", url,
            "--workers", "1", "--request-timeout", "10", "--no-color", *args]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False, env=env
    )


@pytest.mark.timeout(300)
def test_control_api_passes_schemathesis(node: tuple[Daemon, str], tmp_path: Path) -> None:
    d, base = node
    r = schemathesis(f"{base}/openapi.json", "-H", f"Authorization: Bearer {TOKEN}",
                     "--max-examples", "40", cwd=tmp_path, timeout=280)  # fmt: skip
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-5000:]
    assert not [line for line in d.lines if "Traceback" in line], d.lines[-50:]


@pytest.mark.timeout(240)
def test_proxy_passes_schemathesis(tmp_path: Path) -> None:
    """The proxy in front of the mock upstreams: no 5xx, and every answer JSON (or a stream)."""
    env = ProxyEnv(tmp_path / "proxy")
    try:
        r = schemathesis(
            str(PROXY_OPENAPI), "--url", env.url, "-H", "Authorization: Bearer sk-acme",
            "--max-examples", "25", "--generation-allow-x00", "true",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
            cwd=tmp_path, timeout=220,
        )  # fmt: skip
    finally:
        env.close()
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-5000:]


def test_proxy_refuses_odd_paths_and_numbers_in_json(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    env = ProxyEnv(tmp_path / "proxy")
    auth = {"Authorization": "Bearer sk-acme", "Content-Type": "application/json"}

    def ask(method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(env.url + path, body, auth, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            assert e.headers["Content-Type"].startswith("application/json"), (path, e.code)
            return e.code, json.loads(e.read())

    try:
        for path in ("/v1/models/a%0Ab", "/v1/%0A", "/%0A%0D"):
            status, body = ask("GET", path)
            assert status == 404 and body["error"]["code"] in ("model_not_found", "not_found")
        chat = b'{"model": "gpt-x", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}"
        status, body = ask("POST", "/v1/chat/completions", chat)
        assert status == 400 and body["error"]["code"] == "invalid_json", body
    finally:
        env.close()


def test_every_operation_declares_its_refusals() -> None:
    doc = json.loads(OPENAPI.read_text())
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            name = f"{method.upper()} {path}"
            assert path == "/healthz" or "401" in codes, name
            assert "{id}" not in path or {"403", "404"} <= codes, name
            for code, r in op["responses"].items():
                r = (
                    doc["components"]["responses"][r["$ref"].rsplit("/", 1)[1]]
                    if "$ref" in r
                    else r
                )
                assert int(code) < 400 or "application/json" in r.get("content", {}), (name, code)


def test_every_agent_protocol_route_is_documented() -> None:
    """The AP routes are in the document (so the fuzz run covers them), with the protocol's
    shapes: its Task, Step, Artifact and paged lists, and its `{"message"}` error body."""
    from aiohttp import web

    from agentnode.agents.protocol import add_protocol_routes

    app = web.Application()
    add_protocol_routes(app, None)  # type: ignore[arg-type]  # the routes, never called here
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource}
    doc = json.loads(OPENAPI.read_text())
    documented = {(m, p) for p, ops in doc["paths"].items() if "/ap/v1/" in p for m in ops}
    assert served == documented and len(served) == 18, served ^ documented
    schemas = doc["components"]["schemas"]
    for name, key in (("APTaskList", "tasks"), ("APStepList", "steps"),
                      ("APArtifactList", "artifacts")):  # fmt: skip
        assert set(schemas[name]["required"]) == {key, "pagination"}, name
    assert set(schemas["APPagination"]["required"]) == {
        "total_items", "total_pages", "current_page", "page_size"}  # fmt: skip
    assert set(schemas["APStep"]["properties"]) >= {"task_id", "step_id", "status", "is_last"}
    for method, path in documented:
        op = doc["paths"][path][method]
        assert {"200", "400", "401"} <= set(op["responses"]), (method, path)
        if "{task_id}" in path:
            assert op["responses"]["404"] == {"$ref": "#/components/responses/APNotFound"}


def raw(base: str, method: str, path: str, body: bytes | None = None,
        **headers: str) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """One request on the TCP listener: (status, headers, body); asserts an error is JSON."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body, {"Authorization": f"Bearer {TOKEN}", **headers})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    is_json = resp.getheader("Content-Type", "").startswith("application/json")
    assert is_json or resp.status < 400, (path, resp.status, data[:200])
    return resp.status, dict(resp.getheaders()), json.loads(data) if is_json else data


def test_aiohttp_refusals_are_json_errors(node: tuple[Daemon, str]) -> None:
    _, base = node
    status, _, body = raw(base, "GET", "/v1/nope")
    assert status == 404 and "no route GET /v1/nope" in body["error"]
    for method, path in (("DELETE", "/v1/tasks"), ("PUT", "/v1/gc"), ("POST", "/healthz")):
        status, headers, body = raw(base, method, path)
        assert status == 405 and f"{method} is not allowed on {path}" in body["error"]
        assert headers["Allow"], headers
    big = b"[" + b" " * (65 << 20) + b"]"
    for path in ("/v1/tasks", "/v1/tools/run_code/call"):
        status, _, body = raw(base, "POST", path, big, **{"Content-Type": "application/json"})
        assert status == 413 and "too large" in body["error"], (path, body)


def test_bodies_nested_too_deeply_are_400s(node: tuple[Daemon, str]) -> None:
    d, base = node
    task = d.submit(["true"])
    for depth in (10_000, 100_000):
        for nest in ("[", '{"a":'):
            deep = (nest * depth).encode()
            for method, path in (("POST", "/v1/tasks"), ("PUT", f"/v1/tasks/{task['id']}/egress"),
                                 ("POST", "/v1/tools/run_code/call")):  # fmt: skip
                status, _, body = raw(base, method, path, deep)
                assert status == 400 and body["field"] == "body", (path, body)
    status, body = call(d, "POST", "/v1/tools/run_code/call", {"arguments": [1]})
    assert status == 400 and body["field"] == "arguments", body
    # What json.loads lets through but nothing further in can hold: a lone surrogate (in a
    # command word, an env value, a key, a tool's code) and a number of 5,000 digits.
    for method, path, text in (
        ("POST", "/v1/tasks", '{"command": ["/bin/true\\udc80"]}'),
        ("POST", "/v1/tasks", '{"command": ["true"], "env": {"A": "\\ud800"}}'),
        ("POST", "/v1/tasks", '{"command": ["true"], "env": {"\\udfff": "x"}}'),
        ("POST", "/v1/tools/run_code/call", '{"arguments": {"code": "\\udc80"}}'),
        ("PUT", f"/v1/tasks/{task['id']}/egress", '{"allow": ["\\udc80"]}'),
        ("POST", "/v1/tasks", '{"command": ["true"], "pids": ' + "9" * 5000 + "}"),
    ):
        status, _, body = raw(base, method, path, text.encode())
        assert status == 400 and body["field"] == "body", (path, text, body)


def test_numbers_and_flags_in_queries_are_checked(node: tuple[Daemon, str]) -> None:
    d, base = node
    task = d.submit(["true"])
    tid = task["id"]
    bad = [
        (f"/v1/tasks/{tid}/logs?follow=yes", "follow"),
        (f"/v1/tasks/{tid}/timeline?follow=2", "follow"),
        ("/v1/tasks?all=yes", "all"),
        (f"/v1/tasks/{tid}/timeline?after={1 << 64}", "after"),
        (f"/v1/tasks/{tid}/timeline?after={'9' * 5000}", "after"),
        (f"/v1/tasks/{tid}/timeline?after=%C2%B2", "after"),  # '²': int() would take it
        ("/v1/tasks?limit=%D9%A3", "limit"),  # an Arabic-Indic 3
        ("/v1/tasks?limit=" + "1" * 5000, "limit"),
    ]
    for path, field in bad:
        status, _, body = raw(base, "GET", path)
        assert status == 400 and body["field"] == field, (path, body)
    for path in (f"/v1/tasks/{tid}/logs?follow=0", f"/v1/tasks/{tid}/timeline?follow=",
                 "/v1/tasks?all=false"):  # fmt: skip
        assert raw(base, "GET", path)[0] == 200, path


def task_call(d: Daemon, path: str, token: str) -> tuple[int, Any]:
    """GET `path` on the daemon's task socket with bearer `token` (sent as Latin-1 bytes)."""
    import http.client

    from agentnode.sdk.transport import UnixHTTPConnection

    conn = UnixHTTPConnection(str(d.data / "run" / "sockets" / "task.sock"), timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    except http.client.HTTPException as e:
        raise AssertionError(f"{path}: {e}") from None
    finally:
        conn.close()


def test_odd_tokens_and_malformed_requests_are_refused_quietly(node: tuple[Daemon, str]) -> None:
    d, base = node
    # Bytes that are not UTF-8 (http.client sends a str header as Latin-1), on the bearer
    # guard, the task socket's token check and the memory API's.
    for token in ("x.\u00b2.y", "x." + "9" * 5000 + ".y", "\u00ff\u00fe"):
        status, _, body = raw(base, "GET", "/v1/node", Authorization=f"Bearer {token}")
        assert status == 401, body
        for path in ("/v1/tasks/x", "/v1/objects"):
            status, body = task_call(d, path, token)
            assert status == 401, (path, body)
    host, port = base.removeprefix("http://").split(":")
    for request in (b"GET /v1/node HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n",
                    b"GET /v1/node HTTP/1.1\r\nContent-Length: -1\r\n\r\n"):  # fmt: skip
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request)
            assert s.recv(100).split(b" ")[1] == b"400", request
    d.wait_for_line("refused a malformed HTTP request from 127.0.0.1")
    assert not [line for line in d.lines if "Traceback" in line], d.lines[-50:]


def test_agent_protocol_refusals_are_one_line_errors(node: tuple[Daemon, str]) -> None:
    """What the fuzz run found on /ap/v1, each class tried several ways on both prefixes: an
    optional field given as null is its default, a field of the wrong type or range is a 422,
    a body that is not what its Content-Type says is a 400, each in the AP's `{"message"}`."""
    d, base = node
    js = {"Content-Type": "application/json"}
    for prefix in ("/ap/v1", "/t/acme/ap/v1"):
        tasks = f"{prefix}/agent/tasks"

        def create(body: Any, prefix: str = prefix) -> tuple[int, Any]:
            status, _, answer = raw(base, "POST", f"{prefix}/agent/tasks",
                                    json.dumps(body).encode(), **js)  # fmt: skip
            return status, answer

        # null is each option's default (the agent, the model's absence, no extra task fields).
        extra: Any
        for extra in ({"task": None}, {"agent": None}, {"tools": None, "max_steps": None},
                      {"agent": "runtime", "steps": None, "additional_input": None}):  # fmt: skip
            status, task = create({"input": "go", "additional_input": {"model": "m", **extra}})
            assert status == 200 and task["additional_input"]["model"] == "m", (extra, task)
        tid = task["task_id"]
        for extra, field in (({"max_steps": 0}, "max_steps"), ({"max_steps": -1}, "max_steps"),
                             ({"max_steps": True}, "max_steps"), ({"steps": 0}, "steps"),
                             ({"task": []}, "task"), ({"tools": "a"}, "tools")):  # fmt: skip
            status, err = create({"input": "go", "additional_input": {"model": "m", **extra}})
            assert status == 422 and f"additional_input.{field}" in err["message"], (extra, err)
        # Bodies the node's JSON reader refuses on every route: nested too deeply, a lone
        # surrogate, a number of 5,000 digits, not JSON, only whitespace; on the task and the
        # step routes alike (no body at all is an empty object: AP bodies are optional).
        for path in (tasks, f"{tasks}/{tid}/steps"):
            for text in ("[" * 100_000, '{"a":' * 10_000, '{"input": "\\udc80"}',
                         '{"input": "x", "n": ' + "9" * 5000 + "}", "{nope", "\n", " \t\r\n"):  # fmt: skip
                status, _, err = raw(base, "POST", path, text.encode(), **js)
                assert status == 400 and err["message"].startswith("the body "), (path, err)
        for empty in (None, b""):
            # A task each: one that ends at once (this node has no model) has a single step.
            _, one = create({"input": "go", "additional_input": {"model": "m"}})
            status, _, step = raw(base, "POST", f"{tasks}/{one['task_id']}/steps", empty, **js)
            assert status == 200 and step["task_id"] == one["task_id"], (empty, step)
        # A step's additional_input is an object or null, as a task's is.
        for extra in ([None, None], "x", 3):
            status, _, err = raw(base, "POST", f"{tasks}/{tid}/steps",
                                 json.dumps({"additional_input": extra}).encode(), **js)  # fmt: skip
            assert status == 422 and "additional_input" in err["message"], (extra, err)
        # Multipart forms that are not one (no boundary, a part header that is not HTTP), a
        # part that is not file or relative_path, and a NUL in the path or the file's name.
        uploads = f"{tasks}/{tid}/artifacts"
        status, _, err = raw(base, "POST", uploads, b"", **{"Content-Type": "multipart/form-data"})
        assert status == 400 and "multipart/form-data" in err["message"], err

        def form(*parts: tuple[bytes, bytes], uploads: str = uploads) -> tuple[int, Any]:
            body = b"".join(b"--B\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + data
                            + b"\r\n" for head, data in parts) + b"--B--\r\n"  # fmt: skip
            multipart = {"Content-Type": "multipart/form-data; boundary=B"}
            status, _, answer = raw(base, "POST", uploads, body, **multipart)
            return status, answer

        file = (b'name="file"; filename="f.txt"', b"data")
        status, err = form((b'name="\x11\xc3\x90"', b"{}"), file)
        assert status == 400 and "multipart/form-data" in err["message"], err
        for name in (b"uri", b"relative_paths", b""):
            status, err = form((b'name="' + name + b'"', b"x"), file)
            assert status == 422 and "file and relative_path" in err["message"], (name, err)
        for parts in (((b'name="relative_path"', b"a\x00b"), file),
                      ((b'name="file"; filename="a\x00b"', b"data"),)):  # fmt: skip
            status, err = form(*parts)
            assert status in (400, 422) and "message" in err, (parts, err)
        for _ in range(100):  # once the task has started (its workspace is made then)
            status, up = form((b'name="relative_path"', b"in"), file)
            if status != 409:
                break
            time.sleep(0.1)
        assert status == 200 and (up["relative_path"], up["file_name"]) == ("in", "f.txt"), up
    assert not [line for line in d.lines if "Traceback" in line], d.lines[-50:]
