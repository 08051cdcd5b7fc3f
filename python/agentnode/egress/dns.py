"""The node's DNS forwarder. Each task's port-53 traffic, UDP and TCP, is redirected here by its
BPF programs.

A name the task's policy allows is resolved upstream (over the transport the task used), and every
A/AAAA address in the answer is written into the task's exact-IP map (expiry = max(TTL, floor) +
grace) *before* the answer is released, so the task's connect right after resolving never races
the map. Any other name is refused at once, and nothing is sent upstream for it.

A truncated (TC) upstream answer goes to the task as it is, its addresses allowed: the task
retries over TCP, as RFC 7766 has it, and that retry is redirected here too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from agentnode.egress import dnswire
from agentnode.egress.enforce import Egress
from agentnode.errors import AgentnodeError

__all__ = ["DnsForwarder"]

log = logging.getLogger(__name__)

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _key(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


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
    ) -> None:
        self.upstream = upstream
        self.floor = floor
        self.grace = grace
        self.timeout = timeout
        self.tcp_idle = tcp_idle
        self.answered = 0
        self.refused = 0
        self.truncated = 0
        self._tasks: dict[str, Egress] = {}
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
            reply, addrs = await self._exchange_udp(data, q)
        except OSError as e:  # TimeoutError too
            log.warning("upstream %s:%d failed for %s: %s", host, port, name, e)
            self._send(self._servfail(data), addr)
            return
        if dnswire.truncated(reply):
            self.truncated += 1
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
                if route is None:
                    refusal = self._refusal(data, source)
                    if refusal is None:
                        return
                    wire = refusal
                else:
                    wire = await self._resolve_tcp(data, *route)
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
        """The task's enforcement and the queried name, or None when the query is refused."""
        egress = self._tasks.get(_key(source))
        if egress is None or q is None or not egress.policy.host_ports(q.name):
            return None
        return egress, q.name

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

    async def _resolve_tcp(self, data: bytes, egress: Egress, name: str) -> bytes:
        """The upstream's answer over TCP once its addresses are allowed, or SERVFAIL."""
        host, port = self.upstream
        try:
            reply = await dns.asyncquery.tcp(
                dns.message.from_wire(data), host, port=port, timeout=self.timeout
            )
            wire = reply.to_wire(max_size=65535)
        except (dns.exception.DNSException, OSError) as e:
            log.warning("upstream %s:%d failed for %s: %s", host, port, name, e)
            return self._servfail(data)
        addrs = [
            (ipaddress.ip_address(rd.address), rrset.ttl)
            for rrset in reply.answer
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in rrset
        ]
        return wire if self._allow(egress, name, addrs) else self._servfail(data)

    async def _exchange_udp(
        self, data: bytes, q: dnswire.Question
    ) -> tuple[bytes, list[tuple[_Address, int]]]:
        """Sends the task's query as it came; returns the upstream's answer as it came and its
        A/AAAA records. A fresh socket per query keeps the source port random, as dnspython's
        does; plain socket calls on the loop cost a third less than its transport."""
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
