"""Just enough of the DNS wire format (RFC 1035 §4) for the forwarder's hot path: the question a
query asks, the query the node sends upstream for it, and the A/AAAA records of the answer. dnspython builds a full message
object for each, which cost more than everything else the forwarder does per query. A query
these functions do not accept is refused (dnspython builds that answer); an answer they do not
accept is not taken for the answer to the query."""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

__all__ = [
    "Question",
    "answer_addresses",
    "error_reply",
    "for_task",
    "question",
    "truncated",
    "upstream_query",
]

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_TYPE_A, _TYPE_AAAA, _TYPE_OPT, _CLASS_IN = 1, 28, 41, 1
_QR, _OPCODE, _TC, _RD, _RCODE = 0x8000, 0x7800, 0x0200, 0x0100, 0x000F
# What the node offers upstream for a task that speaks EDNS: the size DNS flag day 2020 chose
# (no fragmentation), never more, whatever the task asked.
_EDNS_MAX, _EDNS_MIN = 1232, 512
# Host rules only ever match these; a label with anything else (a dot inside a label, say)
# must not be read as the name it would print as.
_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Question(NamedTuple):
    """A query's one question: the name (lower case, no final dot), its wire bytes as the task
    sent them, the type, the class, whether recursion was desired, and the task's EDNS UDP size
    (None: no EDNS)."""

    name: str
    wire: bytes
    qtype: int
    qclass: int
    rd: bool = True
    edns: int | None = None


def _edns_size(query: bytes, off: int, records: int) -> int | None:
    """The UDP size of an OPT record among `records` records from `off`; None without one.
    Raises on a malformed record."""
    for _ in range(records):
        off = _skip_name(query, off)
        rtype, rclass, _, size = _RR.unpack_from(query, off)
        off += _RR.size + size
        if off > len(query):
            raise ValueError("record past the end")
        if rtype == _TYPE_OPT:
            return int(rclass)
    return None


def question(query: bytes) -> Question | None:
    """The question of a standard query with exactly one, uncompressed and in plain letters,
    digits, `-` and `_`; None for anything else. Other records are read only for an OPT
    (EDNS); none of them is ever forwarded."""
    if len(query) < 12:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(query)
    if flags & (_QR | _OPCODE) or qdcount != 1:
        return None
    labels = []
    off = 12
    while True:
        if off >= len(query):
            return None
        n = query[off]
        if n == 0:
            break
        if n > 63 or off + 1 + n > len(query):  # a compression pointer or a cut label
            return None
        label = query[off + 1 : off + 1 + n]
        if not _LABEL_BYTES.issuperset(label):
            return None
        labels.append(label.decode("ascii").lower())
        off += 1 + n
    end = off + 1 + 4  # the root label, QTYPE, QCLASS
    if end > len(query):
        return None
    qtype, qclass = struct.unpack_from("!HH", query, off + 1)
    try:
        edns = _edns_size(query, end, ancount + nscount + arcount)
    except (IndexError, ValueError, struct.error):
        return None
    return Question(".".join(labels), query[12:end], qtype, qclass, bool(flags & _RD), edns)


def upstream_query(q: Question, qid: int) -> bytes:
    """The query the node sends for `q`: built from the parsed question alone (the name in
    lower case, so its letters' case carries nothing), with the node's own ID and EDNS; nothing
    else the task sent goes upstream."""
    name = b"".join(
        bytes([len(label)]) + label.encode("ascii") for label in q.name.split(".") if label
    )
    wire = _HEADER.pack(qid, _RD if q.rd else 0, 1, 0, 0, 0 if q.edns is None else 1)
    wire += name + b"\0" + struct.pack("!HH", q.qtype, q.qclass)
    if q.edns is not None:
        size = max(_EDNS_MIN, min(q.edns, _EDNS_MAX))
        wire += b"\0" + _RR.pack(_TYPE_OPT, size, 0, 0)
    return wire


def for_task(reply: bytes, task_query: bytes, q: Question) -> bytes:
    """The upstream's `reply` to `upstream_query(q, ...)` as an answer to the task's query: the
    task's ID, and its question bytes where the reply repeats the question."""
    head = task_query[:2] + reply[2:12]
    if _HEADER.unpack_from(reply)[2] == 1:
        return head + q.wire + reply[12 + len(q.wire) :]
    return head + reply[12:]


def _skip_name(wire: bytes, off: int) -> int:
    while True:
        n = wire[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        if n & 0xC0:
            raise ValueError("reserved label type")
        off += 1 + n


def truncated(reply: bytes) -> bool:
    """Whether the TC bit is set."""
    return len(reply) >= 4 and bool(reply[2] << 8 & _TC)


def answer_addresses(
    reply: bytes, query: bytes, q: Question
) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] | None:
    """(address, TTL) of each A/AAAA record in the answer section of `reply`, or None when
    `reply` is not an answer to `query` (same ID and opcode, QR set, the same question in any
    case) or is malformed. A truncated reply yields the records before the cut."""
    try:
        rid, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(reply)
    except struct.error:
        return None
    qid, qflags = struct.unpack_from("!HH", query)
    if rid != qid or not flags & _QR or flags & _OPCODE != qflags & _OPCODE:
        return None
    if qdcount == 0 and flags & _RCODE:  # an error (e.g. FORMERR) need not repeat the question
        return []
    off = 12 + len(q.wire)
    if qdcount != 1 or reply[12:off].lower() != q.wire.lower():
        return None
    out: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    try:
        for _ in range(ancount):
            off = _skip_name(reply, off)
            rtype, rclass, ttl, size = _RR.unpack_from(reply, off)
            off += _RR.size
            data = reply[off : off + size]
            off += size
            if off > len(reply):
                raise ValueError("record past the end")
            ttl = ttl if ttl < 1 << 31 else 0  # RFC 2181 §8
            if rclass == _CLASS_IN and rtype == _TYPE_A and size == 4:
                out.append((ipaddress.IPv4Address(data), ttl))
            elif rclass == _CLASS_IN and rtype == _TYPE_AAAA and size == 16:
                out.append((ipaddress.IPv6Address(data), ttl))
    except (IndexError, ValueError, struct.error):
        if not flags & _TC:
            return None
    return out


def error_reply(query: bytes, rcode: int) -> bytes:
    """A bare answer with `rcode` (no sections: allowed for errors) to a query too broken for a
    proper one; empty if it has no header."""
    if len(query) < 12:
        return b""
    qid, qflags = struct.unpack_from("!HH", query)
    return _HEADER.pack(qid, _QR | qflags & _OPCODE | rcode, 0, 0, 0, 0)
