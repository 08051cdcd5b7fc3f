"""AutoGPT classic on the node: installing it once per node, and running it headless as a task.

PyPI's only AutoGPT classic is `agpt` 0.2.2 (April 2023). It declares no dependencies, so
`install` puts a venv under CACHE/autogpt with a pinned set that works together
(`autogpt-requirements.txt`, installed with --no-deps) and the tiktoken tables copied from the
litellm wheel (tiktoken would download them; a task has no such egress). Tasks get the install
read-only.

Two things the wheel lacks, which AutoGPT opens relative to its working directory and to its
own package, are supplied by the launcher (`python -m agentnode.agents.autogpt`) in the task's
working directory: `autogpt/json_utils/llm_response_format_1.json` (the schema it checks each
answer against; the node writes its own) and a `logs/` directory beside the package. It makes
`./autogpt` a directory of links to the installed package, so `autogpt/../logs` is `./logs`
(the kernel resolves `..` through a linked directory to the link's target), writes the AI
settings file (name, role, the task's message as the goal) and execs
`python -m autogpt --continuous --continuous-limit N --skip-news -m local --ai-settings FILE`.
openai 0.27 reads `OPENAI_API_BASE`, which every agent task has pointing at the proxy.
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

__all__ = [
    "DEFAULT_STEPS",
    "MODELS",
    "VERSION",
    "install",
    "installed",
    "main",
    "status",
    "task_command",
]

VERSION = "0.2.2"
#: Its --continuous-limit when the submission names no `steps`.
DEFAULT_STEPS = 10
#: The chat models AutoGPT 0.2.2 can count tokens for (any other name raises in its
#: `count_message_tokens`); its local memory also calls `text-embedding-ada-002`.
MODELS = ("gpt-3.5-turbo", "gpt-3.5-turbo-0301", "gpt-4", "gpt-4-0314")
_REQUIREMENTS = Path(__file__).with_name("autogpt-requirements.txt")
_SITE = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
#: What AutoGPT's answers are checked against (it only logs a mismatch): the node's own
#: description of its reply format, a JSON object with `thoughts` and an optional `command`.
_REPLY_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["thoughts"],
    "properties": {
        "thoughts": {"type": "object"},
        "command": {
            "type": "object",
            "required": ["name", "args"],
            "properties": {"name": {"type": "string"}, "args": {"type": "object"}},
        },
    },
}


def status(cache: Path) -> dict[str, Any] | None:
    """What `install` recorded under CACHE/autogpt (versions, size), or None if absent."""
    home = cache / "autogpt"
    complete = (home / "bin" / "python").exists() and (home / _SITE / "autogpt").is_dir()
    return recorded(home, complete=complete)


def installed(cache: Path) -> Path:
    """CACHE/autogpt when AutoGPT is installed there; `TaskError` saying how otherwise."""
    return required(cache, "autogpt", "AutoGPT", status)


def install(cache: Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Installs agpt and its pinned dependencies in a venv at CACHE/autogpt, replacing what was
    there only once the new install is complete. Returns what `status` will report."""
    started = time.monotonic()
    log(f"installing agpt {VERSION} and its pinned dependencies into {cache / 'autogpt'}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(cache, "autogpt")
    except OSError as e:
        raise ConfigError(
            f"cannot install into {cache}: {e.strerror or e} (give a writable directory: --cache)"
        ) from None
    # The interpreter tasks run: the base one, not a venv's, so the install's venv is the only
    # one on its path.
    base = (
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    steps = (
        [str(base), "-m", "venv", str(staging)],
        [str(staging / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-input",
         "--disable-pip-version-check", "-q", "-r", str(_REQUIREMENTS)],
    )  # fmt: skip
    for argv in steps:
        run = subprocess.run(argv, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"installing AutoGPT failed ({' '.join(argv[1:4])}): {tail[0]}")
    tables = staging / _SITE / "litellm" / "litellm_core_utils" / "tokenizers"
    shutil.copytree(tables, staging / "tiktoken", ignore=shutil.ignore_patterns("*.py*", "*.json"))
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file() and not f.is_symlink())
    stamp = {
        "autogpt": VERSION,
        "python": sys.version.split()[0],
        "bytes": size,
        "seconds": round(time.monotonic() - started, 1),
    }
    (staging / STAMP).write_text(json.dumps(stamp))
    staging.chmod(0o755)
    replace_install(staging, cache / "autogpt")
    return {**stamp, "home": str(cache / "autogpt")}


def task_command(home: Path, *, model: str, steps: int, message: str) -> tuple[str, ...]:
    """The task's command: this module's launcher, which lays out AutoGPT's working directory
    and execs it."""
    return (sys.executable, "-m", "agentnode.agents.autogpt", "--home", str(home),
            "--model", model, "--steps", str(steps), "--", message)  # fmt: skip


def _link_package(package: Path, into: Path) -> None:
    """`into` as a real directory of links to `package`'s entries, so `into/..` is its parent;
    `json_utils` one level deeper, so the reply schema can be added to it. `__pycache__` is
    linked too: Python finds the install's bytecode and writes none into the workspace."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for entry in package.iterdir():
        if entry.name == "json_utils":
            _link_package(entry, into / entry.name)
        else:
            (into / entry.name).symlink_to(entry)


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher inside a task (see the module's docstring)."""
    p = argparse.ArgumentParser(prog="agentnode.agents.autogpt")
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("message")
    args = p.parse_args(argv)
    if not os.environ.get("OPENAI_API_BASE") or not os.environ.get("AGENTNODE_TOKEN"):
        print(
            "agentnode: error: this task cannot reach the node's inference proxy "
            "(an autogpt task needs network egress and a node with [inference] configured)",
            file=sys.stderr,
        )
        return 2
    run_dir = Path.cwd()
    package = run_dir / "autogpt"
    _link_package(args.home / _SITE / "autogpt", package)
    (package / "json_utils" / "llm_response_format_1.json").write_text(json.dumps(_REPLY_SCHEMA))
    settings = run_dir / "ai_settings.yaml"
    # JSON is YAML: AutoGPT reads this with yaml.load.
    settings.write_text(
        json.dumps({"ai_name": "agentnode", "ai_role": args.message, "ai_goals": [args.message]})
    )
    python = args.home / "bin" / "python"
    env = {
        **os.environ,
        "PYTHONPATH": str(run_dir),
        "TIKTOKEN_CACHE_DIR": str(args.home / "tiktoken"),
        "FAST_LLM_MODEL": args.model,
        "SMART_LLM_MODEL": args.model,
        "MEMORY_BACKEND": "local",
    }
    argv_ = [str(python), "-m", "autogpt", "--continuous", "--continuous-limit", str(args.steps),
             "--skip-news", "-m", "local", "--ai-settings", str(settings)]  # fmt: skip
    os.execve(python, argv_, env)


if __name__ == "__main__":
    sys.exit(main())
