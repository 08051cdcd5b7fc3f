"""Layer 3 agent memory: the episodic store, the object store, tenancy, and their HTTP API."""

from agentnode.storage.episodic import EpisodicStore, NewRecord, Record
from agentnode.storage.objects import ObjectInfo, ObjectStore
from agentnode.storage.tenancy import Authenticator, Principal, StaticTokens

__all__ = [
    "Authenticator",
    "EpisodicStore",
    "NewRecord",
    "ObjectInfo",
    "ObjectStore",
    "Principal",
    "Record",
    "StaticTokens",
]
