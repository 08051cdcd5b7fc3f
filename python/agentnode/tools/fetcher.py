"""The HTTP client `http_fetch` and `web_search` run inside a sandbox that has the caller's
network (as `python3 -I -c` source, so it needs nothing of agentnode): one JSON request on
stdin, one JSON reply on stdout."""

import base64
import json
import sys
import urllib.error
import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Redirects go back to the caller: each hop is its own decision (and its own policy check).
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def main() -> None:
    req = json.load(sys.stdin)
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(
        req["url"],
        data=None if req.get("body") is None else req["body"].encode(),
        headers=req.get("headers", {}),
        method=req.get("method", "GET"),
    )
    try:
        resp = opener.open(request, timeout=req["timeout"])
        status, headers, body = resp.status, dict(resp.headers), resp.read(req["max_bytes"] + 1)
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, dict(e.headers), e.read(req["max_bytes"] + 1)
    except OSError as e:
        reason = getattr(e, "reason", e)
        errno = getattr(reason, "errno", None)
        json.dump(
            {"error": str(reason), "errno": errno, "timeout": "timed out" in str(reason)},
            sys.stdout,
        )
        return
    json.dump(
        {"status": status, "headers": headers, "body": base64.b64encode(body).decode()}, sys.stdout
    )


main()
