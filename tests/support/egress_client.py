"""Runs inside a test task (its netns and cgroup): performs socket operations given as JSON in
argv[1] and prints one JSON result per operation. Errors are results, not exceptions."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, cast


def connect(op: dict[str, Any]) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(op.get("timeout", 5))
    t = time.perf_counter()
    try:
        s.connect((op["host"], op["port"]))
    except OSError as e:
        return {"ok": False, "errno": e.errno, "ms": (time.perf_counter() - t) * 1000}
    ms = (time.perf_counter() - t) * 1000
    out: dict[str, Any] = {"ok": True, "ms": ms}
    if op.get("send"):
        chunk = b"x" * 65536
        left = op["send"]
        t = time.perf_counter()
        while left:
            left -= s.send(chunk[: min(left, len(chunk))])
        s.shutdown(socket.SHUT_WR)
        out["reply"] = s.recv(64).decode()
        out["seconds"] = time.perf_counter() - t
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        out["retrans"] = int.from_bytes(info[100:104], "little")  # tcpi_total_retrans
    s.close()
    return out


def udp(op: dict[str, Any]) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(op.get("timeout", 2))
    try:
        s.sendto(op.get("data", "ping").encode(), (op["host"], op["port"]))
        if op.get("reply"):
            data, src = s.recvfrom(2048)
            return {"ok": True, "reply": data.decode(), "src": list(src[:2])}
    except OSError as e:
        return {"ok": False, "errno": e.errno}
    return {"ok": True}


def fastopen(op: dict[str, Any]) -> dict[str, Any]:
    """TCP Fast Open: sendto() with data connects without connect()."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.sendto(b"hello", socket.MSG_FASTOPEN, (op["host"], op["port"]))
    except OSError as e:
        return {"ok": False, "errno": e.errno}
    return {"ok": True}


def raw_icmp(op: dict[str, Any]) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(0.5)
    packet = bytes([8, 0, 0xF7, 0xFF, 0, 0, 0, 0])  # echo request, id 0 seq 0, checksum set
    try:
        s.sendto(packet, (op["host"], 0))
        s.recvfrom(2048)
    except OSError as e:
        return {"ok": False, "errno": e.errno, "timeout": isinstance(e, TimeoutError)}
    return {"ok": True}


def resolve(op: dict[str, Any]) -> dict[str, Any]:
    import dns.message
    import dns.query
    import dns.rcode

    q = dns.message.make_query(op["name"], op.get("rdtype", "A"))
    where, port = op["server"], op.get("port", 53)
    out = {}
    try:
        # "udp", "tcp", or "fallback": UDP, then TCP if the answer was truncated.
        if op.get("transport") == "tcp":
            r = dns.query.tcp(q, where, port=port, timeout=3)
        elif op.get("transport") == "fallback":
            r, out["tcp"] = dns.query.udp_with_fallback(q, where, port=port, timeout=3)
        else:
            r = dns.query.udp(q, where, port=port, timeout=3)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    addrs = [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]
    return {"ok": True, "rcode": dns.rcode.to_text(r.rcode()), "addrs": addrs, **out}


def udp_connect_loop(op: dict[str, Any]) -> dict[str, Any]:
    """ns per connect() of a UDP socket: runs the connect hook and sends nothing."""
    family = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    n = op["n"]
    t = time.perf_counter_ns()
    for _ in range(n):
        s.connect((op["host"], op["port"]))
    return {"ok": True, "ns": (time.perf_counter_ns() - t) / n}


def udp_connect_until(op: dict[str, Any]) -> dict[str, Any]:
    """connect() a UDP socket again and again for `seconds` (each runs the connect hook; nothing
    is sent): how many, and how many failed with each errno."""
    family = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    n, errors = 0, dict[int | None, int]()
    deadline = time.monotonic() + op["seconds"]
    while time.monotonic() < deadline:
        try:
            s.connect((op["host"], op["port"]))
        except OSError as e:
            errors[e.errno] = errors.get(e.errno, 0) + 1
        n += 1
    return {"ok": True, "n": n, "errors": errors}


def resolve_loop(op: dict[str, Any]) -> dict[str, Any]:
    """Latencies (ms) of `n` queries for one name."""
    import dns.message
    import dns.query

    q = dns.message.make_query(op["name"], "A")
    out = []
    for _ in range(op["n"]):
        t = time.perf_counter()
        dns.query.udp(q, op["server"], port=op.get("port", 53), timeout=3)
        out.append((time.perf_counter() - t) * 1000)
    return {"ok": True, "ms": out}


def iperf(op: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    out = subprocess.run(
        ["iperf3", "-c", op["host"], "-p", str(op["port"]), "-t", str(op["seconds"]), "-J"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {"ok": True, "bps": json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]}


def serve(op: dict[str, Any]) -> dict[str, Any]:
    """Listens on `ports` (TCP on both families, or UDP with `udp`), says so on stdout, and for
    `seconds` answers whoever reaches it; returns the (peer, port) pairs it answered."""
    import selectors

    udp = op.get("udp", False)
    sel = selectors.DefaultSelector()
    for port in op["ports"]:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        if not udp:
            s.listen(16)
        sel.register(s, selectors.EVENT_READ, port)
    print(json.dumps({"listening": op["ports"]}), flush=True)
    peers, errors = [], []
    deadline = time.monotonic() + op["seconds"]
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            s = cast(socket.socket, key.fileobj)
            try:
                if udp:
                    _, peer = s.recvfrom(2048)
                    s.sendto(b"ok", peer)
                else:
                    c, peer = s.accept()
                    c.settimeout(2)
                    c.recv(64)
                    c.sendall(b"ok")
                    c.close()
            except OSError as e:
                errors.append(e.errno)
                continue
            peers.append([peer[0].removeprefix("::ffff:"), key.data])
    return {"ok": True, "peers": peers, "errors": errors}


def talk(op: dict[str, Any]) -> dict[str, Any]:
    """Connects (TCP) or sends (UDP) to a `serve` op and waits for its "ok"."""
    family = socket.AF_INET6 if ":" in op["host"] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM if op.get("udp") else socket.SOCK_STREAM)
    s.settimeout(op.get("timeout", 1.5))
    if op.get("source"):
        s.bind((op["source"], 0))
    try:
        if op.get("udp"):
            s.sendto(b"hi", (op["host"], op["port"]))
        else:
            s.connect((op["host"], op["port"]))
            s.sendall(b"hi")
        reply = s.recv(64).decode()
    except OSError as e:
        return {"ok": False, "errno": e.errno, "timeout": isinstance(e, TimeoutError)}
    return {"ok": reply == "ok"}


def raw_dns(op: dict[str, Any]) -> dict[str, Any]:
    """Sends the hex query `wire` as it is over UDP (or TCP) and returns the reply's rcode and
    addresses."""
    import dns.message
    import dns.rcode

    data = bytes.fromhex(op["wire"])
    family = socket.AF_INET6 if ":" in op["server"] else socket.AF_INET
    tcp = op.get("transport") == "tcp"
    s = socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        if tcp:
            s.connect((op["server"], 53))
            s.sendall(len(data).to_bytes(2, "big") + data)
            size = int.from_bytes(s.recv(2), "big")
            reply = b""
            while len(reply) < size:
                reply += s.recv(size - len(reply))
        else:
            s.sendto(data, (op["server"], 53))
            reply = s.recv(4096)
    except OSError as e:
        return {"ok": False, "error": str(e)}
    r = dns.message.from_wire(reply)
    addrs = [rd.address for rrset in r.answer for rd in rrset if hasattr(rd, "address")]
    return {
        "ok": True,
        "id": r.id,
        "rcode": dns.rcode.to_text(r.rcode()),
        "addrs": addrs,
        "question": r.question[0].name.to_text() if r.question else "",
    }


OPS = {
    "serve": serve,
    "talk": talk,
    "raw_dns": raw_dns,
    "fastopen": fastopen,
    "udp_connect_loop": udp_connect_loop,
    "udp_connect_until": udp_connect_until,
    "resolve_loop": resolve_loop,
    "iperf": iperf,
    "connect": connect,
    "udp": udp,
    "raw_icmp": raw_icmp,
    "resolve": resolve,
}

if __name__ == "__main__":
    for op in json.loads(sys.argv[1]):
        if op["op"] == "sleep":
            time.sleep(op["seconds"])
            continue
        if op["op"] == "wait_for":  # a file the test creates when it has done its part
            while not os.path.exists(op["path"]):
                time.sleep(0.01)
            continue
        print(json.dumps(OPS[op["op"]](op)), flush=True)
