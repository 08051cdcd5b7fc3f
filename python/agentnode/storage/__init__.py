"""Layer 3 storage: agent memory kept on the node (vectors, episodes, objects)."""
