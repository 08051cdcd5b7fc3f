"""Layer 3 agent memory: the episodic store (`episodic`), the object store (`objects`), tenancy
(`tenancy`), the vector store (`vectors`), the HTTP API (`api`, its vector routes in
`vector_api`) and its standalone server (`serve`).

Nothing is imported here, so that `agentnode` commands that do not touch memory do not pay for
RocksDB and aiohttp at start-up.
"""
