"""Benchmarks of ``quantize.log`` and ``clip`` on the digits CNN, in-process.

    python -m benchmarks.run --only methods   # this benchmark alone (also part of make bench)
    python -m benchmarks.methods              # the same, without the service benchmarks

Two questions, each answered side by side in one run on the digits residual CNN
(:mod:`tests.factories_cnn`, a pt2 upload):

1. ``quantize.log`` 4-bit against linear int4 at the same bits: ``quantize.weight_only``
   int4 (what squish offers: Linear layers only, so only this CNN's head) and, as the
   like-for-like baseline, symmetric linear int4 per output channel on exactly the layers
   ``quantize.log`` stores (its scale chosen by least squared error among 8 candidates,
   as ``quantize.log`` chooses its own), packed two codes per byte by :mod:`worker.packing`.
2. What ``clip`` buys before ``quantize.static`` (pt2, and ONNX Runtime int8) and before
   ``quantize.log``: accuracy of the same quantization with and without the clip first.

The squish rows are ``run_pipeline`` jobs (their own metrics: file size, accuracy on the
test split); the baseline is measured by the same function (``worker.metrics``) and scored
on the same images. Nothing is estimated.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OUT = Path(__file__).resolve().parent / "out" / "methods.json"
STE_EPOCHS = 2
SCALE_CANDIDATES = 8

LOG_VS_INT4: list[tuple[str, list[tuple[str, dict]]]] = [
    ("quantize.log 4-bit", [("quantize.log", {"bits": 4})]),
    ("quantize.log 3-bit", [("quantize.log", {"bits": 3})]),
    ("quantize.log 4-bit, every layer", [("quantize.log", {"bits": 4, "keep_first_last": False})]),
    (
        f"quantize.log 4-bit, every layer, STE {STE_EPOCHS} ep",
        [("quantize.log", {"bits": 4, "keep_first_last": False, "epochs": STE_EPOCHS})],
    ),
    (
        "quantize.weight_only int4 (group 32)",
        [("quantize.weight_only", {"bits": 4, "group_size": 32})],
    ),
]
CLIPS: list[tuple[str, dict]] = [
    ("clip sigma k=3", {"mode": "sigma", "k": 3.0}),
    ("clip percentile 99.9", {"mode": "percentile", "percentile": 99.9}),
    ("clip sigma k=2.5", {"mode": "sigma", "k": 2.5}),
]
QUANTIZERS: list[tuple[str, tuple[str, dict], str]] = [
    ("quantize.static (torchao, pt2)", ("quantize.static", {}), "pt2"),
    ("quantize.static (ONNX Runtime int8)", ("quantize.static", {}), "onnx"),
    ("quantize.log 4-bit", ("quantize.log", {"bits": 4}), "pt2"),
    (
        "quantize.log 3-bit, every layer",
        ("quantize.log", {"bits": 3, "keep_first_last": False}),
        "pt2",
    ),
]


def _log(message: str) -> None:
    print(f"[bench methods] {message}", file=sys.stderr, flush=True)


def _subject(root: Path) -> Any:
    from benchmarks.engine import Subject, _quiet
    from tests import factories_cnn

    data = root / "data"
    data.mkdir()
    images = {
        "train": factories_cnn.images_npz(data / "images_train.npz", "train"),
        "test": factories_cnn.images_npz(data / "images_test.npz", "test"),
    }
    _log("training the digits CNN, exporting pt2")
    with _quiet():
        pt2 = factories_cnn.cnn_pt2(root / "cnn.pt2")
    roles = {"train": images["train"], "calibration": images["train"], "eval": images["test"]}
    return Subject("digits CNN", {"pt2": pt2}, roles, "digits")


def stored_bytes(path: Path) -> int:
    """Bytes of the tensors a pt2 file stores (the rest of the file is its program)."""
    import torch

    state = torch.export.load(str(path)).state_dict
    return sum(t.numel() * t.element_size() for t in state.values())


def accuracy(path: Path, fmt: str) -> float:
    """Top-1 accuracy on the test images, run with stock torch or ONNX Runtime."""
    import numpy as np

    from tests import factories_cnn
    from tests.helpers import stock_run

    _, _, x_test, y_test = factories_cnn.digits_images()
    assert fmt in ("pt2", "onnx")
    return float((np.asarray(stock_run(path, x_test)).argmax(1) == y_test).mean())


def linear_int4_like_log(src: Path, dst: Path) -> Path:
    """Symmetric linear int4 per output channel on the layers ``quantize.log`` stores
    (every Linear/Conv but the first and last), packed by :mod:`worker.packing`."""
    import torch

    from worker.formats import load_model, save_model
    from worker.lifting import lift, relower
    from worker.packing import PackedLayer, layer_kind, packable_layers, replace_layer

    model = load_model(src, "pt2")
    module = lift(model)
    for name, layer in packable_layers(module)[1:-1]:
        kind, conv = layer_kind(layer)  # type: ignore[misc]
        weight = layer.weight.detach()
        flat = weight.reshape(weight.shape[0], -1)
        peak = flat.abs().amax(1, keepdim=True).clamp(min=1e-12) / 7
        best, best_err = peak, torch.full_like(peak, float("inf"))
        for j in range(SCALE_CANDIDATES):  # down to ~0.56 x the max: least squared error
            scale = peak * (1 - j / 16)
            err = ((flat / scale).round().clamp(-8, 7) * scale - flat).square().sum(1, True)
            best = torch.where(err < best_err, scale, best)
            best_err = torch.minimum(err, best_err)
        codes = ((flat / best).round().clamp(-8, 7) + 8).to(torch.uint8)
        replace_layer(
            module, name,
            PackedLayer(kind=kind, weight_shape=tuple(weight.shape), bits=4, codes=codes,
                        scale=best.reshape(-1, 1, 1), offset=torch.tensor(8.0), groups=1,
                        bias=layer.bias, conv=conv),
        )  # fmt: skip
    save_model(relower(model, module), dst)
    return dst


def _record(label: str, artifact: Path, fmt: str, metrics: dict | None, seconds: float) -> dict:
    """A job's figures (``metrics``), or the same ones read from a file made outside a job."""
    measured = metrics["compressed"] if metrics else None
    if measured is None:
        from worker.formats import load_model
        from worker.measurement.size import file_size, gzip_size, weight_counts

        counts = weight_counts(load_model(artifact, fmt))
        measured = {
            "size_bytes": file_size(artifact),
            "size_bytes_gzip": gzip_size(artifact),
            "parameters": counts.parameters,
        }
    return {
        "label": label,
        "format": fmt,
        "size_bytes": measured["size_bytes"],
        "size_bytes_gzip": measured.get("size_bytes_gzip"),
        "parameters": measured.get("parameters"),
        "stored_bytes": stored_bytes(artifact) if fmt == "pt2" else None,
        "accuracy": accuracy(artifact, fmt),
        "job_accuracy": metrics["compressed"].get("accuracy") if metrics else None,
        "seconds": seconds,
    }


def run_methods(root: Path) -> dict[str, Any]:
    from benchmarks.engine import run_squish

    subject = _subject(root)
    src = subject.files["pt2"]
    records: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def job(key: str, label: str, steps: list[tuple[str, dict]], output: str = "pt2") -> None:
        _log(label)
        work = root / f"job{len(records) + len(errors)}"
        try:
            res = run_squish(subject, "pt2", steps, work, output_format=output)
            artifact = Path(res["artifact"])
            records[key] = _record(label, artifact, output, res["metrics"], res["seconds"])
            records[key]["original_accuracy"] = res["metrics"]["original"].get("accuracy")
            records[key]["original_size_bytes"] = res["metrics"]["original"]["size_bytes"]
        except Exception:
            errors[key] = traceback.format_exc()
            _log(f"{label} failed")

    records["fp32"] = _record("fp32 upload", src, "pt2", None, 0.0)
    for label, steps in LOG_VS_INT4:
        job(label, label, steps)
    _log("linear int4 per channel on the same layers (baseline)")
    t0 = time.perf_counter()
    try:
        baseline = linear_int4_like_log(src, root / "linear_int4.pt2")
        key = "linear int4 per channel, same layers as quantize.log"
        records[key] = _record(key, baseline, "pt2", None, round(time.perf_counter() - t0, 2))
    except Exception:
        errors["linear int4 baseline"] = traceback.format_exc()
    for qlabel, step, output in QUANTIZERS:
        job(f"{qlabel} | no clip", f"{qlabel}, no clip", [step], output)
        for clabel, cparams in CLIPS:
            job(f"{qlabel} | {clabel}", f"{clabel} → {qlabel}", [("clip", cparams), step], output)
    return {"records": records, "errors": errors}


def _row(benchmark: str, measured: str, notes: str = "") -> dict[str, str]:
    return {"benchmark": benchmark, "measured": measured, "target": "—", "met": "—", "notes": notes}


def build_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    records, errors = result["records"], result["errors"]
    fp32 = records["fp32"]
    rows = []

    def size(rec: dict) -> str:
        text = f"{rec['size_bytes'] / 1000:.1f} kB ({fp32['size_bytes'] / rec['size_bytes']:.2f}x smaller)"
        if rec.get("stored_bytes"):
            text += f", tensors {rec['stored_bytes'] / 1000:.1f} kB"
        return text

    rows.append(_row("digits CNN fp32 pt2", f"{size(fp32)}; acc {fp32['accuracy'] * 100:.2f}%"))
    for key in [label for label, _ in LOG_VS_INT4] + [
        "linear int4 per channel, same layers as quantize.log"
    ]:
        rec = records.get(key)
        if rec is None:
            rows.append(_row(f"digits CNN {key}", "not measured", (errors.get(key) or "")[-300:]))
            continue
        delta = (rec["accuracy"] - fp32["accuracy"]) * 100
        rows.append(
            _row(
                f"digits CNN {key}",
                f"{size(rec)}; acc {rec['accuracy'] * 100:.2f}% ({delta:+.2f} points)",
            )
        )
    for qlabel, _, _ in QUANTIZERS:
        base = records.get(f"{qlabel} | no clip")
        for clabel, _ in [("no clip", {}), *CLIPS]:
            rec = records.get(f"{qlabel} | {clabel}")
            name = (
                f"digits CNN {clabel} → {qlabel}" if clabel != "no clip" else f"digits CNN {qlabel}"
            )
            if rec is None:
                err = errors.get(f"{qlabel} | {clabel}") or ""
                rows.append(_row(name, "not measured", err[-300:]))
                continue
            text = f"acc {rec['accuracy'] * 100:.2f}%"
            if base is not None and clabel != "no clip":
                text += f" ({(rec['accuracy'] - base['accuracy']) * 100:+.2f} points vs no clip)"
            rows.append(_row(name, text, f"{rec['size_bytes'] / 1000:.1f} kB"))
    return rows


def bench_methods() -> dict[str, Any]:
    """Run everything; returns ``{"rows", "records", "errors", "seconds", ...}``."""
    import torch

    from tests.helpers import one_thread

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="squish-bench-methods-"))
    try:
        with one_thread():
            result = run_methods(root)
        rows = build_rows(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "rows": rows,
        "records": result["records"],
        "errors": result["errors"],
        "settings": {"ste_epochs": STE_EPOCHS, "torch_threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg(),
    }


def main() -> int:
    from benchmarks.run import print_table

    res = bench_methods()
    print(print_table(res["rows"]))
    print(f"\n{len(res['rows'])} rows; {res['seconds']:.0f} s; JSON: {OUT}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
