"""The interpreter of a `run_code` session, run inside its sandbox (as `python3 -I -c` source,
so it needs nothing of agentnode): one JSON line in, `{"code": ...}`; one JSON line out,
`{"stdout", "stderr", "error"}`. Variables persist between requests, like a notebook kernel."""

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
        code = json.loads(line)["code"]
        out, err = io.StringIO(), io.StringIO()
        error = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, "<session>", "exec"), scope)
            except SystemExit as e:
                error = f"SystemExit: {e.code}"
            except BaseException:
                error = traceback.format_exc()
        reply = {"stdout": out.getvalue(), "stderr": err.getvalue(), "error": error}
        replies.write(json.dumps(reply) + "\n")


main()
