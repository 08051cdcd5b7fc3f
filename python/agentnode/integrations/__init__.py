"""Adapters that plug agentnode into agent frameworks (each imports its framework lazily)."""
