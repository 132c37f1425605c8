"""Measuring models (DESIGN §6): every figure comes from running or reading the file.

One module per kind of figure, and one that puts them together for a pipeline run:

- :mod:`.size`: file bytes, gzip bytes, weights counted (``parameters``, ``sparsity``).
- :mod:`.runs`: running a model file over inputs in batches.
- :mod:`.latency`: timed runs per batch size and their percentiles.
- :mod:`.macs`: multiply-accumulates of the matmul and convolution ops.
- :mod:`.memory`: peak memory, in a fresh process (``python -m worker.measurement.memory``).
- :mod:`.model`: all of the above for one model file (:func:`~.model.measure_model`).
- :mod:`.fidelity`: outputs compared with the original's, accuracy, the evaluation inputs.
- :mod:`.ratios`: original against compressed.
- :mod:`.result_warnings`: what the job's events say when the result is slower or far off.
- :mod:`.alternatives`: the other runtimes a slower result could run in, measured when cheap.
- :mod:`.bench`: what a pipeline run measures, after each step and at the end.
- :mod:`.timing_lock`: one timed measurement at a time per host and device.

The figures are the typed models of :mod:`worker.schemas`; one that cannot be measured is
left out, and the reporter's log says why. Nothing is imported here, so that the memory
probe's process starts from a clean slate.
"""
