"""squish service: the HTTP API, its database and its object store (no torch here)."""
