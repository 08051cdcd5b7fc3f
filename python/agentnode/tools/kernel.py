"""The interpreter of a `run_code` session, run inside its sandbox (as `python3 -I -c` source,
so it needs nothing of agentnode): one JSON line in, `{"code": ..., "output": BYTES}`; one
JSON line out, `{"stdout", "stderr", "error", "bytes", "truncated"}`: what the code printed,
cut to `output` bytes in all, as a fresh call's is, with how many it printed. Variables persist
between requests, like a notebook kernel."""

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> None:
    # Replies go on a private copy of stdout; fd 1 then points at stderr, so what a child
    # process prints cannot corrupt the reply stream.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    scope: dict[str, object] = {"__name__": "__main__"}
    for line in sys.stdin:
        request = json.loads(line)
        code, room = request["code"], request["output"]
        out, err = io.StringIO(), io.StringIO()
        error = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, "<session>", "exec"), scope)
            except SystemExit as e:
                error = f"SystemExit: {e.code}"
            except BaseException:
                error = traceback.format_exc()
        printed = [out.getvalue().encode(errors="replace"), err.getvalue().encode(errors="replace")]
        reply = {"error": error, "bytes": sum(map(len, printed)), "truncated": False}
        for name, data in zip(("stdout", "stderr"), printed, strict=True):
            reply["truncated"] = reply["truncated"] or len(data) > room
            reply[name] = data[:room].decode(errors="ignore")  # a cut character goes whole
            room = max(room - len(data), 0)
        replies.write(json.dumps(reply) + "\n")


main()
