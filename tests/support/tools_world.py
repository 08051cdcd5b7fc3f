"""A test world for tool tests: an egress `World` with a plain HTTP server (and a mock of
SearXNG's JSON API at /search) on HOST4:8080 in its hosts netns, and a node `EgressService`
whose bridge lives in its task netns."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from agentnode.egress.service import EgressService
from support.egress_world import HOST4, World

HTTP_SERVER = """
import http.server, json, sys, urllib.parse
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/search?"):
            # SearXNG's JSON API: GET /search?q=...&format=json
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            assert q["format"] == ["json"]
            body = json.dumps({"query": q["q"][0], "results": [
                {"title": f"T{i} {q['q'][0]}", "url": f"https://example.org/{i}",
                 "content": f"c{i}", "engine": "mock"} for i in range(5)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
            return
        code = {"/busy": 503, "/gone": 404}.get(self.path, 200)
        self.send_response(code)
        if code == 503:
            self.send_header("Retry-After", "7")
        self.end_headers()
        self.wfile.write(f"{self.path} from the test host".encode())
    def log_message(self, *a):
        pass
s = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H)
print("ready", flush=True)
s.serve_forever()
"""


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[World, EgressService]]:
    with World() as w:
        p = subprocess.Popen(["ip", "netns", "exec", w.hosts, sys.executable, "-c", HTTP_SERVER,
                              HOST4, "8080"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        svc = EgressService(bridge="agentnode0", subnet="10.77.3.0/24", node_netns=w.task)
        try:
            yield w, svc
        finally:
            svc.close()
            p.kill()
            p.communicate()
