"""Where a node keeps its state and its API socket unless configured otherwise (a module of its
own so that the CLI's client finds the socket without loading the node's configuration code)."""

from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_SOCKET"]

DEFAULT_DATA_DIR = Path("/var/lib/agentnode")
DEFAULT_SOCKET = Path("/run/agentnode/api.sock")
