"""Python agents started from a pre-imported interpreter instead of a fresh one.

A fresh interpreter that imports the reference runtime and its SDKs spends 0.7 s of CPU on
`openai` and 0.9 s more on the `mcp` client before the agent's first step; the node's own start
of a task is a few milliseconds. So the node keeps one interpreter that has imported them all,
the fork server (`python -m agentnode.agents.forkserver`, a child of the daemon, as root on the
host, single-threaded, holding no task's data), and starts such agents as forks of it.

The task itself is started exactly as any other, but its command is a small stub that waits;
the fork server forks the agent into the stub's pid namespace, where it joins the task and
confines itself as the task's command would be (`agentnode.isolation.forkjoin`, shared with
run_code's python sandboxes); the server waits for it and tells the stub its status. The
agent closes every descriptor but its stdio, takes the task's environment and arguments, and
runs the command in the interpreter it was forked from. It tells the stub its status itself,
so it outlives the fork server (killed, or ended with the node: `kill -9`, a stop that keeps
tasks) as any task outlives the node, and the next node re-adopts its task.

Served (`serves`): tasks of kind `python` whose command is this node's interpreter
(`sys.executable`, the same path) with `-m agentnode.runtime ARGS` or `-c CODE ARGS`, whose
root is the host's, without a user namespace, and whose environment sets no `PYTHON*` variable
but `PYTHONPATH` (whose entries are put on `sys.path`, as at an interpreter's start). Anything
else starts the usual way, as do the tasks queued before the fork server is ready: it is
started at the first task it could serve.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from agentnode.isolation.forkjoin import (
    STUB,
    ForkServerProcess,
    exit_status,
    huge_pages,
    identity,
    serve,
    stub_argv,
)
from agentnode.isolation.spec import Sandbox

__all__ = ["STUB", "ForkServer", "main"]


def _python_env_ok(env: dict[str, str]) -> bool:
    return all(k == "PYTHONPATH" or not k.startswith("PYTHON") for k in env)


class ForkServer(ForkServerProcess):
    """The daemon's side: starts the fork server on first use and hands it tasks to join."""

    def __init__(self) -> None:
        super().__init__(
            [sys.executable, "-m", "agentnode.agents.forkserver"],
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
        )

    @property
    def stub(self) -> list[str]:
        """The command a served task is started with (the original one follows it)."""
        return stub_argv("agentnode-agent")

    def serves(self, argv: Sequence[str], sandbox: Sandbox) -> bool:
        """Whether a task of kind `python` running `argv` in `sandbox` can be a fork (see the
        module docstring). The first call that could starts the fork server; until it has
        imported everything, this says no."""
        if not (
            len(argv) >= 3
            and argv[0] == sys.executable
            and (argv[1:3] == ["-m", "agentnode.runtime"] or argv[1] == "-c")
            and sandbox.rootfs == "/"
            and not sandbox.userns
            and _python_env_ok(dict(sandbox.env))
        ):
            return False
        return self._started()

    def join(
        self,
        *,
        pid: int,
        pidfd: int,
        argv: Sequence[str],
        sandbox: Sandbox,
        stdout: int,
        stderr: int,
        go: int,
    ) -> None:
        """Asks the fork server to start `argv` inside the running stub `pid` (its `pidfd`)
        with `sandbox`'s identity, environment and working directory; `go` is the write end
        of the stub's stdin. Returns once the request is sent: the stub reports the outcome."""
        request = {"pid": pid, "argv": list(argv), **identity(sandbox)}
        stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.send(request, pidfd=pidfd, go=go, stdio=[stdin, stdout, stderr])
        finally:
            os.close(stdin)


# -- the fork server process -----------------------------------------------------------------


def _preload() -> None:
    """Imports what the reference runtime uses on its way to a first step, and does once what
    a first call would do lazily: one chat completion with a tool call through the `openai`
    SDK, answered in-process (no socket), imports `openai.resources.chat`, builds the SDK's
    request and response models and reads the platform (`uname -p`, a subprocess); 55 ms of
    CPU an agent spared (docs/agents.md). Then it builds what each fork's confinement takes
    (`_native.confine_ahead`) and backs its heap with 2 MiB pages (`forkjoin.huge_pages`): a
    fork copies and unmaps a few hundred page-table entries where it touches nothing, not
    ~18,000. (`serve` freezes the heap: an agent's collections skip what it inherited, so
    they neither scan it nor copy its pages.)"""
    import gc

    import httpx2
    import openai

    # An agent calls its main() (`_agent`): nothing of the runtime is compiled in a task, whose
    # read-only view of the package may hold no bytecode cache (4 ms of CPU an agent).
    import agentnode.runtime.__main__
    import agentnode.runtime.loop
    import agentnode.runtime.spend  # the SDK clients' transport (formats loads it lazily)
    import agentnode.sdk.tools
    import agentnode.tools.lines  # the MCP socket's transport
    from agentnode import _native

    def answer(request: httpx2.Request) -> httpx2.Response:
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx2.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    with openai.OpenAI(api_key="-", base_url="http://agentnode.invalid/v1", max_retries=0):
        pass  # its transport's imports (httpcore2, h11, h2)
    with openai.OpenAI(api_key="-", base_url="http://agentnode.invalid/v1", max_retries=0,
                       http_client=httpx2.Client(transport=httpx2.MockTransport(answer))) as llm:  # fmt: skip
        tool: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}
        m = llm.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "warm"}], tools=[tool]
        )
        for c in m.choices[0].message.tool_calls or ():
            c.model_dump(include={"id", "type", "function"})
    # What the MCP client's first task group and streams load, and what it checks a tool's
    # structured result with (24 ms of CPU at an agent's first call of such a tool).
    import anyio._backends._asyncio
    import anyio.streams.stapled  # noqa: F401
    import jsonschema  # noqa: F401
    from mcp import Client  # noqa: F401
    from mcp.client.streamable_http import streamable_http_client  # noqa: F401

    "agentnode.invalid".encode("idna")  # a URL's host: `encodings.idna`, `stringprep`
    # The options' parser and checks: the regular expressions argparse and they compile.
    agentnode.runtime.__main__.parse(["warm", "--model", "m", "--budget", "1"])

    gc.collect()
    _native.confine_ahead()
    huge_pages()


def _agent(request: dict[str, object], go: int) -> NoReturn:
    """The agent (its pid told to the stub, SIGINT as a fresh interpreter has it): runs the
    command, then tells the stub (`go`, its stdin) its status itself. So it ends with the
    right one when the fork server, which would otherwise tell it, is gone: killed, or ended
    with the node (a `kill -9`, a stop that keeps tasks). The agent then runs on as the child
    of the stub, its pid namespace's init, and the next node re-adopts its task."""
    os.closerange(3, go)
    os.closerange(go + 1, os.sysconf("SC_OPEN_MAX"))
    os.set_inheritable(go, False)  # not the commands it runs
    env, argv = request["env"], request["argv"]
    assert isinstance(env, dict) and isinstance(argv, list)
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    status = 0
    try:
        if argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.path[0:1] = ["", *extra]
            scope = {"__name__": "__main__", "__builtins__": __builtins__}
            exec(compile(argv[2], "<string>", "exec"), scope)
        else:
            # `python -m agentnode.runtime ARGS`, whose module the server imported: its main().
            from agentnode.runtime import __main__ as runtime

            sys.argv = [str(runtime.__file__), *argv[3:]]
            sys.path[0:1] = [os.getcwd(), *extra]
            sys.exit(runtime.main())
    except SystemExit as e:
        status = exit_status(e)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError):  # the stub is gone: the task was killed
        # As the kernel reports the status: the stub exits with it (the server's own `X`, at
        # the reap, comes second and is not read).
        os.write(go, f"X {status & 0xFF}\n".encode())
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Serves the daemon's requests on the socket whose descriptor is `argv[0]` (see
    `forkjoin.serve`: no request is ever seen by the process the next fork is copied from)."""
    args = sys.argv[1:] if argv is None else argv
    return serve(int(args[0]), _agent, preload=_preload)


if __name__ == "__main__":
    sys.exit(main())
