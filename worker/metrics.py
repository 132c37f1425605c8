"""Measured metrics (DESIGN §6): every figure comes from running or reading the file.

A figure that cannot be measured is left out, and the reporter's log says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.context import NullReporter, Reporter
from worker.errors import UnsupportedError
from worker.formats import LoadedModel, Runtime, weight_arrays

if TYPE_CHECKING:
    import onnx

GZIP_LEVEL = 6  # gzip's own default: what `gzip model.pt2` gives
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 0.5


def measure_model(
    path: Path,
    fmt: str,
    *,
    inputs: dict[str, np.ndarray],
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    device: str,
    reporter: Reporter,
    with_peak_memory: bool = True,
) -> dict[str, Any]:
    """Measure one model file.

    Args:
        path: the model file, loaded in the runtime of its format.
        inputs: sample inputs by model input name (axis 0 = samples); a batch of size b
            takes the first b samples, repeating them if there are fewer.
        batch_sizes: latency batch sizes; a size the model cannot run (static batch
            dim) is skipped with a log line, and if none is left the static batch is used.
        warmup / iterations: untimed and timed runs per batch size.
        device: ``"cpu"`` or ``"gpu"``.
        reporter: gets progress (0..1 of this measurement) and the log.
        with_peak_memory: also measure ``peak_memory_bytes`` (in a fresh process).

    Returns:
        ``size_bytes``, ``size_bytes_gzip``, ``parameters``, ``nonzero_parameters``,
        ``sparsity``, ``macs`` (when countable), ``latency_ms``
        (``{"batch_1": {"p50", "p95", "mean"}}``) and ``peak_memory_bytes``.
    """
    path = Path(path)
    metrics: dict[str, Any] = {"size_bytes": path.stat().st_size}
    metrics["size_bytes_gzip"] = gzip_size(path)
    reporter.progress(0.05, "measure")
    runtime = Runtime(path, fmt, device)
    model = runtime.model
    metrics.update(weight_counts(model))
    if "sparsity" not in metrics:
        reporter.log("sparsity not measured: the model has no weight tensors", "warning")
    macs = _count_macs(runtime, inputs, reporter)
    if macs is not None:
        metrics["macs"] = macs
    reporter.progress(0.15, "measure")

    sizes = runnable_batch_sizes(model, batch_sizes, reporter)
    latency: dict[str, dict[str, float]] = {}
    for i, batch in enumerate(sizes):
        feeds = make_batch(inputs, batch)
        span = (0.15 + 0.65 * i / len(sizes), 0.15 + 0.65 * (i + 1) / len(sizes))
        latency[f"batch_{batch}"] = _time_runs(runtime, feeds, warmup, iterations, reporter, span)
    if latency:
        metrics["latency_ms"] = latency
    del runtime
    if sizes and with_peak_memory:
        peak = peak_memory(path, fmt, make_batch(inputs, max(sizes)), device, reporter)
        if peak is not None:
            metrics["peak_memory_bytes"] = peak
    reporter.progress(1.0, "measure")
    return metrics


def gzip_size(path: Path) -> int:
    """Bytes of the gzip-compressed file (level 6), streamed in 1 MiB chunks."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip container
    total = 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def weight_counts(model: LoadedModel) -> dict[str, Any]:
    """``parameters``, ``nonzero_parameters`` and ``sparsity`` over the weight tensors.

    Weights are as :func:`worker.formats.weight_shapes` defines them: int8 weights count
    as parameters; quantization scales and zero points do not. A stored value that is
    not zero counts as nonzero (for asymmetric int8, a pruned weight is its zero point).
    """
    total = 0
    nonzero = 0
    for array in weight_arrays(model).values():
        total += int(array.size)
        nonzero += int(np.count_nonzero(array))
    result: dict[str, Any] = {"parameters": total, "nonzero_parameters": nonzero}
    if total:
        result["sparsity"] = 1.0 - nonzero / total
    return result


def runnable_batch_sizes(
    model: LoadedModel, batch_sizes: list[int], reporter: Reporter
) -> list[int]:
    """The batch sizes the model can run; logs the ones skipped."""
    static = model.static_batch
    sizes = sorted(set(batch_sizes))
    if static is None:
        return sizes
    runnable = [b for b in sizes if b == static]
    skipped = [b for b in sizes if b != static]
    if skipped:
        reporter.log(
            f"latency not measured for batch sizes {skipped}: the model's batch dimension "
            f"is static ({static})",
            "warning",
        )
    if not runnable:
        reporter.log(f"latency measured at the model's static batch size {static} instead")
        runnable = [static]
    return runnable


def make_batch(inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` samples of each input, repeated cyclically if there are fewer."""
    return {
        name: np.ascontiguousarray(np.resize(arr, (batch, *arr.shape[1:])).astype(arr.dtype))
        for name, arr in inputs.items()
    }


def _time_runs(
    runtime: Runtime,
    feeds: dict[str, np.ndarray],
    warmup: int,
    iterations: int,
    reporter: Reporter,
    span: tuple[float, float],
) -> dict[str, float]:
    start, end = span
    last = time.monotonic()
    for _ in range(warmup):
        runtime(feeds)
    times = []
    for i in range(max(1, iterations)):
        t0 = time.perf_counter()
        runtime(feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() - last > _PROGRESS_EVERY_S:
            reporter.progress(start + (end - start) * (i + 1) / iterations, "measure")
            last = time.monotonic()
    reporter.progress(end, "measure")
    arr = np.asarray(times)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
    }


def _count_macs(runtime: Runtime, inputs: dict[str, np.ndarray], reporter: Reporter) -> int | None:
    """Multiply-accumulates of matmul/conv ops for one sample (batch 1, or static batch / B)."""
    model = runtime.model
    batch = model.static_batch or 1
    feeds = make_batch(inputs, batch)
    try:
        torch_side = model.format in ("pt2", "hf")
        total = _torch_macs(runtime, feeds) if torch_side else _onnx_macs(model, feeds)
    except UnsupportedError as exc:
        reporter.log(f"macs not measured: {exc.message}", "warning")
        return None
    return round(total / batch)


def _torch_macs(runtime: Runtime, feeds: dict[str, np.ndarray]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    if runtime.device != "cpu":
        raise UnsupportedError("counted on CPU workers only")
    counter = FlopCounterMode(display=False)
    with counter:
        runtime(feeds)
    return counter.get_total_flops() / 2


_ONNX_MAC_OPS = {
    # op type -> (input index of A / data, input index of the weight)
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "QLinearMatMul": (0, 3),
    "Gemm": (0, 1),
    "Conv": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "ConvTranspose": (0, 1),
}


def _onnx_macs(model: LoadedModel, feeds: dict[str, np.ndarray]) -> float:
    """MACs from shapes inferred with the inputs pinned to ``feeds``' shapes.

    ONNX's own shape inference first; where its data propagation stops (``Range`` and
    ``Slice`` on shapes, as in the attention masks of exported transformers), ONNX
    Runtime's symbolic shape inference, without the exporter's symbolic value_info.
    """
    import onnx

    assert model.proto is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for value in proto.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape, strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        return _macs_from_shapes(inferred)
    except (onnx.shape_inference.InferenceError, ValueError, UnsupportedError) as exc:
        first = exc
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    del proto.graph.value_info[:]
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception as exc:  # the tool raises assorted types on graphs it cannot follow
        raise UnsupportedError(f"ONNX shape inference failed: {first}") from exc
    if inferred is None:
        raise UnsupportedError(f"ONNX shape inference failed: {first}")
    return _macs_from_shapes(inferred)


def _macs_from_shapes(inferred: onnx.ModelProto) -> float:
    shapes: dict[str, list[int] | None] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = (
            [d.dim_value for d in dims] if all(d.HasField("dim_value") for d in dims) else None
        )
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0.0
    for node in inferred.graph.node:
        if node.op_type not in _ONNX_MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        a_index, w_index = _ONNX_MAC_OPS[node.op_type]
        a_shape = shapes.get(node.input[a_index])
        w_shape = shapes.get(node.input[w_index])
        out_shape = shapes.get(node.output[0])
        if a_shape is None or w_shape is None or out_shape is None:
            raise UnsupportedError(
                f"the shapes around {node.op_type} node {node.name!r} are unknown"
            )
        out_numel = int(np.prod(out_shape))
        if node.op_type in ("MatMul", "MatMulInteger", "QLinearMatMul"):
            total += out_numel * a_shape[-1]
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            total += out_numel * (a_shape[0] if trans_a else a_shape[-1])
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(a_shape)) * int(np.prod(w_shape[1:]))
        else:
            total += out_numel * int(np.prod(w_shape[1:]))
    return total


def peak_memory(
    path: Path, fmt: str, feeds: dict[str, np.ndarray], device: str, reporter: Reporter
) -> int | None:
    """Peak memory of loading the model and running one batch, in a fresh process.

    Runs ``python -m worker.measure``: it imports the runtime and reads the inputs, notes
    its peak resident set size (RSS high-water mark), loads the model, runs the batch,
    and reports the high-water mark's growth. The figure is the extra host memory the
    model needs at its peak in that runtime (weights, runtime state, activations), not
    counting the interpreter and the runtime library.
    """
    with tempfile.TemporaryDirectory(prefix="squish-measure-") as tmp:
        inputs_path = Path(tmp) / "inputs.npz"
        np.savez(inputs_path, **feeds)  # type: ignore[arg-type]
        command = [
            sys.executable, "-m", "worker.measure", "--model", str(path), "--format", fmt,
            "--inputs", str(inputs_path), "--device", device,
        ]  # fmt: skip
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
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


def run_model(
    path: Path,
    fmt: str,
    inputs: dict[str, np.ndarray],
    batch_size: int,
    *,
    device: str = "cpu",
    reporter: Reporter | None = None,
) -> list[np.ndarray]:
    """Run the model file over every sample, in batches; outputs concatenated on axis 0.

    A model with a static batch dim runs at that size (``batch_size`` is ignored) and
    the last batch is padded by repeating samples; padded outputs are dropped.
    """
    runtime = Runtime(path, fmt, device)
    return run_loaded(runtime, inputs, batch_size, reporter=reporter)


def run_loaded(
    runtime: Runtime,
    inputs: dict[str, np.ndarray],
    batch_size: int,
    *,
    reporter: Reporter | None = None,
) -> list[np.ndarray]:
    """:func:`run_model` on an already loaded runtime."""
    reporter = reporter or NullReporter()
    batch = runtime.model.static_batch or max(1, batch_size)
    num = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    last = time.monotonic()
    for start in range(0, num, batch):
        part = {k: v[start : start + batch] for k, v in inputs.items()}
        size = len(next(iter(part.values())))
        if size < batch and runtime.model.static_batch is not None:
            part = make_batch(part, batch)
        outputs = runtime(part)
        chunks.append([o[:size] for o in outputs])
        if time.monotonic() - last > _PROGRESS_EVERY_S:
            reporter.progress(min(1.0, (start + size) / num), None)
            last = time.monotonic()
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Fidelity of ``candidate`` to ``reference`` (same inputs, same output order).

    Returns:
        ``cosine_similarity`` (mean over samples of the cosine between the flattened
        outputs of a sample), ``mse`` and ``max_abs_error`` over all output elements, and
        ``top1_agreement`` (share of samples whose argmax agrees) when the first output
        is ``[N, C]`` with C > 1.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs but {len(candidate)} candidates")
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"output shapes differ: {ref.shape} vs {cand.shape}")
    num = reference[0].shape[0] if reference[0].ndim else 1
    ref_flat = np.concatenate([r.reshape(num, -1).astype(np.float64) for r in reference], axis=1)
    cand_flat = np.concatenate([c.reshape(num, -1).astype(np.float64) for c in candidate], axis=1)
    dots = (ref_flat * cand_flat).sum(axis=1)
    norms = np.linalg.norm(ref_flat, axis=1) * np.linalg.norm(cand_flat, axis=1)
    both_zero = norms == 0
    cosine = np.where(both_zero, 1.0, dots / np.where(both_zero, 1.0, norms))
    diff = ref_flat - cand_flat
    result = {
        "cosine_similarity": float(cosine.mean()),
        "mse": float((diff**2).mean()),
        "max_abs_error": float(np.abs(diff).max()),
    }
    first = reference[0]
    if first.ndim == 2 and first.shape[1] > 1:
        result["top1_agreement"] = float((first.argmax(1) == candidate[0].argmax(1)).mean())
    return result


def is_token_output(output: np.ndarray, inputs: dict[str, np.ndarray]) -> bool:
    """Whether ``output`` is per token (``[N, T, H]``) of inputs with an ``attention_mask``."""
    mask = inputs.get("attention_mask")
    return (
        mask is not None and mask.ndim == 2 and output.ndim == 3 and output.shape[:2] == mask.shape
    )


def pool_token_outputs(
    outputs: list[np.ndarray], inputs: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Per-token outputs averaged over the tokens the ``attention_mask`` keeps.

    A feature-extraction model's ``last_hidden_state`` becomes its sentence embedding
    (mean pooling, as sentence-transformers does), so fidelity compares what users of the
    embeddings see, and padding positions, whose values mean nothing, do not count.
    Other outputs are returned as they are.
    """
    pooled = []
    for output in outputs:
        if is_token_output(output, inputs):
            mask = inputs["attention_mask"][..., None].astype(np.float64)
            summed = (output.astype(np.float64) * mask).sum(axis=1)
            pooled.append(summed / np.maximum(mask.sum(axis=1), 1.0))
        else:
            pooled.append(output)
    return pooled


def accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output (``[N, C]`` scores) against labels.

    Labels are class indices ``[N]`` or one-hot/probabilities ``[N, C]``.

    Raises:
        UnsupportedError: the output or the labels are not classification-shaped.
    """
    scores = outputs[0]
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise UnsupportedError(
            f"accuracy needs class scores [N, C>1] as the first output, got {list(scores.shape)}"
        )
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == scores.shape[1]:
        labels = labels.argmax(1)
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise UnsupportedError(
            f"labels {list(labels.shape)} do not match the outputs {list(scores.shape)}"
        )
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise UnsupportedError("labels must be class indices (integers)")
    return float((scores.argmax(1) == labels.astype(np.int64)).mean())
