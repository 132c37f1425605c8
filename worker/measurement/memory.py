"""Peak memory of loading and running a model, measured in a fresh process.

:func:`peak_memory` (in the worker) runs ``python -m worker.measurement.memory`` (this
module's :func:`main`), so that nothing else the worker holds is counted. The probe prints
one JSON line: ``{"rss_before_bytes", "peak_rss_bytes", "peak_memory_bytes"}`` where
``peak_memory_bytes = peak_rss_bytes - rss_before_bytes``: how far its resident set size
rose, at its highest, above its size just before loading the model (runtime imported,
inputs read), through loading and one forward pass of the given batch. On Linux the
kernel's high-water mark is reset at that point (``/proc/self/clear_refs``), so earlier
spikes (importing the runtime) are not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from worker.context import Reporter
from worker.contract import Device, ModelFormat, values

PROBE_MODULE = "worker.measurement.memory"
PROBE_TIMEOUT_S = 600
_STATUS = Path("/proc/self/status")


def peak_memory(
    path: Path, fmt: str, feeds: dict[str, np.ndarray], device: str, reporter: Reporter
) -> int | None:
    """Peak memory of loading the model and running one batch, in a fresh process.

    The figure is the extra host memory the model needs at its peak in that runtime
    (weights, runtime state, activations), not counting the interpreter and the runtime
    library. None (logged) when the probe fails.
    """
    with tempfile.TemporaryDirectory(prefix="squish-measure-") as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **feeds)  # type: ignore[arg-type]
        command = [
            sys.executable, "-m", PROBE_MODULE, "--model", str(path), "--format", fmt,
            "--inputs", str(inputs_path), "--device", device,
        ]  # fmt: skip
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env
            )
        except subprocess.TimeoutExpired:
            reporter.log(
                "peak_memory_bytes not measured: the measuring process timed out", "warning"
            )
            return None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        reporter.log(f"peak_memory_bytes not measured: {detail[0]}", "warning")
        return None
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return int(result["peak_memory_bytes"])
    except (ValueError, KeyError, IndexError):
        reporter.log("peak_memory_bytes not measured: unreadable measuring output", "warning")
        return None


# -- the probe (the fresh process) ---------------------------------------------------


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
    """The probe: load the model, run one batch, print the RSS high-water mark's growth."""
    parser = argparse.ArgumentParser(prog=f"python -m {PROBE_MODULE}", description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--format", choices=values(ModelFormat), required=True)
    parser.add_argument("--inputs", type=Path, required=True, help=".npz of input arrays by name")
    parser.add_argument("--device", default=Device.cpu.value, choices=values(Device))
    args = parser.parse_args(argv)

    # Import the runtime, and what loading a model imports lazily, before the baseline:
    # the footprint of the libraries is not the model's.
    if args.format == ModelFormat.pt2:
        import torch
        import torch._export.serde.serialize
        import torch.ao.quantization.fx._decomposed
        import torch.export.pt2_archive._package
    elif args.format == ModelFormat.aoti:
        import torch
        import torch._inductor  # noqa: F401  (aoti_load_package)
    elif args.format == ModelFormat.hf:
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
