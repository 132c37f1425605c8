"""squish's compression engine: load a model, run a pipeline of methods, measure, save.

No Celery, HTTP or SQL in here except `worker.tasks`, the thin Celery adapter.
"""

import os

# torchao's compiled extensions are CUDA builds; on a machine without an NVIDIA GPU, loading
# them only fails noisily. Decided before torchao is first imported, without importing torch.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
