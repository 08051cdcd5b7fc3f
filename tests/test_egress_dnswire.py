"""The forwarder's DNS wire reader against dnspython, which builds every message here."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset

from agentnode.egress import dnswire


def query(name: str = "Api.Example.COM", rdtype: str = "A", edns: int | None = None) -> bytes:
    return dns.message.make_query(name, rdtype, use_edns=edns).to_wire()


def answer(q: bytes, *records: tuple[str, str, list[str]], ttl: int = 300) -> bytes:
    r = dns.message.make_response(dns.message.from_wire(q))
    for owner, rdtype, values in records:
        r.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", rdtype, values))
    return r.to_wire()


def test_question_reads_the_name_of_a_standard_query() -> None:
    q = dnswire.question(query())
    assert q is not None and q.name == "api.example.com"
    assert q.wire == query()[12 : 12 + len(q.wire)] and q.wire.endswith(b"\0\0\x01\0\x01")


def test_question_turns_down_what_is_not_a_plain_query() -> None:
    wire = query()
    response = answer(wire)
    notify = dns.message.make_query("a.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    two = dns.message.make_query("a.test", "A")
    two.question.append(dns.message.make_query("b.test", "A").question[0])
    # One label "evil.allowed" under "test": not the name "evil.allowed.test".
    dotted = wire[:12] + b"\x0cevil.allowed\x04test\x00\x00\x01\x00\x01"
    pointer = wire[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    for bad in (b"", wire[:11], wire[:20], response, notify.to_wire(), two.to_wire(), dotted,
                pointer):  # fmt: skip
        assert dnswire.question(bad) is None, bad


def test_answer_addresses_match_dnspython() -> None:
    q = query(edns=0)  # the answer's OPT record follows the answer section
    qq = dnswire.question(q)
    assert qq is not None
    reply = answer(
        q,
        ("api.example.com.", "CNAME", ["edge.example.net."]),
        ("edge.example.net.", "A", ["192.0.2.1", "192.0.2.2"]),
        ("edge.example.net.", "AAAA", ["2001:db8::1"]),
        ttl=42,
    )
    got = dnswire.answer_addresses(reply, q, qq)
    want = [
        (ipaddress.ip_address(rd.address), rrset.ttl)
        for rrset in dns.message.from_wire(reply).answer
        if rrset.rdtype in (1, 28)
        for rd in rrset
    ]
    assert got == want and len(got) == 3 and got[0][1] == 42


def test_answer_addresses_turn_down_other_answers() -> None:
    q = query()
    qq = dnswire.question(q)
    assert qq is not None
    reply = answer(q, ("api.example.com.", "A", ["192.0.2.1"]))
    other_id = bytes([reply[0] ^ 1]) + reply[1:]
    other_q = answer(query("other.example.com"), ("other.example.com.", "A", ["192.0.2.9"]))
    other_q = reply[:2] + other_q[2:]
    assert dnswire.answer_addresses(other_id, q, qq) is None
    assert dnswire.answer_addresses(other_q, q, qq) is None
    assert dnswire.answer_addresses(q, q, qq) is None  # QR unset: the query echoed back
    assert dnswire.answer_addresses(reply[:-3], q, qq) is None  # cut, and TC unset
    # Upstream may change the case of the question (0x20 randomisation).
    upper = answer(query("API.EXAMPLE.COM"), ("API.EXAMPLE.COM.", "A", ["192.0.2.1"]))
    assert dnswire.answer_addresses(reply[:2] + upper[2:], q, qq) == [
        (ipaddress.ip_address("192.0.2.1"), 300)
    ]


def test_truncated_and_error_answers() -> None:
    q = query()
    qq = dnswire.question(q)
    assert qq is not None
    msg = dns.message.from_wire(
        answer(q, ("api.example.com.", "A", ["192.0.2.1"]), ("b.example.com.", "A", ["192.0.2.2"]))
    )
    msg.flags |= dns.flags.TC
    cut = msg.to_wire()[:-3]  # the second record is cut short
    assert dnswire.truncated(cut) and not dnswire.truncated(q)
    assert dnswire.answer_addresses(cut, q, qq) == [(ipaddress.ip_address("192.0.2.1"), 300)]
    formerr = dnswire.error_reply(q, dns.rcode.FORMERR)
    assert dnswire.answer_addresses(formerr, q, qq) == []
    parsed = dns.message.from_wire(dnswire.error_reply(q, dns.rcode.SERVFAIL))
    assert parsed.id == dns.message.from_wire(q).id
    assert parsed.rcode() == dns.rcode.SERVFAIL and parsed.flags & dns.flags.QR
    assert dnswire.error_reply(b"short", dns.rcode.SERVFAIL) == b""


def test_upstream_query_is_built_from_the_question_alone() -> None:
    msg = dns.message.make_query("Api.Example.COM", "AAAA", use_edns=0, payload=65000)
    msg.additional.append(dns.rrset.from_text("x.evil.", 1, "IN", "A", "192.0.2.1"))
    task = msg.to_wire()
    q = dnswire.question(task)
    assert q is not None and q.edns == 65000 and q.qtype == 28 and q.rd
    up = dns.message.from_wire(dnswire.upstream_query(q, 4242))
    assert up.id == 4242 and up.question[0].name.to_text() == "api.example.com."
    assert not up.additional and up.edns == 0 and up.payload == 1232 and not up.options
    assert dns.message.from_wire(dnswire.upstream_query(q._replace(edns=None), 1)).edns == -1
    reply = dns.message.make_response(up)
    reply.answer.append(dns.rrset.from_text("api.example.com.", 60, "IN", "AAAA", "2001:db8::1"))
    back = dns.message.from_wire(dnswire.for_task(reply.to_wire(), task, q))
    assert back.id == msg.id and back.question[0].name.to_text() == "Api.Example.COM."
    assert [rd.address for rd in back.answer[0]] == ["2001:db8::1"]


def test_queries_with_broken_records_after_the_question_are_turned_down() -> None:
    wire = query(edns=0)
    assert dnswire.question(wire[:-3]) is None  # the OPT record cut short
