"""Routing: the binding cache, the affinity engine (request path, coherence, upkeep) and the
ports it needs from the adapters."""
