"""Test hosts, run inside a test-owned netns: TCP sinks that reply with the byte count, UDP echo,
and an authoritative DNS server (UDP and TCP) that logs every query name to a file, TCP ones as
`tcp:NAME`. argv[1] is JSON config."""

from __future__ import annotations

import json
import socket
import sys
import threading
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

BOUND = threading.Semaphore(0)


def tcp_sink(addr: str, port: int) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    BOUND.release()

    def serve(c: socket.socket) -> None:
        n = 0
        while data := c.recv(1 << 16):
            n += len(data)
        c.sendall(str(n).encode())
        c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def udp_echo(addr: str, port: int) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    BOUND.release()
    while True:
        data, src = s.recvfrom(2048)
        s.sendto(data, src)


def dns_answer(data: bytes, cfg: dict[str, Any], tcp: bool) -> bytes:
    """The answer to one query; names in cfg["truncate"] get an empty TC answer over UDP."""
    q = dns.message.from_wire(data)
    name = q.question[0].name.to_text(omit_final_dot=True)
    with open(cfg["log"], "a") as f:
        f.write(("tcp:" if tcp else "") + name + "\n")
    if "wire_log" in cfg:  # every query as it arrived, in hex
        with open(cfg["wire_log"], "a") as f:
            f.write(data.hex() + "\n")
    r = dns.message.make_response(q)
    if not tcp and name in cfg.get("truncate", []):
        r.flags |= dns.flags.TC
        return r.to_wire()
    rdtype = q.question[0].rdtype
    addrs = [
        a
        for a in cfg["records"].get(name.lower(), [])
        if rdtype in (1, 28) and (":" in a) == (rdtype == 28)
    ]  # other types: an empty answer
    if addrs:
        r.answer.append(
            dns.rrset.from_text_list(q.question[0].name, cfg["ttl"], "IN", rdtype, addrs)
        )
    elif name.lower() not in cfg["records"]:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()


def dns_server(addr: str, cfg: dict[str, Any]) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    BOUND.release()
    while True:
        data, src = s.recvfrom(4096)
        s.sendto(dns_answer(data, cfg, tcp=False), src)


def dns_tcp_server(addr: str, cfg: dict[str, Any]) -> None:
    """DNS over TCP: 2-byte length-prefixed messages, several per connection."""
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 53))
    s.listen(64)
    BOUND.release()

    def serve(c: socket.socket) -> None:
        f = c.makefile("rb")
        while len(head := f.read(2)) == 2:
            wire = dns_answer(f.read(int.from_bytes(head, "big")), cfg, tcp=True)
            c.sendall(len(wire).to_bytes(2, "big") + wire)
        c.close()

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    for addr, port in cfg.get("tcp", []):
        threading.Thread(target=tcp_sink, args=(addr, port), daemon=True).start()
    for addr, port in cfg.get("udp", []):
        threading.Thread(target=udp_echo, args=(addr, port), daemon=True).start()
    n = len(cfg.get("tcp", [])) + len(cfg.get("udp", []))
    if "dns" in cfg:
        d = cfg["dns"]
        for addr in d["addrs"]:
            for server in (dns_server, dns_tcp_server):
                threading.Thread(target=server, args=(addr, d), daemon=True).start()
        n += 2 * len(d["addrs"])
    for _ in range(n):
        BOUND.acquire()
    print("ready", flush=True)
    sys.stdin.read()  # exits when the test closes our stdin
