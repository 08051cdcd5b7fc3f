"""`http_fetch` and `web_search`. Both run their HTTP client in a fresh sandbox: `http_fetch`
with the calling task's own network mode and egress policy (a tool reaches exactly what its
task could), `web_search` with a policy that allows only its configured backend, which speaks
SearXNG's JSON API (`GET /search?q=...&format=json`)."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.errors import UsageError
from agentnode.tools.registry import Caller, RetryPolicy, Tool, ToolLimits
from agentnode.tools.result import Outcome
from agentnode.tools.sandboxed import Run, run_sandboxed

__all__ = ["WebTools"]

_FETCHER = Path(__file__).with_name("fetcher.py").read_text()

FETCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "pattern": "^https?://", "maxLength": 8192},
        "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"], "default": "GET"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}, "secret": True},
        "body": {"type": "string"},
        "max_bytes": {"type": "integer", "minimum": 1},
    },
    "required": ["url"],
    "additionalProperties": False,
}
SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 2048},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
    },
    "required": ["query"],
    "additionalProperties": False,
}
SEARCH_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {"results": {"type": "array"}},
    "required": ["results"],
}


def _retry_after(headers: dict[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from time import time

        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _classify(run: Run, limit: int) -> _Reply | Outcome:
    """The HTTP reply, or the outcome that says why there is none."""
    if run.result.exit_status != 0 or not run.stdout:
        cls = run.cls if run.cls != "ok" else "permanent"
        return run.outcome(
            cls,
            [
                {
                    "type": "text",
                    "text": "fetch failed: " + run.stderr.decode(errors="replace")[-500:],
                }
            ],
        )
    reply = json.loads(run.stdout)
    if "error" in reply:
        denied = reply.get("errno") == errno.EPERM or bool(run.denials)
        cls = "policy" if denied else "timeout" if reply.get("timeout") else "transient"
        why = "denied by the egress policy" if denied else reply["error"]
        out = run.outcome(cls, [{"type": "text", "text": f"cannot connect: {why}"}])
        if cls == "timeout":
            out.detail["retryable"] = True
        return out
    body = base64.b64decode(reply["body"])
    return _Reply(reply["status"], reply["headers"], body)


class WebTools:
    """`http_fetch`, and `web_search` when a backend is configured."""

    def __init__(
        self,
        *,
        node_network: EgressService | None = None,
        limits: ToolLimits | None = None,
        search_url: str | None = None,
        search_network: str = "egress",
    ) -> None:
        self.limits = limits or ToolLimits(memory=128 << 20, timeout=30.0)
        self._network = node_network
        self.search_url = search_url
        self._search_network = search_network
        self._search_policy: EgressPolicy | None = None
        if search_url is not None:
            parts = urllib.parse.urlsplit(search_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(f"tools.web_search.url {search_url!r}: give http(s)://host[:port]")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname
            is_ip = host.replace(".", "").isdigit() or ":" in host
            self._search_policy = (
                EgressPolicy(allow=[f"{host}:{port}"])
                if is_ip
                else EgressPolicy(hosts=[f"{host}:{port}"])
            )

    def tools(self) -> list[Tool]:
        out = [
            Tool(
                name="http_fetch",
                description="Fetch a URL with this task's own network access (its egress policy).",
                input_schema=FETCH_SCHEMA,
                run=self.fetch,
                limits=self.limits,
                retry=RetryPolicy(attempts=3),
            ),
        ]
        if self.search_url is not None:
            out.append(
                Tool(
                    name="web_search",
                    description="Search the web.",
                    input_schema=SEARCH_SCHEMA,
                    output_schema=SEARCH_OUTPUT,
                    run=self.search,
                    limits=self.limits,
                    egress=self._search_policy,
                    idempotent=True,
                )
            )
        return out

    async def _get(
        self, request: dict[str, Any], network: str, egress: EgressPolicy | None, caller: Caller
    ) -> _Reply | Outcome:
        limit = min(request.pop("max_bytes", self.limits.output), self.limits.output)
        request.update(max_bytes=limit, timeout=self.limits.timeout)
        run = await run_sandboxed(
            ["python3", "-I", "-c", _FETCHER],
            limits=dataclasses.replace(
                caller.within(self.limits),
                timeout=self.limits.timeout + 2,
                output=limit * 2 + 65536,
            ),
            stdin=json.dumps(request).encode(),
            network=network,
            egress=egress,
            node_network=self._network,
            user=caller.user,
            userns=caller.userns,
        )
        return _classify(run, limit)

    async def fetch(self, args: dict[str, Any], caller: Caller) -> Outcome:
        network, egress = caller.reach()
        if egress is None:
            return Outcome.error("policy", "this task has no network, so its tools have none")
        reply = await self._get(dict(args), network, egress, caller)
        if isinstance(reply, Outcome):
            return reply
        limit = min(args.get("max_bytes", self.limits.output), self.limits.output)
        body = reply.body[:limit]
        cls = (
            "ok"
            if reply.status < 400
            else "transient"
            if reply.status >= 500 or reply.status in (408, 429)
            else "permanent"
        )
        return Outcome(
            cls=cls,  # type: ignore[arg-type]
            content=[{"type": "text", "text": body.decode(errors="replace")}],
            structured=None,
            retry_after=_retry_after(reply.headers) if cls == "transient" else None,
            bytes_out=len(body),
            truncated=len(reply.body) > limit,
            detail={"status": reply.status},
        )

    async def search(self, args: dict[str, Any], caller: Caller) -> Outcome:
        assert self.search_url is not None
        if caller.reach()[0] == "none":
            # Its query leaves the node: a task without network would have a way out.
            return Outcome.error(
                "policy", f"task {caller.task or caller.tenant} has no network: it cannot search"
            )
        query = urllib.parse.urlencode({"q": args["query"], "format": "json"})
        url = f"{self.search_url.rstrip('/')}/search?{query}"
        reply = await self._get({"url": url}, self._search_network, self._search_policy, caller)
        if isinstance(reply, Outcome):
            return reply
        if reply.status >= 400:
            cls = "transient" if reply.status >= 500 or reply.status == 429 else "permanent"
            out = Outcome.error(cls, f"search backend answered HTTP {reply.status}")  # type: ignore[arg-type]
            out.retry_after = _retry_after(reply.headers)
            return out
        try:
            raw = json.loads(reply.body)["results"]
            results = [
                {
                    "title": str(r.get("title", "")),
                    "url": str(r["url"]),
                    "content": str(r.get("content", "")),
                }
                for r in raw[: args.get("max_results", 10)]
            ]
        except (ValueError, KeyError, TypeError) as e:
            return Outcome.error("permanent", f"search backend sent no SearXNG results ({e})")
        text = "\n\n".join(f"{r['title']}\n{r['url']}\n{r['content']}" for r in results)
        return Outcome.text(text, structured={"results": results}, bytes_out=len(reply.body))
