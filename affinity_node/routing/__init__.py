"""Routing: the binding cache, the affinity engine and the store port it needs."""
