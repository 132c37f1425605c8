"""Benchmarks of squish: ``python -m benchmarks.run`` (``make bench``).

- :mod:`benchmarks.service`: the service itself, as real processes — uploads through
  ``POST /v1/datasets``, job pickup latency, ``GET /v1/jobs/{id}`` under load against
  PostgreSQL, and the end-to-end overhead of a job against the in-process pipeline.
- :mod:`benchmarks.upload`: the raw streaming-upload parser in a minimal ASGI app.
- :mod:`benchmarks.run`: runs them, prints one table and writes ``benchmarks/out/service.json``.
"""
