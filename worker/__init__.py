"""squish's compression engine: load a model, run a pipeline of methods, measure, save.

No Celery, HTTP or SQL in here except `worker.tasks`, the thin Celery adapter.
"""
