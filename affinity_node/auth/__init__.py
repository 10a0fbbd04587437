"""API key authentication: hash -> key id, cached per node, revoked by notification."""
