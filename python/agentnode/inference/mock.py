"""Mock LLM upstreams on loopback speaking OpenAI's and Anthropic's real wire formats.

They stand in for providers in tests, benchmarks and demos: deterministic bodies, SSE streams
with usage chunks, provider-format error bodies with Retry-After, and scripted failures
(status codes, hangs, garbage, a stream that dies after its first event). A `script` of `Turn`s
answers successive chat requests with given text and tool calls (OpenAI `tool_calls`, Anthropic
`tool_use`, streamed or not), so an agent framework can be driven through a multi-turn run.
They record what they received and when a client went away.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Fault", "MockUpstream", "PromptCache", "ToolCall", "Turn"]

OPENAI_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 300,
    "total_tokens": 1300,
    "prompt_tokens_details": {"cached_tokens": 600},
    "completion_tokens_details": {"reasoning_tokens": 100},
}
ANTHROPIC_USAGE = {
    "input_tokens": 100,
    "cache_creation_input_tokens": 2000,
    "cache_read_input_tokens": 5000,
    "output_tokens": 250,
}


# The error types each provider's API gives its 4xx answers.
_OPENAI_ERRORS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                  429: "rate_limit_exceeded"}  # fmt: skip
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

#: A request's record in `MockUpstream.requests`, kept on the request for its answer's hook.
_RECORD = web.RequestKey("record", dict)


@dataclass(frozen=True, slots=True)
class Fault:
    """What the mock does instead of answering normally, for one request."""

    status: int | None = None  # answer with this error status (provider error body)
    retry_after: float | None = None  # with this Retry-After header (seconds)
    hang: float = 0.0  # sleep this long before answering
    garbage: bool = False  # 200 with a body that is not JSON / not SSE
    die_after_first: bool = False  # stream: close the connection after the first event


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call a scripted turn makes: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True, slots=True)
class Turn:
    """One scripted assistant answer: text, tool calls, or both."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def parse(cls, obj: Any) -> Turn:
        """A turn from JSON: `"text"` or `{"text": ..., "tool_calls": [{"name", "arguments"}]}`."""
        if isinstance(obj, str):
            return cls(text=obj)
        if not isinstance(obj, dict) or set(obj) - {"text", "tool_calls"}:
            raise ValueError(f"a scripted turn is a string or {{text, tool_calls}}, got {obj!r}")
        calls = tuple(
            ToolCall(c["name"], dict(c.get("arguments", {})), c.get("id", ""))
            for c in obj.get("tool_calls", ())
        )
        return cls(text=str(obj.get("text", "")), tool_calls=calls)


#: Anthropic's smallest cacheable prefix (tokens) by model family, as its docs list them.
ANTHROPIC_MIN_CACHEABLE = {"haiku": 2048, "opus-4-5": 4096, "haiku-4-5": 4096}
ANTHROPIC_MAX_BREAKPOINTS = 4
#: OpenAI caches prompts of at least this many tokens, in steps of OPENAI_CACHE_STEP.
OPENAI_MIN_CACHEABLE = 1024
OPENAI_CACHE_STEP = 128
#: Blocks before a breakpoint that Anthropic checks for an earlier cache entry.
_LOOKBACK = 20


def count_tokens(value: Any) -> int:
    """The mock's tokenizer: a quarter of the value's compact JSON, at least 1. Deterministic,
    and close enough to real tokenizers' ~4 bytes a token for English and JSON."""
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return max(1, len(raw.encode()) // 4)


def _strip_marker(block: Any) -> Any:
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


@dataclass
class PromptCache:
    """Provider prompt caching as documented, for a mock to bill by.

    Anthropic: the prompt is the tools, then the system blocks, then each message's content
    blocks, in that order; a block carrying `cache_control` is a breakpoint (at most 4, else
    400). The prefix up to a breakpoint, when at least the model's minimum length, is written
    to the cache (5 min, or 1 h with `ttl: "1h"`); a later request whose prefix up to a block
    boundary within 20 blocks before one of its breakpoints matches an entry still alive reads
    it (and refreshes its TTL). OpenAI: every prompt of at least 1024 tokens is cached
    automatically; the longest earlier prefix (in 128-token steps) is reported as cached,
    per model and `prompt_cache_key`."""

    #: Overrides of the minimum cacheable length, by model name.
    min_tokens: dict[str, int] = field(default_factory=dict)
    _entries: dict[bytes, float] = field(default_factory=dict)

    def _min(self, model: str) -> int:
        if model in self.min_tokens:
            return self.min_tokens[model]
        found = [n for k, n in ANTHROPIC_MIN_CACHEABLE.items() if k in model]
        return max(found) if found else 1024

    def _alive(self, key: bytes, now: float) -> bool:
        return self._entries.get(key, 0.0) > now

    def anthropic(self, body: dict[str, Any]) -> dict[str, Any] | str:
        """The usage of a /v1/messages request, or the 400 message for too many breakpoints."""
        blocks: list[Any] = list(body.get("tools") or [])
        system = body.get("system")
        if isinstance(system, str):
            blocks.append({"type": "text", "text": system})
        elif isinstance(system, list):
            blocks.extend(system)
        for m in body.get("messages") or []:
            content = m.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            blocks.extend({"role": m.get("role")} | b for b in content or [])
        marks = [i for i, b in enumerate(blocks) if isinstance(b, dict) and b.get("cache_control")]
        if len(marks) > ANTHROPIC_MAX_BREAKPOINTS:
            return (
                f"A maximum of {ANTHROPIC_MAX_BREAKPOINTS} blocks with cache_control may be "
                f"provided. Found {len(marks)}."
            )
        model, now = body.get("model", ""), time.monotonic()
        h = hashlib.sha256(model.encode())
        hashes: list[bytes] = []
        tokens: list[int] = []  # cumulative, up to and including block i
        total = 0
        for b in blocks:
            h.update(json.dumps(_strip_marker(b), sort_keys=True).encode())
            hashes.append(h.copy().digest())
            total += count_tokens(_strip_marker(b))
            tokens.append(total)
        read = 0
        for i in marks:
            for j in range(i, max(-1, i - _LOOKBACK), -1):
                if self._alive(hashes[j], now):
                    read = max(read, tokens[j])
                    self._entries[hashes[j]] = max(self._entries[hashes[j]], now + 300)
                    break
        written = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
        top = read
        for i in marks:
            if tokens[i] < self._min(model) or tokens[i] <= top:
                continue
            one_hour = blocks[i]["cache_control"].get("ttl") == "1h"
            if not self._alive(hashes[i], now):
                self._entries[hashes[i]] = now + (3600 if one_hour else 300)
            bucket = "ephemeral_1h_input_tokens" if one_hour else "ephemeral_5m_input_tokens"
            written[bucket] += tokens[i] - top
            top = tokens[i]
        write = top - read
        return {
            "input_tokens": total - top,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
            "cache_creation": written,
            "output_tokens": 50,
        }

    def openai(self, body: dict[str, Any]) -> dict[str, Any]:
        """The usage of a chat completion request."""
        parts: list[Any] = list(body.get("tools") or []) + list(body.get("messages") or [])
        key = str(body.get("prompt_cache_key", ""))
        h = hashlib.sha256(f"{body.get('model', '')}\n{key}".encode())
        now, total, cached = time.monotonic(), 0, 0
        for p in parts:
            h.update(json.dumps(p, sort_keys=True).encode())
            total += count_tokens(p)
            if total < OPENAI_MIN_CACHEABLE:
                continue
            d = h.copy().digest()
            if self._alive(d, now):
                cached = total
            self._entries[d] = now + 300
        cached -= cached % OPENAI_CACHE_STEP
        return {
            "prompt_tokens": total,
            "completion_tokens": 50,
            "total_tokens": total + 50,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }


@dataclass
class MockUpstream:
    """One provider on 127.0.0.1. `kind` is `openai` or `anthropic`; `await start()` first."""

    kind: str
    name: str = "mock"
    chunks: int = 4
    chunk_delay: float = 0.0
    #: Seconds between a stream's last event and the end of its HTTP response (chunked
    #: framing's final empty chunk), which a real server's may trail by a packet or more.
    end_delay: float = 0.0
    usage: dict[str, Any] | None = None
    faults: deque[Fault] = field(default_factory=deque)
    #: Answers for successive chat requests (then the default "Hello" answers).
    script: deque[Turn] = field(default_factory=deque)
    #: Models that always answer with this error status (one sick model of a deployment).
    failing_models: dict[str, int] = field(default_factory=dict)
    #: Length of each embedding vector (AutoGPT's local memory expects ada-002's 1536).
    embedding_size: int = 3
    #: Bill by provider prompt caching (usage computed from each request) instead of `usage`.
    prompt_cache: PromptCache | None = None
    #: What each request brought: path, json, body (bytes), headers, peer (host, port), and
    #: with `prompt_cache`, the usage it was billed.
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    #: Called with a request's record as its answer starts (before the status line is sent),
    #: so an observer in another process knows of a request before its client does.
    on_answer: Callable[[dict[str, Any]], None] | None = None
    _runner: web.AppRunner | None = None
    _answered: int = 0
    port: int = 0

    @property
    def base_url(self) -> str:
        """What a client SDK takes as base_url (OpenAI's includes /v1, Anthropic's does not)."""
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind == "openai" else root

    async def start(self) -> MockUpstream:
        app = web.Application()
        app.on_response_prepare.append(self._answering)
        if self.kind == "openai":
            for path in ("chat/completions", "completions", "embeddings", "responses"):
                app.router.add_post(f"/v1/{path}", self._openai)
        else:
            app.router.add_post("/v1/messages", self._anthropic)
            app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=5
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def _answering(self, request: web.Request, response: web.StreamResponse) -> None:
        # Every answer carries its request id where each provider's SDK reads it.
        self._answered += 1
        name = "x-request-id" if self.kind == "openai" else "request-id"
        response.headers[name] = f"req_mock_{self.port}_{self._answered}"
        record = request.get(_RECORD)
        if self.on_answer is not None and record is not None:
            self.on_answer(record)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _usage(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.prompt_cache is not None and body is not None:
            if self.kind == "openai":
                billed: dict[str, Any] | str = self.prompt_cache.openai(body)
            else:
                billed = self.prompt_cache.anthropic(body)
            if isinstance(billed, str):
                raise web.HTTPBadRequest(
                    text=json.dumps(
                        {
                            "type": "error",
                            "error": {"type": "invalid_request_error", "message": billed},
                        }
                    ),
                    content_type="application/json",
                )
            self.requests[-1]["usage"] = billed
            return billed
        if self.usage is not None:
            return self.usage
        return OPENAI_USAGE if self.kind == "openai" else ANTHROPIC_USAGE

    async def _fault(self, request: web.Request) -> tuple[Fault | None, web.Response | None]:
        raw = await request.read()
        body = json.loads(raw)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        request[_RECORD] = {
            "path": request.path,
            "json": body,
            "body": raw,
            "headers": dict(request.headers),
            "peer": peer,  # the client's (host, port): the same port is the same connection
        }
        self.requests.append(request[_RECORD])
        f = self.faults.popleft() if self.faults else None
        if f is None and body.get("model") in self.failing_models:
            f = Fault(status=self.failing_models[body["model"]])
        if f is None:
            return None, None
        if f.hang:
            await asyncio.sleep(f.hang)
        if f.garbage:
            ctype = "text/event-stream" if body.get("stream") else "application/json"
            return f, web.Response(body=b"<html>502 bad gateway</html>", content_type=ctype)
        if f.status is not None:
            headers = {} if f.retry_after is None else {"Retry-After": f"{f.retry_after:g}"}
            return f, web.json_response(self._error(f.status), status=f.status, headers=headers)
        return f, None

    def _error(self, status: int) -> dict[str, Any]:
        """The provider's error body for `status`, typed as the provider types it."""
        message = f"mock error {status}"
        if self.kind == "openai":
            kind = (
                "server_error"
                if status >= 500
                else _OPENAI_ERRORS.get(status, "invalid_request_error")
            )
            return {"error": {"message": message, "type": kind, "param": None, "code": None}}
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's free token count: what the mock's tokenizer makes of the prompt."""
        _, early = await self._fault(request)
        if early is not None:
            return early
        body = self.requests[-1]["json"]
        prompt = [body.get("system"), body.get("tools"), body.get("messages")]
        return web.json_response({"input_tokens": count_tokens([p for p in prompt if p])})

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        fault, early = await self._fault(request)
        if early is not None:
            return early
        body = self.requests[-1]["json"]
        endpoint = request.path.removeprefix("/v1/")
        usage = self._usage(body if endpoint == "chat/completions" else None)
        if endpoint == "embeddings":
            inputs = body.get("input")
            # A list of strings (or of token lists) is a batch; a list of ints is one input.
            batch = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
            count = len(inputs) if batch else 1
            vector: Any = [round(0.1 * (i % 10 + 1), 1) for i in range(self.embedding_size)]
            if body.get("encoding_format") == "base64":
                # OpenAI's base64 is the vector's little-endian float32 bytes.
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return web.json_response(
                {
                    "object": "list",
                    "data": [
                        {"object": "embedding", "index": i, "embedding": vector}
                        for i in range(count)
                    ],
                    "model": body["model"],
                    "usage": {"prompt_tokens": 8, "total_tokens": 8},
                }
            )
        if endpoint == "responses":
            return await self._responses(request, body, usage)
        if endpoint == "chat/completions" and self.script:
            turn = self.script.popleft()
            self.requests[-1]["turn"] = turn
            return await self._openai_turn(request, body, turn, usage)
        if not body.get("stream"):
            if endpoint == "completions":
                choice: dict[str, Any] = {"index": 0, "text": "Hello", "finish_reason": "stop"}
                obj = "text_completion"
            else:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello", "refusal": None},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                obj = "chat.completion"
            return web.json_response(
                {
                    "id": "chatcmpl-mock",
                    "object": obj,
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include = (body.get("stream_options") or {}).get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                finish = "stop" if i == self.chunks - 1 else None
                if endpoint == "completions":
                    # A completion streams text_completion objects, with no delta.
                    piece = {"index": 0, "text": f"t{i}", "logprobs": None}
                    choices: list[dict[str, Any]] = [piece | {"finish_reason": finish}]
                    kind = "text_completion"
                else:
                    delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"t{i}"}
                    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
                    kind = "chat.completion.chunk"
                chunk: dict[str, Any] = {
                    "id": "chatcmpl-mock",
                    "object": kind,
                    "created": 0,
                    "model": body["model"],
                    "choices": choices,
                }
                if include:
                    chunk["usage"] = None
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if fault is not None and fault.die_after_first:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if include:
                last = {
                    "id": "chatcmpl-mock",
                    "object": chunk["object"],
                    "created": 0,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.end_delay)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(time.monotonic())
            raise
        return resp

    async def _responses(
        self, request: web.Request, body: dict[str, Any], usage: dict[str, Any]
    ) -> web.StreamResponse:
        """The Responses API, whole or streamed as its typed events. A scripted turn gives the
        text; an answer longer than `max_output_tokens` ends `incomplete`, billed all the same."""
        text = "Hello"
        if self.script:
            turn = self.script.popleft()
            self.requests[-1]["turn"] = turn
            text = turn.text
        r_usage = {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }
        whole = _response_object(body["model"], r_usage, text)
        cap = body.get("max_output_tokens")
        if isinstance(cap, int) and cap < usage["completion_tokens"]:
            whole["status"] = "incomplete"
            whole["incomplete_details"] = {"reason": "max_output_tokens"}
            whole["output"][0]["status"] = "incomplete"
        if not body.get("stream"):
            return web.json_response(whole)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seq = 0

        async def event(kind: str, **data: Any) -> None:
            nonlocal seq
            obj = {"type": kind, "sequence_number": seq, **data}
            seq += 1
            await resp.write(f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode())

        started = {**whole, "status": "in_progress", "output": [], "usage": None}
        item = whole["output"][0]
        part = item["content"][0]
        at = {"item_id": item["id"], "output_index": 0}
        await event("response.created", response=started)
        await event("response.in_progress", response=started)
        await event("response.output_item.added", output_index=0,
                    item={**item, "status": "in_progress", "content": []})  # fmt: skip
        await event("response.content_part.added", **at, content_index=0,
                    part={**part, "text": ""})  # fmt: skip
        step = max(1, -(-len(text) // self.chunks))
        for i in range(0, len(text), step):
            await event("response.output_text.delta", **at, content_index=0,
                        delta=text[i : i + step], logprobs=[])  # fmt: skip
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        await event("response.output_text.done", **at, content_index=0, text=text, logprobs=[])
        await event("response.content_part.done", **at, content_index=0, part=part)
        await event("response.output_item.done", output_index=0, item=item)
        await event(f"response.{whole['status']}", response=whole)
        return resp

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        fault, early = await self._fault(request)
        if early is not None:
            return early
        body = self.requests[-1]["json"]
        usage = self._usage(body)
        if self.script:
            turn = self.script.popleft()
            self.requests[-1]["turn"] = turn
            return await self._anthropic_turn(request, body, turn, usage)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_mock",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": "Hello"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(name: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

        start_usage = {k: v for k, v in usage.items() if k != "output_tokens"} | {
            "output_tokens": 1
        }
        try:
            await event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_mock",
                        "type": "message",
                        "role": "assistant",
                        "model": body["model"],
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
            )
            if fault is not None and fault.die_after_first:
                assert request.transport is not None
                request.transport.close()
                return resp
            await event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            await event("ping", {"type": "ping"})
            for i in range(self.chunks):
                await event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": f"t{i}"},
                    },
                )
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await event("content_block_stop", {"type": "content_block_stop", "index": 0})
            await event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
            await event("message_stop", {"type": "message_stop"})
            await asyncio.sleep(self.end_delay)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(time.monotonic())
            raise
        return resp

    async def _openai_turn(
        self, request: web.Request, body: dict[str, Any], turn: Turn, usage: dict[str, Any]
    ) -> web.StreamResponse:
        calls: list[dict[str, Any]] = [
            {
                "id": c.id or f"call_{len(self.requests)}_{i}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for i, c in enumerate(turn.tool_calls)
        ]
        finish = "tool_calls" if calls else "stop"
        head = {"id": "chatcmpl-mock", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": turn.text or None,
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            return web.json_response(
                {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
        # A stream as OpenAI sends it: role first, the text, each call's name, then its
        # arguments as a separate delta (clients must join them by index).
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if turn.text:
            deltas.append({"content": turn.text})
        for i, call in enumerate(calls):
            fn = call["function"]
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": fn["name"], "arguments": ""}}]})  # fmt: skip
            deltas.append(
                {"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}
            )
        include = (body.get("stream_options") or {}).get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, delta in enumerate(deltas):
            chunk = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": finish if n == len(deltas) - 1 else None,
                    }
                ],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if include:
            last = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _anthropic_turn(
        self, request: web.Request, body: dict[str, Any], turn: Turn, usage: dict[str, Any]
    ) -> web.StreamResponse:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": turn.text}] if turn.text else []
        blocks += [
            {
                "type": "tool_use",
                "id": c.id or f"toolu_{len(self.requests)}_{i}",
                "name": c.name,
                "input": c.arguments,
            }
            for i, c in enumerate(turn.tool_calls)
        ]
        stop = "tool_use" if turn.tool_calls else "end_turn"
        message = {"id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"]}
        if not body.get("stream"):
            return web.json_response(
                {
                    **message,
                    "content": blocks,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(data: dict[str, Any]) -> None:
            await resp.write(f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode())

        start_usage = {**usage, "output_tokens": 1}
        await event(
            {
                "type": "message_start",
                "message": {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": start_usage,
                },
            }
        )
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                start: dict[str, Any] = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {**block, "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            await event({"type": "content_block_start", "index": i, "content_block": start})
            await event({"type": "content_block_delta", "index": i, "delta": delta})
            await event({"type": "content_block_stop", "index": i})
        await event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            }
        )
        await event({"type": "message_stop"})
        return resp


def _response_object(model: str, usage: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "resp_mock",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }
