"""AgentnodeCheckpointer: LangGraph's own conformance suite, and a real graph resuming from it,
over the memory API on loopback."""

from __future__ import annotations

import asyncio
import operator
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.graph import END, START, StateGraph

from agentnode.integrations import langgraph
from agentnode.integrations.langgraph import WRITES_WAIT_S, AgentnodeCheckpointer
from agentnode.sdk import Memory

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("door", ["http", "socket"])
def test_passes_langgraph_checkpoint_conformance(memory_doors, door: str) -> None:  # type: ignore[no-untyped-def]
    """Over either door to the node's memory: the HTTP API and the memory socket."""
    url, sock, tokens = memory_doors

    @checkpointer_test(name="AgentnodeCheckpointer")
    async def saver() -> AsyncGenerator[AgentnodeCheckpointer, None]:
        # A fresh task label per capability suite: each starts from an empty store.
        with Memory(url, tokens["a"], socket=str(sock.path) if door == "socket" else None) as mem:
            assert mem.over_socket == (door == "socket")
            yield AgentnodeCheckpointer(mem, task=f"conf-{uuid.uuid4().hex[:8]}")

    report = asyncio.run(validate(saver))
    failures = {
        cap: result.failures
        for cap, result in report.results.items()
        if result.detected and result.passed is not True
    }
    assert report.passed_all_base() and not failures, failures
    assert {"put", "put_writes", "get_tuple", "list", "delete_thread"} <= {
        cap for cap, result in report.results.items() if result.passed
    }


class State(TypedDict):
    steps: Annotated[list[str], operator.add]


def test_a_graph_resumes_after_its_last_completed_step(memory_server) -> None:  # type: ignore[no-untyped-def]
    """A graph whose second node fails: run again on the same thread with input None, it
    starts at that node; the first node never runs twice. Another tenant sees nothing."""
    url, tokens = memory_server
    runs: list[str] = []
    fail = [True]

    def step(name: str):  # type: ignore[no-untyped-def]
        def node(state: State) -> State:
            runs.append(name)
            if name == "b" and fail[0]:
                raise RuntimeError("killed mid-graph")
            return {"steps": [name]}

        return node

    builder = StateGraph(State)
    for name in ("a", "b", "c"):
        builder.add_node(name, step(name))
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", "c")
    builder.add_edge("c", END)
    config: RunnableConfig = {"configurable": {"thread_id": "t-1"}}
    with Memory(url, tokens["a"]) as mem:
        graph = builder.compile(checkpointer=AgentnodeCheckpointer(mem, task="run-1"))
        with pytest.raises(RuntimeError, match="killed mid-graph"):
            graph.invoke({"steps": []}, config)
        assert runs == ["a", "b"]
    fail[0] = False
    with Memory(url, tokens["a"]) as mem:  # a new process would open a new connection
        saver = AgentnodeCheckpointer(mem, task="run-1")
        assert saver.get_tuple(config) is not None
        graph = builder.compile(checkpointer=saver)
        assert graph.invoke(None, config) == {"steps": ["a", "b", "c"]}
        assert runs == ["a", "b", "b", "c"]
        history = list(saver.list(config))
        assert [h.metadata["step"] for h in history] == sorted(
            (h.metadata["step"] for h in history), reverse=True
        )
    with Memory(url, tokens["b"]) as other:
        assert AgentnodeCheckpointer(other, task="run-1").get_tuple(config) is None


def chain(names: tuple[str, ...]) -> StateGraph[State]:
    """A graph whose nodes `names` run one after the other, each adding its name to `steps`."""
    builder = StateGraph(State)
    for name in names:
        builder.add_node(name, lambda state, name=name: {"steps": [name]})
    for before, after in zip((START, *names), (*names, END), strict=True):
        builder.add_edge(before, after)
    return builder


def counted_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods of the requests `Memory` makes from now on, in order."""
    requests: list[str] = []
    real = Memory._call

    def counted(self: Memory, method: str, path: str, body: object = None) -> object:
        requests.append(method)
        return real(self, method, path, body)

    monkeypatch.setattr(Memory, "_call", counted)
    return requests


def test_a_new_thread_costs_one_read(memory_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Per super-step the saver writes once (the task's pending writes go with the checkpoint
    that ends the super-step; the input checkpoint with the first super-step's) and reads
    nothing: what it wrote or found absent it remembers. The one read is the thread's
    newest-checkpoint pointer."""
    monkeypatch.setattr(langgraph, "INPUT_WAIT_S", 30.0)  # a loaded host's slow first step
    # and its slow hand-off from a task's writes to the checkpoint after it (seen at load 10+)
    monkeypatch.setattr(langgraph, "WRITES_WAIT_S", 2.0)
    url, tokens = memory_server
    builder = chain(("a", "b", "c"))
    requests = counted_requests(monkeypatch)
    with Memory(url, tokens["a"]) as mem:
        saver = AgentnodeCheckpointer(mem, task="reads")
        graph = builder.compile(checkpointer=saver)
        config: RunnableConfig = {"configurable": {"thread_id": "t-reads"}}
        assert graph.invoke({"steps": []}, config, durability="sync") == {
            "steps": ["a", "b", "c"]}  # fmt: skip
        writes = requests.count("POST")
        assert requests.count("GET") == 1, requests
        fresh = AgentnodeCheckpointer(mem, task="reads").get_tuple(config)
        assert fresh is not None and fresh.checkpoint["channel_values"]["steps"] == ["a", "b", "c"]
        history = list(saver.list(config))
        # The input, its super-step, a, b, c: the input checkpoint went with the next write.
        # LangGraph hands a task's writes and the checkpoint after it to its executor's
        # threads, which may run them in either order; then the writes wait for the next
        # checkpoint and the last super-step's are stored alone: one write more, never two.
        assert len(history) == 5, history
        assert writes in (4, 5), requests
        # Every super-step's tasks' writes were stored (with the checkpoint after it).
        assert [bool(h.pending_writes) for h in history] == [False, True, True, True, True]


def test_a_thread_is_read_in_three_round_trips_over_the_socket(memory_doors) -> None:  # type: ignore[no-untyped-def]
    """A saver that has not seen a thread (another attempt of the task) reads its newest
    checkpoint in three round trips over the memory socket, whatever its number of channels:
    the pointer, the checkpoint with its writes, and every channel value at once."""
    url, door, tokens = memory_doors
    builder = StateGraph(Wide)
    for name in ("a", "b"):
        builder.add_node(name, lambda state, name=name: {c: [name] for c in Wide.__annotations__})
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    config: RunnableConfig = {"configurable": {"thread_id": "t-wide"}}
    with Memory(url, tokens["a"], socket=str(door.path)) as mem:
        builder.compile(checkpointer=AgentnodeCheckpointer(mem, task="wide")).invoke(
            Wide(s0=[], s1=[], s2=[], s3=[], s4=[]), config, durability="sync"
        )
        exchanges: list[int] = []
        client = mem._socket
        assert client is not None
        real = client._exchange

        def counted(calls: Any, **options: Any) -> Any:
            exchanges.append(len(calls))
            return real(calls, **options)

        client._exchange = counted  # type: ignore[method-assign]
        found = AgentnodeCheckpointer(mem, task="wide").get_tuple(config)
    assert found is not None and found.checkpoint["channel_values"]["s4"] == ["a", "b"]
    channels = len(found.checkpoint["channel_versions"])
    assert channels > 5 and exchanges == [1, 2, channels], "pointer; checkpoint, writes; values"


class Wide(TypedDict):
    s0: Annotated[list[str], operator.add]
    s1: Annotated[list[str], operator.add]
    s2: Annotated[list[str], operator.add]
    s3: Annotated[list[str], operator.add]
    s4: Annotated[list[str], operator.add]


def test_the_next_run_on_a_thread_it_wrote_reads_only_what_changes(  # type: ignore[no-untyped-def]
    memory_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver keeps the newest checkpoint it wrote of a thread whole: a second run on the
    thread reads only the thread's pointer and that checkpoint's pending writes (what another
    saver may have changed), and what it finds is what a saver reading the store finds."""
    url, tokens = memory_server
    builder = chain(("a", "b"))
    requests = counted_requests(monkeypatch)
    config: RunnableConfig = {"configurable": {"thread_id": "t-again"}}
    with Memory(url, tokens["a"]) as mem:
        saver = AgentnodeCheckpointer(mem, task="again")
        graph = builder.compile(checkpointer=saver)
        graph.invoke({"steps": ["x"]}, config, durability="sync")
        requests.clear()
        assert graph.invoke({"steps": ["y"]}, config, durability="sync") == {
            "steps": ["x", "a", "b", "y", "a", "b"]}  # fmt: skip
        assert requests.count("GET") == 2, requests  # one round trip over the socket
        kept = saver.get_tuple(config)
        read = AgentnodeCheckpointer(mem, task="again").get_tuple(config)
    assert kept is not None and read is not None
    assert (kept.checkpoint, kept.metadata, kept.parent_config, kept.pending_writes) == (
        read.checkpoint, read.metadata, read.parent_config, read.pending_writes)  # fmt: skip


def test_writes_no_checkpoint_follows_wait_once_then_go_at_once(memory_server) -> None:  # type: ignore[no-untyped-def]
    """Pending writes that no checkpoint comes to carry (a slow sibling task, or a graph whose
    checkpoints wait for them) are stored by `put_writes` itself after `WRITES_WAIT_S`, once;
    the thread's next writes are stored at once, and are there to read."""
    url, tokens = memory_server
    with Memory(url, tokens["a"]) as mem:
        saver = AgentnodeCheckpointer(mem, task="lonely")
        config: RunnableConfig = {"configurable": {"thread_id": "t-lonely", "checkpoint_ns": ""}}
        checkpoint = empty_checkpoint()
        stored = saver.put(config, checkpoint, {"source": "input", "step": -1}, {})
        waits: list[float | None] = []
        real = saver._stored.wait

        def counted(timeout: float | None = None) -> bool:
            waits.append(timeout)
            return real(timeout)

        saver._stored.wait = counted  # type: ignore[method-assign]
        saver.put_writes(stored, [("steps", ["a"])], "task-1")
        assert waits and sum(w or 0 for w in waits) <= WRITES_WAIT_S + 1e-9
        waits.clear()
        for i in range(3):
            saver.put_writes(stored, [("steps", [str(i)])], f"task-{i + 2}")
        assert waits == []
        found = AgentnodeCheckpointer(mem, task="lonely").get_tuple(config)
        assert found is not None
        assert sorted(w[0] for w in found.pending_writes or ()) == [
            "task-1", "task-2", "task-3", "task-4"]  # fmt: skip


def test_the_input_checkpoint_is_stored_without_a_next_write(
    memory_server: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input checkpoint that no write follows (a run stopped before its first task) is
    stored by the flusher within `INPUT_WAIT_S`, and at once before this saver reads; the
    flusher thread ends once idle."""
    monkeypatch.setattr(langgraph, "_FLUSHER_IDLE_S", 0.05)
    url, tokens = memory_server
    with Memory(url, tokens["a"]) as mem, Memory(url, tokens["a"]) as other:
        saver = AgentnodeCheckpointer(mem, task="held")
        for n, read in enumerate((False, True)):
            thread = {"thread_id": f"t-held-{n}", "checkpoint_ns": ""}
            config: RunnableConfig = {"configurable": thread}
            stored = saver.put(config, empty_checkpoint(), {"source": "input", "step": -1}, {})
            if read:  # this saver's own read writes it first
                found = saver.get_tuple(config)
            else:  # another process sees it once the flusher wrote it
                deadline = time.monotonic() + 5
                # A fresh saver each time: a saver remembers what it found absent.
                while (
                    found := AgentnodeCheckpointer(other, task="held").get_tuple(config)
                ) is None:
                    assert time.monotonic() < deadline, "the input checkpoint was never written"
                    time.sleep(langgraph.INPUT_WAIT_S)
            assert found is not None and found.config == stored
        flusher = saver._flusher
        assert flusher is not None
        flusher.join(timeout=5)
        assert not flusher.is_alive() and saver._flusher is None


def test_remembers_a_bounded_number_of_threads(
    memory_server: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saver that runs many threads keeps a bounded memory of their pointers and writes; a
    thread it forgot is read again, not mistaken for a new one."""
    monkeypatch.setattr(langgraph, "_POINTERS_KEPT", 3)
    url, tokens = memory_server
    builder = StateGraph(State)
    builder.add_node("a", lambda state: {"steps": ["a"]})
    builder.add_edge(START, "a")
    builder.add_edge("a", END)
    with Memory(url, tokens["a"]) as mem:
        saver = AgentnodeCheckpointer(mem, task="many")
        graph = builder.compile(checkpointer=saver)
        for i in range(8):
            graph.invoke({"steps": []}, {"configurable": {"thread_id": f"t-many-{i}"}})
            assert len(saver._pointers) <= 3 and len(saver._writes) <= langgraph._WRITES_KEPT
        again: RunnableConfig = {"configurable": {"thread_id": "t-many-0"}}
        assert graph.invoke({"steps": []}, again) == {"steps": ["a", "a"]}
        history = list(saver.list(again))
        assert history[0].checkpoint["channel_values"]["steps"] == ["a", "a"]


@pytest.mark.parametrize("doors", [("socket", "socket"), ("http", "socket"), ("socket", "http")])
def test_savers_of_one_task_in_one_process_see_each_others_writes(memory_doors, doors) -> None:  # type: ignore[no-untyped-def]
    """What a saver remembers of a thread (its pointer found absent, the newest checkpoint it
    wrote) does not hide another saver's later writes to that thread, in the same process,
    whichever door each uses: each finds the newest checkpoint either stored and continues
    from it."""
    url, door, tokens = memory_doors

    def memory(kind: str) -> Memory:
        return Memory(url, tokens["a"], socket=str(door.path) if kind == "socket" else None)

    builder = chain(("a", "b"))
    config: RunnableConfig = {"configurable": {"thread_id": "t-shared"}}
    with memory(doors[0]) as one, memory(doors[1]) as two:
        first = AgentnodeCheckpointer(one, task="shared")
        second = AgentnodeCheckpointer(two, task="shared")
        assert second.get_tuple(config) is None  # remembered as absent
        builder.compile(checkpointer=first).invoke({"steps": ["x"]}, config, durability="sync")
        found = second.get_tuple(config)
        assert found is not None and found.checkpoint["channel_values"]["steps"] == ["x", "a", "b"]
        # The second continues the thread; the first (which kept its own newest) sees that,
        # and a third run, the first's again, goes on from there.
        assert builder.compile(checkpointer=second).invoke(
            {"steps": ["y"]}, config, durability="sync") == {
            "steps": ["x", "a", "b", "y", "a", "b"]}  # fmt: skip
        newest, theirs = first.get_tuple(config), second.get_tuple(config)
        assert newest is not None and theirs is not None
        assert newest.checkpoint["id"] == theirs.checkpoint["id"]
        assert builder.compile(checkpointer=first).invoke(None, config) == {
            "steps": ["x", "a", "b", "y", "a", "b"]}  # fmt: skip
        assert len(list(first.list(config))) == len(list(second.list(config))) == 8
        # Another task's saver shares nothing with them.
        assert AgentnodeCheckpointer(one, task="other").get_tuple(config) is None


_OTHER_PROCESS = """
import sys
from langgraph.graph import END, START, StateGraph
sys.path.insert(0, sys.argv[4])
from test_langgraph_checkpointer import chain
from agentnode.integrations.langgraph import AgentnodeCheckpointer
from agentnode.sdk import Memory
with Memory(sys.argv[1], sys.argv[2], socket=sys.argv[3] or None) as mem:
    graph = chain(("a", "b")).compile(checkpointer=AgentnodeCheckpointer(mem, task="shared"))
    print(graph.invoke({"steps": ["z"]}, {"configurable": {"thread_id": "t-procs"}})["steps"])
"""


@pytest.mark.parametrize("door", ["socket", "http"])
def test_a_thread_another_process_of_the_task_ran_is_continued_from_its_newest(  # type: ignore[no-untyped-def]
    memory_doors, door: str
) -> None:
    """A saver that ran a thread, then another process (another worker of the same task)
    ran it: the saver's next run continues from that process's checkpoint, not its own."""
    url, sock, tokens = memory_doors
    path = str(sock.path) if door == "socket" else ""
    builder = chain(("a", "b"))
    config: RunnableConfig = {"configurable": {"thread_id": "t-procs"}}
    with Memory(url, tokens["a"], socket=path or None) as mem:
        saver = AgentnodeCheckpointer(mem, task="shared")
        graph = builder.compile(checkpointer=saver)
        assert graph.invoke({"steps": ["x"]}, config)["steps"] == ["x", "a", "b"]
        other = subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, url, tokens["a"], path, str(HERE)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert other.stdout.split() == ["['x',", "'a',", "'b',", "'z',", "'a',", "'b']"]
        assert graph.invoke({"steps": ["y"]}, config)["steps"] == [
            "x", "a", "b", "z", "a", "b", "y", "a", "b"]  # fmt: skip
        assert len(list(saver.list(config))) == 12


def test_pending_writes_another_saver_stored_are_read_at_the_next_run(memory_server) -> None:  # type: ignore[no-untyped-def]
    """The newest checkpoint is unchanged but its pending writes are not: a failed step's
    error written by another saver is what this one finds (and what its resume sees)."""
    url, tokens = memory_server
    failures = iter(["first failure", "second failure"])

    def flaky(state: State) -> State:
        raise RuntimeError(next(failures))

    builder = StateGraph(State)
    builder.add_node("a", lambda state: {"steps": ["a"]})
    builder.add_node("b", flaky)
    builder.add_edge(START, "a")
    builder.add_edge("a", "b")
    builder.add_edge("b", END)
    config: RunnableConfig = {"configurable": {"thread_id": "t-writes"}}
    with Memory(url, tokens["a"]) as one, Memory(url, tokens["a"]) as two:
        first = AgentnodeCheckpointer(one, task="writes")
        second = AgentnodeCheckpointer(two, task="writes")
        with pytest.raises(RuntimeError, match="first failure"):
            builder.compile(checkpointer=first).invoke({"steps": []}, config)
        with pytest.raises(RuntimeError, match="second failure"):
            builder.compile(checkpointer=second).invoke(None, config)
        mine, theirs = first.get_tuple(config), second.get_tuple(config)
    assert mine is not None and theirs is not None
    assert mine.checkpoint["id"] == theirs.checkpoint["id"]
    assert mine.pending_writes == theirs.pending_writes
    assert "second failure" in repr(mine.pending_writes)
