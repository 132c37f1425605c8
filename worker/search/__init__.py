"""The search engine: space, trials, sensitivity, splits and selection of a ``search`` job.

A plain library like :mod:`worker.pipeline`: no Celery, no SQL, no HTTP. The modules that
import torch (``trial``, ``sensitivity``) load it lazily where their callers need them.
"""
