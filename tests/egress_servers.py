"""Test hosts, run inside a test-owned netns: TCP sinks that reply with the byte count, UDP echo,
and an authoritative DNS server that logs every query name to a file. argv[1] is JSON config."""

from __future__ import annotations

import json
import socket
import sys
import threading

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


def dns_server(addr: str, port: int, records: dict[str, list[str]], ttl: int, log: str) -> None:
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    BOUND.release()
    while True:
        data, src = s.recvfrom(4096)
        q = dns.message.from_wire(data)
        name = q.question[0].name.to_text(omit_final_dot=True)
        with open(log, "a") as f:
            f.write(name + "\n")
        r = dns.message.make_response(q)
        rdtype = q.question[0].rdtype
        addrs = [a for a in records.get(name, []) if (":" in a) == (rdtype == 28)]
        if addrs:
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, ttl, "IN", rdtype, addrs))
        elif name not in records:
            r.set_rcode(dns.rcode.NXDOMAIN)
        s.sendto(r.to_wire(), src)


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
            threading.Thread(
                target=dns_server,
                args=(addr, 53, d["records"], d["ttl"], d["log"]),
                daemon=True,
            ).start()
        n += len(d["addrs"])
    for _ in range(n):
        BOUND.acquire()
    print("ready", flush=True)
    sys.stdin.read()  # exits when the test closes our stdin
