"""The node's DNS forwarder. Each task's port-53 traffic, UDP and TCP, is redirected here by its
BPF programs.

A name the task's policy allows is resolved upstream (over the transport the task used), and every
A/AAAA address in the answer is written into the task's exact-IP map (expiry = max(TTL, floor) +
grace) *before* the answer is released, so the task's connect right after resolving never races
the map. Any other name is refused at once, and nothing is sent upstream for it.

Nothing the task sent goes upstream as it was: the node builds its own query from the parsed
question (one question, the name in lower case, its own ID and EDNS). Answers pointing into the
node, the host or private space are dropped (`AnswerScreen`), and `DnsLimits` bound what a task
could tunnel through names a wildcard rule allows: query rate, label and name length, and the
record types asked for. Each drop and refusal of these is a `Denial` in the audit log.

A truncated (TC) upstream answer goes to the task as it is, its addresses allowed: the task
retries over TCP, as RFC 7766 has it, and that retry is redirected here too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from agentnode.egress import dnswire
from agentnode.egress.enforce import Denial, Egress
from agentnode.egress.screen import AnswerScreen
from agentnode.errors import AgentnodeError

__all__ = ["DnsForwarder", "DnsLimits"]

log = logging.getLogger(__name__)

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _key(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


#: Record types a task may ask for by default: addresses and what leads to them. TXT, NULL, ANY
#: and the rest carry arbitrary data back (a tunnel's downlink) and are refused.
ADDRESS_TYPES = frozenset(
    dns.rdatatype.RdataType.make(t) for t in ("A", "AAAA", "CNAME", "HTTPS", "SVCB", "SRV", "MX")
)


@dataclass(frozen=True)
class DnsLimits:
    """Per-task bounds on what the forwarder sends upstream. `rate` queries/s with bursts of
    `burst` (every query that would go upstream counts); a name allowed only by a wildcard rule
    has labels of at most `max_label` and at most `max_name` characters; `types`: the record
    types a task may ask for."""

    rate: float = 50.0
    burst: float = 100.0
    max_label: int = 40
    max_name: int = 120
    types: frozenset[int] = field(default=ADDRESS_TYPES)

    @classmethod
    def configured(
        cls, *, rate: float, max_label: int, max_name: int, extra_types: Iterable[str] = ()
    ) -> DnsLimits:
        """Limits from the node's configuration: bursts of twice `rate`, and `extra_types`
        (names like "TXT") allowed besides the address types."""
        extra = {dns.rdatatype.RdataType.make(t) for t in extra_types}
        return cls(rate, 2 * rate, max_label, max_name, ADDRESS_TYPES | extra)


class _Bucket:
    """A token bucket; `warned`: when a refusal for its rate was last audited."""

    __slots__ = ("at", "tokens", "warned")

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens
        self.at = time.monotonic()
        self.warned = 0.0


class DnsForwarder(asyncio.DatagramProtocol):
    """Answers tasks' queries by the task's policy; tasks are known by their source address.

    Serve UDP with `loop.create_datagram_endpoint(lambda: fwd, local_addr=...)` and TCP with
    `await fwd.listen_tcp(host, port)`, or both on one address with `await fwd.listen(host, port)`.
    """

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        floor: float = 5.0,
        grace: float = 30.0,
        timeout: float = 2.0,
        tcp_idle: float = 10.0,
        limits: DnsLimits | None = None,
        screen: AnswerScreen | None = None,
    ) -> None:
        self.upstream = upstream
        self.limits = limits or DnsLimits()
        self.screen = screen or AnswerScreen()
        self.floor = floor
        self.grace = grace
        self.timeout = timeout
        self.tcp_idle = tcp_idle
        self.answered = 0
        self.refused = 0
        self.truncated = 0
        self._tasks: dict[str, Egress] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._streams: set[asyncio.StreamWriter] = set()

    def add_task(self, source: str, egress: Egress) -> None:
        """Routes queries from `source` (the task's address) through `egress`'s policy."""
        self._tasks[_key(source)] = egress

    def remove_task(self, source: str) -> None:
        """Forgets a task; its later queries are refused."""
        self._tasks.pop(_key(source), None)
        self._buckets.pop(_key(source), None)

    async def listen(self, host: str, port: int) -> None:
        """Serves UDP and TCP on `host`:`port` (the address the tasks' programs redirect to)."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        await self.listen_tcp(host, port)

    async def listen_tcp(self, host: str, port: int) -> int:
        """Serves DNS over TCP (2-byte length-prefixed messages, RFC 7766) on `host`:`port`;
        returns the port bound (the one chosen when `port` is 0)."""
        server = await asyncio.start_server(self._serve_stream, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    # --- UDP ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        source = str(addr[0])
        q = dnswire.question(data)
        route = self._route(q, source)
        if q is None or route is None:
            reply = self._refusal(data, source)
            if reply is not None:
                self._send(reply, addr)
            return
        task = asyncio.get_running_loop().create_task(self._forward_datagram(data, q, addr, *route))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _forward_datagram(
        self,
        data: bytes,
        q: dnswire.Question,
        addr: tuple[str | int, ...],
        egress: Egress,
        name: str,
    ) -> None:
        host, port = self.upstream
        try:
            reply, addrs = await self._exchange_udp(q)
        except OSError as e:  # TimeoutError too
            log.warning("upstream %s:%d failed for %s: %s", host, port, name, e)
            self._send(self._servfail(data), addr)
            return
        if dnswire.truncated(reply):
            self.truncated += 1
        dropped = self._screen(egress, name, addrs)
        if dropped:
            try:
                msg = dns.message.from_wire(reply)
            except dns.exception.DNSException:
                self._send(self._servfail(data), addr)
                return
            reply = _without(msg, dropped).to_wire()
            addrs = [(ip, ttl) for ip, ttl in addrs if ip not in dropped]
        reply = dnswire.for_task(reply, data, q)
        self._send(reply if self._allow(egress, name, addrs) else self._servfail(data), addr)

    def _send(self, wire: bytes, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None:
            self._transport.sendto(wire, addr)

    # --- TCP ---

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One TCP connection: queries answered in order until the client closes it, stays idle
        for `tcp_idle` seconds, or sends something that is not DNS."""
        source = str(writer.get_extra_info("peername")[0])
        me = asyncio.current_task()
        if me is not None:  # always set in a handler; close() awaits it like a datagram's
            self._pending.add(cast("asyncio.Task[None]", me))
        self._streams.add(writer)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                    data = await asyncio.wait_for(
                        reader.readexactly(int.from_bytes(head, "big")), self.timeout
                    )
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                q = dnswire.question(data)
                route = self._route(q, source)
                if q is None or route is None:
                    refusal = self._refusal(data, source)
                    if refusal is None:
                        return
                    wire = refusal
                else:
                    wire = await self._resolve_tcp(data, q, *route)
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._streams.discard(writer)
            if me is not None:
                self._pending.discard(cast("asyncio.Task[None]", me))
            writer.close()

    # --- both ---

    def _route(self, q: dnswire.Question | None, source: str) -> tuple[Egress, str] | None:
        """The task's enforcement and the queried name, or None when the query is refused: its
        name is not allowed, or it is over the task's limits (audited)."""
        egress = self._tasks.get(_key(source))
        if egress is None or q is None or not egress.policy.host_ports(q.name):
            return None
        reason = self._over_limits(_key(source), egress, q)
        if reason is not None:
            if reason:
                self._deny(egress, q.name, reason)
            return None
        return egress, q.name

    def _over_limits(self, source: str, egress: Egress, q: dnswire.Question) -> str | None:
        """Why `q` exceeds the task's DNS limits ("" when over its rate but already audited
        this second), or None."""
        lim = self.limits
        now = time.monotonic()
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(lim.burst)
        bucket.tokens = min(lim.burst, bucket.tokens + (now - bucket.at) * lim.rate)
        bucket.at = now
        if bucket.tokens < 1:
            # One audit record a second while a task stays over its rate, not one per query.
            if now - bucket.warned < 1:
                return ""
            bucket.warned = now
            return "dns_rate"
        bucket.tokens -= 1
        if q.qtype not in lim.types or q.qclass != 1:
            return "dns_type"
        if all(r.pattern.startswith("*.") for r in egress.policy.host_rules if r.matches(q.name)):
            if len(q.name) > lim.max_name:
                return "dns_name_length"
            if any(len(label) > lim.max_label for label in q.name.split(".")):
                return "dns_label_length"
        return None

    def _deny(
        self, egress: Egress, name: str, reason: str, address: _Address | None = None
    ) -> None:
        host, port = self.upstream
        egress.deny(
            Denial(
                time.clock_gettime_ns(time.CLOCK_BOOTTIME),
                egress.cgroup_id,
                address or ipaddress.ip_address(host),
                0 if address else port,
                "dns",
                reason,
                0,
                name,
            )
        )

    def _screen(
        self, egress: Egress, name: str, addrs: list[tuple[_Address, int]]
    ) -> set[_Address]:
        """The answer's addresses the task may not learn (each one audited)."""
        dropped: set[_Address] = set()
        nets = egress.policy.nets
        for ip, _ in addrs:
            why = self.screen.blocked(ip, nets)
            if why is not None and ip not in dropped:
                dropped.add(ip)
                log.info("dropping %s from the answer for %s: %s", ip, name, why)
                self._deny(egress, name, "dns_rebinding", ip)
        return dropped

    def _refusal(self, data: bytes, source: str) -> bytes | None:
        """REFUSED for a query; None (dropped) for something that is no DNS message."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            log.info("dropping an unparseable DNS query from %s", source)
            return None
        self.refused += 1
        egress = self._tasks.get(_key(source))
        if egress is not None:
            egress.dns_refused += 1
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.REFUSED)
        return reply.to_wire()

    def _allow(self, egress: Egress, name: str, addrs: list[tuple[_Address, int]]) -> bool:
        """Writes the answer's addresses into the task's map; False if that failed, and then the
        answer must not be released (e.g. the task ended): the task could not use it."""
        ports = egress.policy.host_ports(name)
        try:
            for ip, ttl in addrs:
                egress.allow_resolved(ip, ports, max(float(ttl), self.floor) + self.grace)
        except AgentnodeError as e:
            log.warning("cannot allow the answer for %s: %s", name, e)
            return False
        self.answered += 1
        egress.dns_answered += 1
        return True

    async def _resolve_tcp(
        self, data: bytes, q: dnswire.Question, egress: Egress, name: str
    ) -> bytes:
        """The upstream's answer over TCP once its addresses are allowed, or SERVFAIL."""
        host, port = self.upstream
        try:
            query = dns.message.from_wire(dnswire.upstream_query(q, secrets.randbits(16)))
            reply = await dns.asyncquery.tcp(query, host, port=port, timeout=self.timeout)
            addrs = _addresses(reply)
            dropped = self._screen(egress, name, addrs)
            wire = _without(reply, dropped).to_wire(max_size=65535)
        except (dns.exception.DNSException, OSError) as e:
            log.warning("upstream %s:%d failed for %s: %s", host, port, name, e)
            return self._servfail(data)
        addrs = [(ip, ttl) for ip, ttl in addrs if ip not in dropped]
        wire = dnswire.for_task(wire, data, q)
        return wire if self._allow(egress, name, addrs) else self._servfail(data)

    async def _exchange_udp(self, q: dnswire.Question) -> tuple[bytes, list[tuple[_Address, int]]]:
        """Sends the node's query for `q`; returns the upstream's answer as it came and its
        A/AAAA records. A fresh socket per query keeps the source port random, as dnspython's
        does; plain socket calls on the loop cost a third less than its transport."""
        data = dnswire.upstream_query(q, secrets.randbits(16))
        host, port = self.upstream
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # Connected: the kernel drops datagrams from any other source.
            sock.connect((host, port))
            await loop.sock_sendall(sock, data)
            async with asyncio.timeout(self.timeout):
                while True:
                    reply = await loop.sock_recv(sock, 65535)
                    addrs = dnswire.answer_addresses(reply, data, q)
                    if addrs is not None:
                        return reply, addrs

    @staticmethod
    def _servfail(data: bytes) -> bytes:
        """SERVFAIL for the task's query."""
        try:
            fail = dns.message.make_response(dns.message.from_wire(data))
        except dns.exception.DNSException:
            return dnswire.error_reply(data, dns.rcode.SERVFAIL)
        fail.set_rcode(dns.rcode.SERVFAIL)
        return fail.to_wire()

    async def close(self) -> None:
        """Stops answering (UDP and TCP) and waits for queries in flight."""
        if self._transport is not None:
            self._transport.close()
        for server in self._servers:
            server.close()
        for writer in list(self._streams):
            writer.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _addresses(msg: dns.message.Message) -> list[tuple[_Address, int]]:
    return [
        (ipaddress.ip_address(rd.address), rrset.ttl)
        for rrset in msg.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rd in rrset
    ]


def _without(msg: dns.message.Message, dropped: set[_Address]) -> dns.message.Message:
    """`msg` with the A/AAAA records of the answer section for `dropped` addresses removed."""
    if not dropped:
        return msg
    answer = []
    for rrset in msg.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            keep = [rd for rd in rrset if ipaddress.ip_address(rd.address) not in dropped]
            if not keep:
                continue
            rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, keep)
        answer.append(rrset)
    msg.answer = answer
    return msg
