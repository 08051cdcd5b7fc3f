"""Where a node keeps its state and its API unless configured otherwise (a module of its own so
that the CLI's client finds them without loading the node's configuration code)."""

from pathlib import Path

__all__ = ["ADMIN_MEMORY", "DEFAULT_DATA_DIR", "DEFAULT_SOCKET"]

DEFAULT_DATA_DIR = Path("/var/lib/agentnode")
DEFAULT_SOCKET = Path("/run/agentnode/api.sock")
#: Where the admin socket serves the memory API for the operator, any tenant (`agentnode memory`).
ADMIN_MEMORY = "/admin/memory"
