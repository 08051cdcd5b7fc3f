"""agentnode: the node agent that runs autonomous AI agents on a Linux host safely, fairly, fast.

One privileged daemon per machine gives every agent task the infrastructure layers that agent
frameworks leave out: isolation, egress control, storage, LLM access, tools and scheduling.
"""

from agentnode.errors import AgentnodeError

__all__ = ["AgentnodeError", "__version__"]


def __getattr__(name: str) -> str:
    # The version lives in the Rust extension; loading it costs commands that need nothing else
    # from it (`agentnode proxy`) some 5 MiB, so it loads on first use.
    if name == "__version__":
        from agentnode._native import __version__

        return __version__
    raise AttributeError(f"module 'agentnode' has no attribute {name!r}")
