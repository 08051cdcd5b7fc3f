"""A test OTLP/HTTP traces receiver on loopback: decodes each ExportTraceServiceRequest with
opentelemetry-proto and appends one JSON line per span to the file named by argv[1]; prints its
URL once listening. Run it in the network namespace of the daemon under test."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(v: dict[str, object]) -> object:
    ((kind, raw),) = v.items()
    if kind == "arrayValue":
        assert isinstance(raw, dict)
        return [_value(x) for x in raw.get("values", [])]
    return int(raw) if kind == "intValue" else raw  # type: ignore[call-overload]


def _attributes(items: list[dict[str, Any]]) -> dict[str, object]:
    return {str(a["key"]): _value(a["value"]) for a in items}


async def main() -> None:
    out = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 - open for the server's life

    async def traces(request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for rs in MessageToDict(req).get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    span["attributes"] = _attributes(span.get("attributes", []))
                    for event in span.get("events", []):
                        event["attributes"] = _attributes(event.get("attributes", []))
                    out.write(json.dumps(span) + "\n")
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"http://127.0.0.1:{port}/v1/traces", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
