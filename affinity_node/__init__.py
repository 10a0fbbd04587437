"""affinity-node: sticky (API key, model) routing for vLLM fleets, shared through Postgres."""

__version__ = "0.1.0"
