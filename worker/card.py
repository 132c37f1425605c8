"""The compression card (artifact ``card``): one self-contained HTML page of what a job did and measured.

:func:`render_card` turns a job's spec and typed metrics (:mod:`worker.schemas`) into HTML
that opens offline: inline CSS, inline SVG charts drawn by matplotlib from the measured
figures, no script and no reference to the network (a Content-Security-Policy in the page
forbids any). Every string that comes from a user (names, step params, layer names) is
escaped by the template (Jinja2 with autoescape) or by matplotlib's SVG writer. A figure
that was not measured is shown as absent ("—"), never as 0, and is left out of the charts.

Torch-free: the worker calls it after the artifact is stored (it needs the artifact's
sha256), and so can anything that has a job's spec and metrics, a search included (the
Pareto plot, the trial and sensitivity tables come from ``metrics["search"]``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import math
import platform
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from worker.schemas import PipelineMetrics

TEMPLATE = "card.html.j2"
TEMPLATES = Path(__file__).parent / "templates"

LIBRARIES = ("torch", "torchao", "onnx", "onnxruntime", "torch-pruning", "squish")
"""The distributions whose versions the card records (those that made the artifact)."""

TIMES, MINUS = "\u00d7", "\u2212"

ABSENT = Markup('<span class="absent" title="not measured">—</span>')

MAX_LAYER_BARS = 60
"""The per-layer sparsity chart shows at most this many layers (the table lists all)."""

_COLORS = {"original": "#7f7f7f", "step": "#3b75af", "artifact": "#2e8b57", "accent": "#c44e52"}


@dataclass(frozen=True)
class FileRef:
    """A file the card identifies by its content hash.

    Attributes:
        sha256: hex digest of the file's bytes.
        size_bytes: its size.
        format: ``pt2``, ``onnx``, ``npz``, ...
        name: the name it was uploaded under (shown escaped).
        id: its resource id (``mdl_…``, ``ds_…``), if it has one.
    """

    sha256: str
    size_bytes: int | None = None
    format: str | None = None
    name: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class CardWarning:
    """A warning event of the job: its message and when it was logged."""

    message: str
    at: datetime | None = None


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`LIBRARIES` (None when one is not installed),
    read from package metadata: nothing is imported."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def render_card(
    *,
    job_id: str,
    spec: Mapping[str, Any],
    metrics: PipelineMetrics | Mapping[str, Any],
    model: FileRef,
    artifact: FileRef | None,
    datasets: Mapping[str, FileRef] | None = None,
    warnings: Sequence[CardWarning | str] = (),
    versions: Mapping[str, str | None] | None = None,
    rendered_at: datetime | None = None,
) -> str:
    """The card of one job, as an HTML document.

    Args:
        job_id: the job's id (shown, and in the title).
        spec: the job's normalized spec (``pipeline`` or ``search``, ``output_format``,
            ``target``, ``evaluate``); a step's params are taken from ``metrics.steps`` when
            there (the params that ran, hardware defaults filled in), else from here.
        metrics: the job's metrics: a :class:`~worker.schemas.PipelineMetrics` or its JSON
            form. For a search, the JSON form with ``search`` (DESIGN §10: ``trials``,
            ``pareto``, ``best``, ``met``, ``unmet``, ``sensitivity``, ``holdout``; every key
            optional) and, when there is a best trial, its ``original``/``compressed``/...
        model: the uploaded model.
        artifact: the artifact the card describes (None: no artifact, e.g. a search that
            found none).
        datasets: the datasets by role (``calibration``, ``train``, ``eval``).
        warnings: the job's warning events, in order.
        versions: library versions (default: :func:`library_versions` of this process).
        rendered_at: the time shown as the card's date (default: now).

    Raises:
        Exception: whatever the charts or the template raise on data they cannot draw;
        the worker logs it as a warning and stores no card.
    """
    data = _metrics_json(metrics)
    context = _Context(spec, data).build()
    charts = _Charts()
    with charts.style():
        context["charts"] = {
            "waterfall": charts.waterfall(context["stages"], context["quality_label"]),
            "latency": charts.latency(context["latency_rows"]),
            "layers": charts.layer_sparsity(context["layers"]),
            "pareto": charts.pareto(context["search"]) if context["search"] else None,
        }
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            job_id=job_id,
            model=model,
            artifact=artifact,
            datasets=dict(datasets or {}),
            warnings=[w if isinstance(w, CardWarning) else CardWarning(str(w)) for w in warnings],
            versions=dict(versions if versions is not None else library_versions()),
            rendered_at=(rendered_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC"),
            **context,
        )
    )


# --- the figures, arranged ------------------------------------------------------------


def _metrics_json(metrics: PipelineMetrics | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(metrics, BaseModel):
        return dict(metrics.model_dump(mode="json", exclude_none=True))
    return json.loads(json.dumps(dict(metrics), default=str))


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]…``, None where a level is absent or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _batch_keys(*latencies: Any) -> list[str]:
    """``batch_N`` keys of the latency maps, by N."""
    keys = {k for latency in latencies if isinstance(latency, Mapping) for k in latency}

    def size(key: str) -> tuple[int, str]:
        digits = key.removeprefix("batch_")
        return (int(digits), key) if digits.isdigit() else (1 << 30, key)

    return sorted(keys, key=size)


def _p(latency: Any, batch: str | None, q: str = "p50") -> float | None:
    return _number(_get(latency, batch, q)) if batch else None


class _Context:
    """The template's view of the spec and the metrics: rows of figures, in order."""

    def __init__(self, spec: Mapping[str, Any], metrics: dict[str, Any]) -> None:
        self.spec = spec
        self.m = metrics
        self.original = metrics.get("original") or {}
        self.compressed = metrics.get("compressed") or {}
        self.steps: list[dict[str, Any]] = [s for s in metrics.get("steps") or [] if s]
        batches = _batch_keys(self.original.get("latency_ms"), self.compressed.get("latency_ms"))
        wanted = _get(spec, "evaluate", "batch_sizes")
        first = f"batch_{wanted[0]}" if isinstance(wanted, list) and wanted else None
        self.batches = batches
        self.first_batch = first if first in batches or not batches else batches[0]

    def build(self) -> dict[str, Any]:
        accuracy_known = any(
            _number(x.get("accuracy")) is not None
            for x in (self.original, self.compressed, *self.steps)
        )
        return {
            "headline": self.headline(),
            "recipe": self.recipe(),
            "settings": self.settings(),
            "search_spec": _get(self.spec, "search"),
            "constraints": _get(self.spec, "constraints"),
            "original": self.original,
            "compressed": self.compressed,
            "model_rows": self.model_rows(),
            "latency_rows": self.latency_rows(),
            "fidelity": self.m.get("fidelity") or {},
            "ratios": self.m.get("ratios") or {},
            "stages": self.stages(),
            "first_batch": self.first_batch,
            "quality_label": "accuracy" if accuracy_known else "cosine similarity",
            "layers": self.layers(),
            "conversion": self.m.get("conversion"),
            "hardware": self.m.get("hardware"),
            "search": self.search(),
            "has_metrics": bool(self.original or self.compressed),
        }

    def headline(self) -> list[tuple[str, str, str]]:
        """(label, value, note) for the figures a reader looks at first."""
        out: list[tuple[str, str, str]] = []
        ratios = self.m.get("ratios") or {}
        if (size := _number(ratios.get("size"))) is not None:
            out.append(("smaller", f"{size:.2f}{TIMES}", "original / compressed file size"))
        for batch, value in (ratios.get("speedup") or {}).items():
            if (speedup := _number(value)) is not None and batch == self.first_batch:
                out.append(("faster", f"{speedup:.2f}{TIMES}", f"p50 latency, {_batch(batch)}"))
        before, after = (
            _number(self.original.get("accuracy")),
            _number(self.compressed.get("accuracy")),
        )
        if before is not None and after is not None:
            out.append(("accuracy", f"{after:.2%}", f"{_points(after - before)} vs original"))
        cosine = _number(_get(self.m, "fidelity", "cosine_similarity"))
        if cosine is not None:
            out.append(("cosine", f"{cosine:.4f}", "outputs vs the original's"))
        return out

    def recipe(self) -> list[dict[str, Any]]:
        """Every step of the pipeline: method, params (those that ran), runtime, format."""
        planned = _get(self.spec, "pipeline") or []
        rows = []
        count = max(len(planned), len(self.steps))
        for index in range(count):
            ran = self.steps[index] if index < len(self.steps) else {}
            plan = planned[index] if index < len(planned) else {}
            params = ran.get("params") if "params" in ran else _get(plan, "params")
            rows.append(
                {
                    "number": index + 1,
                    "method": ran.get("method") or _get(plan, "method") or "?",
                    "params": _param_items(params),
                    "seconds": _number(ran.get("seconds")),
                    "format": ran.get("format"),
                }
            )
        return rows

    def settings(self) -> list[tuple[str, Any]]:
        spec = self.spec
        evaluate = spec.get("evaluate") or {}
        target = spec.get("target") or {}
        rows: list[tuple[str, Any]] = [
            ("output format", spec.get("output_format")),
            ("target device", target.get("device")),
            ("target runtime", target.get("runtime")),
            ("batch sizes", ", ".join(str(b) for b in evaluate.get("batch_sizes") or []) or None),
            ("warm-up runs", evaluate.get("warmup")),
            ("timed runs", evaluate.get("iterations")),
        ]
        return [(key, value) for key, value in rows if value is not None]

    def model_rows(self) -> list[dict[str, Any]]:
        """The figures of ``original`` and ``compressed``, side by side, with the change."""
        o, c = self.original, self.compressed
        rows = [
            ("file size", "size_bytes", "bytes", True),
            ("gzip size", "size_bytes_gzip", "bytes", True),
            ("parameters", "parameters", "int", None),
            ("nonzero parameters", "nonzero_parameters", "int", True),
            ("sparsity", "sparsity", "pct", None),
            ("MACs per sample", "macs", "int", True),
            ("peak memory", "peak_memory_bytes", "bytes", True),
            ("accuracy", "accuracy", "pct", False),
        ]
        out = []
        for label, key, kind, lower_better in rows:
            before, after = _number(o.get(key)), _number(c.get(key))
            out.append(
                {
                    "label": label,
                    "kind": kind,
                    "original": before,
                    "compressed": after,
                    "change": _change(before, after, kind, lower_better),
                }
            )
        return out

    def latency_rows(self) -> list[dict[str, Any]]:
        o = self.original.get("latency_ms") or {}
        c = self.compressed.get("latency_ms") or {}
        speedup = _get(self.m, "ratios", "speedup") or {}
        return [
            {
                "batch": batch,
                "label": _batch(batch),
                "original": {q: _p(o, batch, q) for q in ("p50", "p95", "mean")},
                "compressed": {q: _p(c, batch, q) for q in ("p50", "p95", "mean")},
                "speedup": _number(speedup.get(batch)),
            }
            for batch in self.batches
        ]

    def stages(self) -> list[dict[str, Any]]:
        """The waterfall: the original, the model after each step, and the artifact when it
        is not the last step's model (a conversion after the last step, or no steps)."""
        batch = self.first_batch
        stages = [
            {
                "label": "original",
                "kind": "original",
                "size": _number(self.original.get("size_bytes")),
                "p50": _p(self.original.get("latency_ms"), batch),
                "p95": _p(self.original.get("latency_ms"), batch, "p95"),
                "accuracy": _number(self.original.get("accuracy")),
                "cosine": None,  # the reference itself: nothing to compare
                "sparsity": _number(self.original.get("sparsity")),
                "format": _get(self.spec, "model_format"),
            }
        ]
        for index, step in enumerate(self.steps):
            stages.append(
                {
                    "label": f"{index + 1} {step.get('method', '?')}",
                    "kind": "step",
                    "size": _number(step.get("size_bytes")),
                    "p50": _p(step.get("latency_ms"), batch),
                    "p95": _p(step.get("latency_ms"), batch, "p95"),
                    "accuracy": _number(step.get("accuracy")),
                    "cosine": _number(_get(step, "fidelity", "cosine_similarity")),
                    "sparsity": _number(step.get("sparsity")),
                    "format": step.get("format"),
                    "iterations": step.get("latency_iterations"),
                    "seconds": _number(step.get("seconds")),
                }
            )
        artifact_format = _get(self.m, "conversion", "format") or self.spec.get("output_format")
        last_format = self.steps[-1].get("format") if self.steps else None
        if self.compressed and (not self.steps or last_format != artifact_format):
            stages.append(
                {
                    "label": f"artifact ({artifact_format})" if artifact_format else "artifact",
                    "kind": "artifact",
                    "size": _number(self.compressed.get("size_bytes")),
                    "p50": _p(self.compressed.get("latency_ms"), batch),
                    "p95": _p(self.compressed.get("latency_ms"), batch, "p95"),
                    "accuracy": _number(self.compressed.get("accuracy")),
                    "cosine": _number(_get(self.m, "fidelity", "cosine_similarity")),
                    "sparsity": _number(self.compressed.get("sparsity")),
                    "format": artifact_format,
                }
            )
        elif stages[1:]:
            stages[-1]["kind"] = "artifact"
        return stages

    def layers(self) -> list[dict[str, Any]]:
        """``metrics.layers``; a layer's sparsity figure that a later step's entry dropped
        (quantizing a pruned layer keeps its zeros but reports none) is taken from the last
        step that measured one, and says which step that was."""
        layers = self.m.get("layers") or {}
        measured: dict[str, tuple[float, int]] = {}
        for index, step in enumerate(self.steps):
            for name, entry in (step.get("layers") or {}).items():
                if isinstance(entry, Mapping) and _number(entry.get("sparsity")) is not None:
                    measured[str(name)] = (float(entry["sparsity"]), index + 1)
        rows = []
        for name, entry in layers.items():
            if not isinstance(entry, Mapping):
                continue
            steps = entry.get("steps") or []
            sparsity, after = _number(entry.get("sparsity")), None
            if sparsity is None and str(name) in measured:
                sparsity, after = measured[str(name)]
            rows.append(
                {
                    "name": str(name),
                    "status": entry.get("status"),
                    "dtype": entry.get("dtype"),
                    "sparsity": sparsity,
                    "sparsity_after": after,
                    "clipped": _number(entry.get("clipped")),
                    "rank": entry.get("rank"),
                    "reason": entry.get("reason"),
                    "steps": ", ".join(str(s + 1) for s in steps if isinstance(s, int)),
                }
            )
        return rows

    def search(self) -> dict[str, Any] | None:
        search = self.m.get("search")
        if not isinstance(search, Mapping):
            return None
        pareto = {n for n in search.get("pareto") or [] if isinstance(n, int)}
        best = search.get("best")
        trials = []
        for trial in search.get("trials") or []:
            if not isinstance(trial, Mapping):
                continue
            metrics = trial.get("metrics") or {}
            compressed = metrics.get("compressed") or {}
            original = metrics.get("original") or {}
            latency = compressed.get("latency_ms")
            batch = self.first_batch if _p(latency, self.first_batch) is not None else None
            batch = batch or next(iter(_batch_keys(latency)), None)
            accuracy = _number(compressed.get("accuracy"))
            before = _number(original.get("accuracy"))
            number = trial.get("number")
            trials.append(
                {
                    "number": number,
                    "status": trial.get("status"),
                    "pipeline": [
                        (_get(step, "method") or "?", _param_items(_get(step, "params")))
                        for step in trial.get("pipeline") or []
                    ],
                    "output_format": trial.get("output_format"),
                    "runtime": trial.get("runtime"),
                    "size": _number(compressed.get("size_bytes")),
                    "latency": _p(latency, batch),
                    "latency_batch": batch,
                    "accuracy": accuracy,
                    "accuracy_drop": before - accuracy
                    if before is not None and accuracy is not None
                    else None,
                    "cosine": _number(_get(metrics, "fidelity", "cosine_similarity")),
                    "feasible": trial.get("feasible"),
                    "violations": [
                        v for v in trial.get("violations") or [] if isinstance(v, Mapping)
                    ],
                    "seconds": _number(trial.get("seconds")),
                    "error": _get(trial, "error", "message"),
                    "pareto": number in pareto,
                    "best": number is not None and number == best,
                }
            )
        return {
            "trials": trials,
            "pareto": sorted(pareto),
            "best": best,
            "met": search.get("met"),
            "unmet": [u for u in search.get("unmet") or [] if isinstance(u, Mapping)],
            "holdout": search.get("holdout")
            if isinstance(search.get("holdout"), Mapping)
            else None,
            "sensitivity": _sensitivity(search.get("sensitivity")),
        }


def _sensitivity(value: Any) -> dict[str, Any] | None:
    """``{layer: figure or {key: figure}}`` as columns and rows, nested keys joined by '.'."""
    if not isinstance(value, Mapping) or not value:
        return None
    rows: list[tuple[str, dict[str, Any]]] = []
    columns: list[str] = []

    def flatten(prefix: str, item: Any, into: dict[str, Any]) -> None:
        if isinstance(item, Mapping):
            for key, sub in item.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), sub, into)
        else:
            into[prefix or "value"] = item

    for layer, entry in value.items():
        cells: dict[str, Any] = {}
        flatten("", entry, cells)
        for key in cells:
            if key not in columns:
                columns.append(key)
        rows.append((str(layer), cells))
    return {"columns": columns, "rows": rows}


def _param_items(params: Any) -> list[tuple[str, str]]:
    if not isinstance(params, Mapping):
        return []
    return [(str(k), json.dumps(v, default=str)) for k, v in params.items()]


def _batch(key: str) -> str:
    return key.replace("batch_", "batch ") if key else ""


def _points(delta: float) -> str:
    return f"{delta * 100:+.2f} pt".replace("-", MINUS)


def _change(before: float | None, after: float | None, kind: str, lower_better: bool | None) -> str:
    if before is None or after is None:
        return ""
    if kind == "pct":
        return _points(after - before)
    if before == 0:
        return ""
    ratio = after / before - 1
    return f"{ratio:+.1%}".replace("-", MINUS) if abs(ratio) >= 0.0005 else "="


# --- formatting (template filters) ----------------------------------------------------


def fmt_bytes(value: Any) -> str | Markup:
    n = _number(value)
    if n is None:
        return ABSENT
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return Markup('<span title="{} bytes">{:.1f} {}</span>').format(
                f"{int(n):,}", n / size, unit
            )
    return f"{int(n):,} B"


def fmt_int(value: Any) -> str | Markup:
    n = _number(value)
    return ABSENT if n is None else f"{int(n):,}"


def fmt_pct(value: Any, digits: int = 2) -> str | Markup:
    n = _number(value)
    return ABSENT if n is None else f"{n * 100:.{digits}f} %"


def fmt_ms(value: Any) -> str | Markup:
    n = _number(value)
    return ABSENT if n is None else f"{_sig(n)} ms"


def fmt_num(value: Any, digits: int = 4) -> str | Markup:
    n = _number(value)
    if n is None:
        return ABSENT if value is None or isinstance(value, int | float) else str(value)
    return f"{n:.{digits}g}"


def fmt_seconds(value: Any) -> str | Markup:
    n = _number(value)
    return ABSENT if n is None else f"{_sig(n)} s"


def fmt_times(value: Any) -> str | Markup:
    n = _number(value)
    return ABSENT if n is None else f"{n:.2f}{TIMES}"


def fmt_value(value: Any) -> str | Markup:
    """A figure of unknown kind (constraint bounds, sensitivity cells): numbers compactly,
    mappings as JSON, absent as absent."""
    if value is None:
        return ABSENT
    if isinstance(value, bool):
        return "yes" if value else "no"
    if (n := _number(value)) is not None:
        return _figure(n)
    if isinstance(value, Mapping) and _number(value.get("value")) is not None:
        # an interval (DESIGN §12 held-out figures): value, n, ci95
        text = f"{value['value']:.4g}"
        extra = [f"n {value['n']}"] if isinstance(value.get("n"), int) else []
        ci = value.get("ci95")
        if isinstance(ci, list) and len(ci) == 2 and all(_number(c) is not None for c in ci):
            extra.append(f"95 % CI {ci[0]:.4g} to {ci[1]:.4g}")
        return f"{text} ({', '.join(extra)})" if extra else text
    if isinstance(value, list) and len(value) == 2 and all(_number(c) is not None for c in value):
        return f"{value[0]:.4g} to {value[1]:.4g}"
    if isinstance(value, Mapping | list):
        return _compact(value) or "none"
    return str(value)


def _figure(n: float) -> str:
    """Whole numbers in full (a size bound of 64,266 bytes), others to 4 significant digits."""
    if float(n).is_integer() and abs(n) < 1e15:
        return f"{int(n):,}"
    return f"{n:.4g}"


def _compact(value: Any) -> str:
    """A nested figure in a line: ``key: value`` pairs (unset ones left out), a nested
    mapping in parentheses, lists joined."""
    if isinstance(value, Mapping):
        return "; ".join(
            f"{k} ({_compact(v)})" if isinstance(v, Mapping) else f"{k}: {_compact(v)}"
            for k, v in value.items()
            if v is not None
        )
    if isinstance(value, list):
        return ", ".join(_compact(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if (n := _number(value)) is not None:
        return _figure(n)
    return str(value)


def _sig(value: float, digits: int = 3) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


@functools.cache
def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=fmt_bytes, int=fmt_int, pct=fmt_pct, ms=fmt_ms, num=fmt_num,
        seconds=fmt_seconds, times=fmt_times, value=fmt_value, batch=_batch,
    )  # fmt: skip
    return env


# --- charts -----------------------------------------------------------------------------


_RC: dict[str, Any] = {
    "svg.fonttype": "none",  # text stays text (small, selectable), escaped by matplotlib
    "svg.hashsalt": "squish-card",  # the same figures draw the same SVG
    "text.parse_math": False,  # a layer named "$x$" is a name, not TeX
    "font.family": "DejaVu Sans",  # bundled with matplotlib; the SVG names fallbacks too
    "font.size": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
}


class _Charts:
    """The card's charts as inline SVG (Markup), None where there is nothing measured."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def style(self) -> Iterator[None]:
        import matplotlib

        with matplotlib.rc_context(_RC):  # type: ignore[arg-type]
            yield

    def svg(self, fig: Figure, label: str) -> Markup:
        """The figure as an ``<svg>`` element for inlining: no XML prolog, metadata or
        namespaces' URLs, ids made unique in the page, sized by CSS."""
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        self.count += 1
        prefix = f"c{self.count}-"
        text = buffer.getvalue()
        text = text[text.index("<svg") :]
        text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
        text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
        text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}\1"', text)
        text = re.sub(r'\bhref="#([^"]+)"', rf'href="#{prefix}\1"', text)
        text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", text)
        text = text.replace("'DejaVu Sans'", "'DejaVu Sans', Helvetica, Arial, sans-serif")
        text = re.sub(
            r'<svg\s+width="([^"]*)"\s+height="[^"]*"',
            lambda m: Markup(
                '<svg class="chart" style="max-width: {}" role="img" aria-label="{}"'
            ).format(m[1], label),
            text,
            count=1,
        )
        return Markup(text)  # matplotlib's SVG writer escapes the text it draws

    @staticmethod
    def figure(width: float, height: float, **margins: float) -> Figure:
        """A figure with fixed margins (inches from each edge; a layout engine costs more
        time than the drawing)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width, height))
        edges = {"left": 0.55, "right": 0.15, "bottom": 0.45, "top": 0.3} | margins
        fig.subplots_adjust(
            left=edges["left"] / width,
            right=1 - edges["right"] / width,
            bottom=edges["bottom"] / height,
            top=1 - edges["top"] / height,
            wspace=edges.get("wspace", 0.3),
        )
        return fig

    def waterfall(self, stages: list[dict[str, Any]], quality: str) -> Markup | None:
        """Size, latency (p50, whisker to p95) and accuracy or fidelity after each step."""
        if len(stages) < 2:
            return None
        quality_key = "accuracy" if quality == "accuracy" else "cosine"
        panels = [
            ("file size (KiB)", "size", 1 / 1024),
            ("latency p50 (ms), whisker: p95", "p50", 1.0),
            (quality, quality_key, 1.0),
        ]
        if all(s[key] is None for _title, key, _scale in panels for s in stages):
            return None
        fig = self.figure(9.2, 3.2, bottom=1.05, wspace=0.32)
        axes = fig.subplots(1, 3)
        labels = [s["label"] for s in stages]
        colors = [_COLORS[s["kind"] if s["kind"] != "artifact" else "artifact"] for s in stages]
        x = list(range(len(stages)))
        for ax, (title, key, scale) in zip(axes, panels, strict=True):
            ax.set_title(title, loc="left")
            values = [None if s[key] is None else s[key] * scale for s in stages]
            if key == quality_key:
                self._quality_line(ax, x, values, colors)
            else:
                self._bars(
                    ax, x, values, colors, [s.get("p95") for s in stages] if key == "p50" else None
                )
            ax.set_xticks(x, labels, rotation=30, ha="right", rotation_mode="anchor")
        return self.svg(fig, "per-step waterfall: size, latency and " + quality)

    @staticmethod
    def _bars(
        ax: Axes, x: list[int], values: list[float | None], colors: list[str],
        whiskers: list[float | None] | None,
    ) -> None:  # fmt: skip
        known = [v for v in values if v is not None]
        top = max(known + [w for w in whiskers or [] if w is not None], default=1.0) or 1.0
        previous: float | None = None
        for i, value in enumerate(values):
            if value is None:
                ax.text(i, top * 0.02, "not\nmeasured", ha="center", va="bottom", color="#999999",
                        fontsize=7, style="italic")  # fmt: skip
                continue
            ax.bar(i, value, color=colors[i], width=0.62)
            whisker = whiskers[i] if whiskers is not None else None
            if whisker is not None:
                ax.errorbar(i, value, yerr=[[0.0], [max(0.0, whisker - value)]], fmt="none",
                            ecolor="#333333", capsize=3, linewidth=0.9)  # fmt: skip
            label = _sig(value)
            if previous:
                label += "\n" + f"{value / previous - 1:+.0%}".replace("-", MINUS)
            above = max(value, whisker or value)
            ax.text(i, above + top * 0.02, label, ha="center", va="bottom", fontsize=7)
            previous = value
        ax.set_ylim(0, top * 1.28)
        ax.set_xlim(-0.6, len(values) - 0.4)

    @staticmethod
    def _quality_line(
        ax: Axes, x: list[int], values: list[float | None], colors: list[str]
    ) -> None:
        points = [(i, v) for i, v in zip(x, values, strict=True) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], color="#555555",
                    linewidth=1.0, zorder=1)  # fmt: skip
            ax.scatter([p[0] for p in points], [p[1] for p in points],
                       c=[colors[p[0]] for p in points], s=28, zorder=2)  # fmt: skip
            low, high = min(p[1] for p in points), max(p[1] for p in points)
            pad = max((high - low) * 0.25, abs(high) * 0.002, 1e-6)
            ax.set_ylim(low - pad * 2, high + pad * 2)
            for i, v in points:
                ax.annotate(f"{v:.4f}", (i, v), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7)  # fmt: skip
        for i, value in zip(x, values, strict=True):
            if value is None:
                ax.annotate("not measured" if i else "reference", (i, 0.04),
                            xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                            color="#999999", style="italic")  # fmt: skip
        ax.set_xlim(-0.6, len(values) - 0.4)

    def latency(self, rows: list[dict[str, Any]]) -> Markup | None:
        """Original vs compressed latency per batch size: p50 bars, whiskers to p95, mean dots."""
        rows = [
            r
            for r in rows
            if r["original"]["p50"] is not None or r["compressed"]["p50"] is not None
        ]
        if not rows:
            return None
        fig = self.figure(min(9.2, 1.2 + 2.2 * len(rows)), 2.5, wspace=0.45)
        axes = fig.subplots(1, len(rows), squeeze=False)[0]
        for ax, row in zip(axes, rows, strict=True):
            ax.set_title(row["label"], loc="left")
            for i, (name, color) in enumerate(
                (("original", _COLORS["original"]), ("compressed", _COLORS["artifact"]))
            ):
                figures = row[name]
                if figures["p50"] is None:
                    ax.text(i, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7,
                            color="#999999", style="italic")  # fmt: skip
                    continue
                ax.bar(i, figures["p50"], color=color, width=0.6)
                if figures["p95"] is not None:
                    ax.errorbar(i, figures["p50"], fmt="none", ecolor="#333333", capsize=4,
                                linewidth=0.9, yerr=[[0], [max(0.0, figures["p95"] - figures["p50"])]])  # fmt: skip
                if figures["mean"] is not None:
                    ax.plot([i], [figures["mean"]], marker="D", color="#222222", markersize=3.5)
                ax.text(i, (figures["p95"] or figures["p50"]) * 1.04, f"{_sig(figures['p50'])}",
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
            ax.set_xticks([0, 1], ["original", "compressed"])
            ax.set_ylabel("ms")
            ax.set_xlim(-0.7, 1.7)
            top = max(
                (v for name in ("original", "compressed") for v in row[name].values() if v),
                default=1.0,
            )
            ax.set_ylim(0, top * 1.25)
        return self.svg(fig, "latency per batch size: p50, p95 and mean, original vs compressed")

    def layer_sparsity(self, layers: list[dict[str, Any]]) -> Markup | None:
        """Sparsity of each layer that has a figure, coloured by changed/kept."""
        rows = [r for r in layers if r["sparsity"] is not None][:MAX_LAYER_BARS]
        if not rows:
            return None
        height = 0.9 + 0.18 * len(rows)
        longest = max(len(r["name"]) for r in rows)
        fig = self.figure(7.0, height, left=min(3.4, 0.3 + 0.065 * longest), bottom=0.5)
        ax = fig.subplots()
        y = list(range(len(rows)))
        colors = [
            _COLORS["step"] if r["status"] == "changed" else _COLORS["original"] for r in rows
        ]
        ax.barh(y, [r["sparsity"] * 100 for r in rows], color=colors, height=0.7)
        ax.set_yticks(y, [r["name"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("zero weights (%)")
        ax.grid(axis="x")
        ax.grid(axis="y", visible=False)
        ax.set_title("sparsity per layer", loc="left")
        return self.svg(fig, "sparsity per layer")

    def pareto(self, search: dict[str, Any]) -> Markup | None:
        """Trials by latency (x) and size (y), coloured by accuracy (or cosine): feasible ones
        filled, infeasible ones as crosses, the Pareto front joined, the best one ringed."""
        trials = [t for t in search["trials"] if t["latency"] is not None and t["size"] is not None]
        if not trials:
            return None
        key = "accuracy" if any(t["accuracy"] is not None for t in trials) else "cosine"
        scores = [t[key] for t in trials if t[key] is not None]
        from matplotlib.colors import Normalize

        low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
        if low == high:
            low, high = low - 1e-3, high + 1e-3
        norm = Normalize(low, high)
        fig = self.figure(7.2, 4.2, bottom=0.6)
        ax = fig.subplots()
        cmap = "viridis"
        mappable = None
        for feasible, marker, label in ((True, "o", "feasible"), (False, "X", "infeasible")):
            group = [t for t in trials if bool(t["feasible"]) is feasible]
            scored = [t for t in group if t[key] is not None]
            unscored = [t for t in group if t[key] is None]
            if scored:
                mappable = ax.scatter(
                    [t["latency"] for t in scored], [t["size"] / 1024 for t in scored],
                    c=[t[key] for t in scored], cmap=cmap, norm=norm, marker=marker, s=46,
                    edgecolors="#222222" if feasible else "none", linewidths=0.6, label=label,
                    zorder=3,
                )  # fmt: skip
            if unscored:
                ax.scatter(
                    [t["latency"] for t in unscored], [t["size"] / 1024 for t in unscored],
                    color="#bbbbbb", marker=marker, s=46, label=f"{label}, {key} not measured",
                    zorder=3,
                )  # fmt: skip
        front = sorted((t for t in trials if t["pareto"]), key=lambda t: t["latency"])
        if len(front) > 1:
            ax.step([t["latency"] for t in front], [t["size"] / 1024 for t in front],
                    where="post", color="#999999", linewidth=1, zorder=2, label="Pareto front")  # fmt: skip
        for t in trials:
            ax.annotate(str(t["number"]), (t["latency"], t["size"] / 1024), fontsize=6.5,
                        textcoords="offset points", xytext=(5, 4), color="#444444")  # fmt: skip
        best = [t for t in trials if t["best"]]
        if best:
            ax.scatter([best[0]["latency"]], [best[0]["size"] / 1024], s=260, facecolors="none",
                       edgecolors=_COLORS["accent"], linewidths=2, zorder=4,
                       label=f"best (trial {best[0]['number']})")  # fmt: skip
        if mappable is not None:
            fig.colorbar(mappable, ax=ax, label=key, shrink=0.85)
        batch = next((t["latency_batch"] for t in trials if t["latency_batch"]), None)
        ax.set_xlabel(f"latency p50 (ms, {_batch(batch)})" if batch else "latency p50 (ms)")
        ax.set_ylabel("size (KiB)")
        ax.grid(axis="x")
        ax.legend(fontsize=7, loc="best", frameon=False)
        ax.set_title("trials: latency vs size", loc="left")
        missing = len(search["trials"]) - len(trials)
        if missing:
            ax.annotate(f"{missing} trial(s) without a latency or size: not plotted",
                        (0, -0.16), xycoords="axes fraction", fontsize=7, color="#777777")  # fmt: skip
        return self.svg(fig, "Pareto plot of the search's trials: latency vs size")
