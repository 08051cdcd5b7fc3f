"""agentnode: the node agent that runs autonomous AI agents on a Linux host safely, fairly, fast.

One privileged daemon per machine gives every agent task the infrastructure layers that agent
frameworks leave out: isolation, egress control, storage, LLM access, tools and scheduling.
"""

from agentnode._native import __version__
from agentnode.errors import AgentnodeError

__all__ = ["AgentnodeError", "__version__"]
