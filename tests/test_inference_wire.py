"""What the official SDKs read off the proxy's wire beyond the answer itself: where a stream
ends, the provider's request id, Anthropic's token count and overload, answers slower than a
stream's first-byte wait, and the Responses API's incomplete answers."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from agentnode.inference.mock import Fault, Turn, count_tokens
from support.proxy_env import ProxyEnv

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CLAUDE_MSG: list[MessageParam] = [{"role": "user", "content": "hi"}]

# Texts that hold each stream kind's end marker as words: a stream ends at an event's name,
# never at what a model wrote (about SSE, say, or as a tool's input).
MARKERS = [
    "In SSE the last frame is event: message_stop then the socket closes",
    "the last frame is event: response.completed ok",
    'x\nevent: message_stop\ndata: {"type":"message_stop"}\n\ny',
    "event: response.incomplete and event: response.failed, data: [DONE]",
]


@pytest.fixture
def env(make_env: Callable[..., ProxyEnv]) -> ProxyEnv:
    return make_env()


@pytest.mark.parametrize("text", MARKERS)
def test_an_anthropic_stream_ends_at_its_last_event_not_at_words(env: ProxyEnv, text: str) -> None:
    env.mocks["c"].script.append(Turn(text=text))
    with env.anthropic().messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as s:
        assert "".join(s.text_stream) == text
        final = s.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 250
    [row] = env.rows()
    assert (row.status, row.output) == (200, 250)


@pytest.mark.parametrize("text", MARKERS)
def test_a_responses_stream_ends_at_its_last_event_not_at_words(env: ProxyEnv, text: str) -> None:
    env.mocks["a"].script.append(Turn(text=text))
    with env.openai().responses.stream(model="gpt-x", input="hi") as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
    assert final.output_text == text and final.usage is not None
    [row] = env.rows()
    assert (row.status, row.input, row.output) == (200, 1000, 300)


def test_tool_input_holding_an_end_marker_streams_whole(env: ProxyEnv) -> None:
    """A tool's JSON input is a delta like any text: here it spells the stream's last event."""
    from agentnode.inference.mock import ToolCall

    args = {"code": "print('event: message_stop')", "note": "event: response.completed"}
    env.mocks["c"].script.append(Turn(tool_calls=(ToolCall("run_code", args),)))
    with env.anthropic().messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == args


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_incomplete_response_is_billed(env: ProxyEnv, stream: bool) -> None:
    """An answer cut at max_output_tokens ends `response.incomplete`, with its usage."""
    client = env.openai()
    if stream:
        with client.responses.stream(model="gpt-x", input="hi", max_output_tokens=16) as s:
            kinds = [e.type for e in s]
        assert kinds[-1] == "response.incomplete"
    else:
        r = client.responses.create(model="gpt-x", input="hi", max_output_tokens=16)
        assert r.status == "incomplete"
    [row] = env.rows()
    assert (row.status, row.input, row.output) == (200, 1000, 300)
    assert Decimal(row.cost) > 0


def test_answers_carry_the_providers_request_id(env: ProxyEnv) -> None:
    oa = env.openai()
    raw = oa.chat.completions.with_raw_response.create(model="gpt-x", messages=MSG)
    assert raw.headers["x-request-id"].startswith("req_mock_")
    assert raw.parse()._request_id == raw.headers["x-request-id"]
    with oa.chat.completions.with_streaming_response.create(
        model="gpt-x", messages=MSG, stream=True
    ) as r:
        assert r.headers["x-request-id"].startswith("req_mock_")
    claude = env.anthropic()
    message = claude.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    assert message._request_id is not None and message._request_id.startswith("req_mock_")
    with claude.messages.stream(model="claude-x", max_tokens=8, messages=CLAUDE_MSG) as s:
        assert s.request_id is not None and s.request_id.startswith("req_mock_")
    # A provider's own refusal, passed through, keeps its id too.
    env.mocks["c"].faults.append(Fault(status=400))
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    assert e.value.request_id is not None and e.value.request_id.startswith("req_mock_")
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_anthropic_counts_tokens_through_the_proxy_free(make_env: Callable[..., ProxyEnv]) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["tenants"]["acme"] |= {"budget": 0.000001, "rpm": 1}

    env = make_env(cfg)
    client = env.anthropic()
    system = "be brief"
    want = count_tokens([system, CLAUDE_MSG])
    # A tenant at its budget and over its rate limit still counts tokens: counting is free.
    client.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    for model in ["claude-x", "smart-claude", "claude-y"]:
        n = client.messages.count_tokens(model=model, system=system, messages=CLAUDE_MSG)
        assert n.input_tokens == want, model
    beta = client.beta.messages.count_tokens(
        model="claude-x", messages=[{"role": "user", "content": "hi"}]
    )
    assert beta.input_tokens == count_tokens([CLAUDE_MSG])
    sent = env.mocks["c"].requests[-1]
    assert sent["path"] == "/v1/messages/count_tokens" and sent["json"]["model"] == "claude-x"
    # The route's model is what reaches the deployment.
    assert env.mocks["c"].requests[2]["json"]["model"] == "claude-x"
    with pytest.raises(anthropic.NotFoundError, match="'gpt-x' is not served here"):
        client.messages.count_tokens(model="gpt-x", messages=CLAUDE_MSG)
    with pytest.raises(anthropic.BadRequestError, match="'messages' is required"):
        client.post("/v1/messages/count_tokens", body={"model": "claude-x"}, cast_to=object)
    for bad, problem in (
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"messages": CLAUDE_MSG, "stream": True}, "'stream' is not a field of count_tokens"),
        ({"messages": CLAUDE_MSG, "model": 5}, "'model' is required"),
    ):
        with pytest.raises(anthropic.BadRequestError, match=problem):
            client.post("/v1/messages/count_tokens", body={"model": "claude-x", **bad},
                        cast_to=object)  # fmt: skip
    with pytest.raises(anthropic.PaymentRequiredError):
        client.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    rows = env.rows()
    counted = [r for r in rows if r.endpoint == "count_tokens"]
    assert len(counted) == 4 and all(Decimal(r.cost) == 0 for r in counted)
    unknown = anthropic.Anthropic(base_url=env.url, api_key="sk-nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        unknown.messages.count_tokens(model="claude-x", messages=CLAUDE_MSG)
    unknown.close()


def test_a_whole_answer_may_take_longer_than_a_streams_first_byte(
    make_env: Callable[..., ProxyEnv],
) -> None:
    """A reasoning model's whole answer sends nothing for minutes: only `timeout` bounds it,
    and it is generated once, not once per retry."""

    def cfg(c: dict[str, Any]) -> None:
        for d in ("gpt-a", "claude-a"):
            c["deployments"][d] |= {"first_byte_timeout": 0.5, "timeout": 5.0, "retries": 2}

    env = make_env(cfg)
    env.mocks["a"].faults.append(Fault(hang=1.2))
    r = env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert r.choices[0].message.content == "Hello"
    env.mocks["c"].faults.append(Fault(hang=1.2))
    m = env.anthropic().messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    assert m.content[0].type == "text"
    assert len(env.mocks["a"].requests) == 1 and len(env.mocks["c"].requests) == 1
    # A stream's wait for its first event is still first_byte_timeout: then another try.
    env.mocks["a"].faults.append(Fault(hang=1.2))
    chunks = list(env.openai().chat.completions.create(model="gpt-x", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "t1t2t3"
    assert len(env.mocks["a"].requests) == 3


def test_a_whole_answer_past_its_timeout_is_a_504_naming_it(
    make_env: Callable[..., ProxyEnv],
) -> None:
    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"] |= {"first_byte_timeout": 5.0, "timeout": 0.5}

    env = make_env(cfg)
    env.mocks["a"].faults.append(Fault(hang=2.0))
    with pytest.raises(openai.APIStatusError, match=r"gpt-a: timed out after 0.5 s") as e:
        env.openai().chat.completions.create(model="gpt-x", messages=MSG)
    assert e.value.status_code == 504


def test_an_anthropic_overload_reaches_the_client_as_one(env: ProxyEnv) -> None:
    env.mocks["c"].faults.append(Fault(status=529, retry_after=2))
    with pytest.raises(anthropic.OverloadedError, match="HTTP 529") as e:
        env.anthropic().messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    assert e.value.status_code == 529 and e.value.response.headers["retry-after"] == "2"
    assert e.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_the_mock_speaks_each_endpoints_own_stream_and_encoding(env: ProxyEnv) -> None:
    client = env.openai()
    chunks = list(client.completions.create(model="gpt-x", prompt="hi", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "t0t1t2t3"
    assert {c.object for c in chunks} == {"text_completion"}
    r = httpx.post(
        env.url + "/v1/embeddings",
        json={"model": "gpt-x", "input": "hi", "encoding_format": "base64"},
        headers={"Authorization": "Bearer sk-acme"},
    )
    packed = base64.b64decode(r.json()["data"][0]["embedding"])
    assert struct.unpack("<3f", packed) == pytest.approx([0.1, 0.2, 0.3])


def test_the_sdks_do_not_retry_what_the_proxy_retried_already(
    make_env: Callable[..., ProxyEnv],
) -> None:
    """After the proxy's own retries and fallbacks end in a 502 or 504 the SDKs do not try
    again (each would multiply the upstream's calls by its own 3); a 429 or 503 with a
    Retry-After is still theirs to retry."""

    def cfg(c: dict[str, Any]) -> None:
        c["deployments"]["gpt-a"]["retries"] = 1
        c["breaker_failures"] = 100

    env = make_env(cfg)
    sdk = openai.OpenAI(base_url=env.url + "/v1", api_key="sk-acme", max_retries=2)
    env.mocks["a"].faults.extend([Fault(status=500)] * 2)
    with pytest.raises(openai.InternalServerError) as e:
        sdk.chat.completions.create(model="gpt-x", messages=MSG)
    assert e.value.response.headers["x-should-retry"] == "false"
    assert len(env.mocks["a"].requests) == 2, "the proxy's 2 tries, none of the SDK's"
    claude = anthropic.Anthropic(base_url=env.url, api_key="sk-acme", max_retries=2)
    env.mocks["c"].faults.extend([Fault(status=502)] * 3)
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(model="claude-x", max_tokens=8, messages=CLAUDE_MSG)
    assert len(env.mocks["c"].requests) == 1
    # A 503 asking for a second's wait: the SDK waits it and tries again, and gets through.
    env.mocks["b"].faults.append(Fault(status=503, retry_after=1))
    r = sdk.chat.completions.create(model="gpt-y", messages=MSG)
    assert r.choices[0].message.content == "Hello" and len(env.mocks["b"].requests) == 2
    sdk.close()
    claude.close()
