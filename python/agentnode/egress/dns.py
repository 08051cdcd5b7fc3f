"""The node's DNS forwarder. Each task's port-53 traffic is redirected here by its BPF programs.

A name the task's policy allows is resolved upstream, and every A/AAAA address in the answer is
written into the task's exact-IP map (expiry = max(TTL, floor) + grace) *before* the answer is
released, so the task's connect right after resolving never races the map. Any other name is
refused at once, and nothing is sent upstream for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from agentnode.egress.enforce import Egress
from agentnode.errors import AgentnodeError

__all__ = ["DnsForwarder"]

log = logging.getLogger(__name__)


def _key(addr: str) -> str:
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


class DnsForwarder(asyncio.DatagramProtocol):
    """Answers tasks' queries by the task's policy; tasks are known by their source address."""

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        floor: float = 5.0,
        grace: float = 30.0,
        timeout: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self.floor = floor
        self.grace = grace
        self.timeout = timeout
        self.answered = 0
        self.refused = 0
        self._tasks: dict[str, Egress] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def add_task(self, source: str, egress: Egress) -> None:
        """Routes queries from `source` (the task's address) through `egress`'s policy."""
        self._tasks[_key(source)] = egress

    def remove_task(self, source: str) -> None:
        """Forgets a task; its later queries are refused."""
        self._tasks.pop(_key(source), None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            log.info("dropping an unparseable DNS query from %s", addr[0])
            return
        egress = self._tasks.get(_key(str(addr[0])))
        if egress is None or len(query.question) != 1:
            self._refuse(query, addr)
            return
        name = query.question[0].name.to_text(omit_final_dot=True)
        ports = egress.policy.host_ports(name)
        if not ports:
            self._refuse(query, addr)
            return
        task = asyncio.get_running_loop().create_task(self._forward(query, addr, egress, name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _refuse(self, query: dns.message.Message, addr: tuple[str | int, ...]) -> None:
        self.refused += 1
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.REFUSED)
        self._send(reply, addr)

    def _send(self, reply: dns.message.Message, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None:
            self._transport.sendto(reply.to_wire(), addr)

    async def _forward(
        self, query: dns.message.Message, addr: tuple[str | int, ...], egress: Egress, name: str
    ) -> None:
        host, port = self.upstream
        try:
            reply = await dns.asyncquery.udp(query, host, port=port, timeout=self.timeout)
        except (dns.exception.DNSException, OSError) as e:
            log.warning("upstream %s:%d failed for %s: %s", host, port, name, e)
            fail = dns.message.make_response(query)
            fail.set_rcode(dns.rcode.SERVFAIL)
            self._send(fail, addr)
            return
        ports = egress.policy.host_ports(name)
        try:
            for rrset in reply.answer:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    ttl = max(float(rrset.ttl), self.floor) + self.grace
                    for rd in rrset:
                        egress.allow_resolved(rd.address, ports, ttl)
        except AgentnodeError as e:
            # An answer the task could not use must not be released (e.g. the task ended).
            log.warning("cannot allow the answer for %s: %s", name, e)
            fail = dns.message.make_response(query)
            fail.set_rcode(dns.rcode.SERVFAIL)
            self._send(fail, addr)
            return
        self.answered += 1
        self._send(reply, addr)

    async def close(self) -> None:
        """Stops answering and waits for queries in flight."""
        if self._transport is not None:
            self._transport.close()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
