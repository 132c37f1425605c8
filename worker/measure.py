"""``python -m worker.measure``: peak memory of loading and running a model, in isolation.

Run by :func:`worker.metrics.peak_memory` in a fresh process so that nothing else the
worker holds is counted. Prints one JSON line:
``{"rss_before_bytes", "peak_rss_bytes", "peak_memory_bytes"}`` where
``peak_memory_bytes = peak_rss_bytes - rss_before_bytes``: how far this process's resident
set size rose, at its highest, above its size just before loading the model (runtime
imported, inputs read), through loading and one forward pass of the given batch. On Linux
the kernel's high-water mark is reset at that point (``/proc/self/clear_refs``), so
earlier spikes (importing the runtime) are not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
from pathlib import Path

import numpy as np

_STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _current_rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.measure", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--format", choices=("pt2", "onnx", "hf"), required=True)
    parser.add_argument("--inputs", type=Path, required=True, help=".npz of input arrays by name")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    args = parser.parse_args(argv)

    # Import the runtime, and what loading a model imports lazily, before the baseline:
    # the footprint of the libraries is not the model's.
    if args.format == "pt2":
        import torch
        import torch._export.serde.serialize
        import torch.ao.quantization.fx._decomposed
        import torch.export.pt2_archive._package  # noqa: F401
    elif args.format == "hf":
        from transformers import (  # noqa: F401  (imports torch too)
            AutoConfig,
            AutoModel,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )
    else:
        import onnxruntime  # noqa: F401
    from worker.formats import Runtime

    with np.load(args.inputs, allow_pickle=False) as npz:
        feeds = {name: npz[name] for name in npz.files}
    gc.collect()
    _reset_peak()
    before = _current_rss_bytes()
    runtime = Runtime(args.model, args.format, args.device)
    runtime(feeds)
    peak = _peak_rss_bytes()
    print(
        json.dumps(
            {"rss_before_bytes": before, "peak_rss_bytes": peak, "peak_memory_bytes": peak - before}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
