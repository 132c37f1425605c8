"""The compression card (worker/card.py): rendered from a real job's metrics, self-contained,
escaped, honest about what was not measured; stored by the worker as artifact `card`."""

from __future__ import annotations

import copy
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.factories import digits_npz, tiny_mlp_onnx
from worker.card import FileRef, render_card

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


class Page(HTMLParser):
    """Every tag and attribute of a document."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def named(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_self_contained(html: str) -> Page:
    """Nothing that runs, nothing that loads: no script, no external resource of any kind."""
    page = Page(html)
    assert "http://" not in html and "https://" not in html
    for tag, attrs in page.tags:
        assert tag not in {"script", "link", "iframe", "img", "object", "embed", "base"}, tag
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert "src" not in attrs, (tag, attrs)
        for name in ("href", "xlink:href"):  # in-page references and inline images only
            assert (attrs.get(name) or "#").startswith(("#", "data:image/png;base64,")), tag
    [csp] = [a for a in page.named("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert (csp["content"] or "").startswith("default-src 'none'")
    return page


def row(html: str, label: str) -> str:
    """The table row whose first cell is ``label``."""
    match = re.search(rf"<tr><td>{re.escape(label)}</td>.*?</tr>", html, flags=re.S)
    assert match, label
    return match.group(0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render(metrics: dict[str, Any], spec: dict[str, Any], **kwargs: Any) -> str:
    kwargs.setdefault("model", FileRef("a" * 64))
    kwargs.setdefault("artifact", FileRef("b" * 64))
    return render_card(job_id="job_card", spec=spec, metrics=metrics, **kwargs)


def check_figures_and_charts(html: str, job: dict[str, Any]) -> None:
    """The recipe, versions, hardware, charts, figures and layers of a real job's card."""
    metrics = job["metrics"]
    page = assert_self_contained(html)
    # The recipe: every step, with the params that ran (hardware defaults filled in).
    recipe = html[html.index('id="recipe"') : html.index('id="metrics"')]
    for step in metrics["steps"]:
        assert step["method"] in recipe
        for key in step["params"]:
            assert f"<code>{key}=" in recipe
    # Versions and hardware, read on this machine.
    import torch

    assert f"<th>torch</th><td>{torch.__version__}</td>" in html
    assert ", ".join(metrics["hardware"]["cpu"]["instruction_sets"]) in html
    # Real charts: the waterfall, the latency spread and the per-layer sparsity, as inline
    # SVG with ids unique in the page.
    labels = [attrs.get("aria-label") or "" for attrs in page.named("svg")]
    assert any(label.startswith("per-step waterfall") for label in labels)
    assert any(label.startswith("latency per batch size") for label in labels)
    assert "sparsity per layer" in labels
    ids = [attrs["id"] for _tag, attrs in page.tags if attrs.get("id")]
    assert len(ids) == len(set(ids))
    # Figures, formatted; per-layer changes: every layer the job reports.
    assert f"{metrics['compressed']['accuracy'] * 100:.2f} %" in row(html, "accuracy")
    assert row(html, "batch 8")
    for name in metrics["layers"]:
        assert f'<td class="mono">{name}</td>' in html


def check_escaping(job: dict[str, Any]) -> None:
    """User-controlled strings in params, names and warnings are text, never markup."""
    metrics = copy.deepcopy(job["metrics"])
    metrics["steps"][0]["params"]["scope"] = EVIL
    html = render(
        metrics, job["spec"], model=FileRef("a" * 64, name=EVIL),
        datasets={"eval": FileRef("c" * 64, name=EVIL)}, warnings=[f"a warning naming {EVIL}"],
    )  # fmt: skip
    assert_self_contained(html)
    assert "<script>" not in html and "<img" not in html
    assert html.count("&lt;script&gt;alert(") == 4  # model, dataset, param, warning


def check_absent(job: dict[str, Any]) -> None:
    """A figure that was not measured is shown as absent, never as 0."""
    metrics = copy.deepcopy(job["metrics"])
    for key in ("accuracy", "peak_memory_bytes", "macs"):
        metrics["compressed"].pop(key)
    metrics["compressed"]["latency_ms"].pop("batch_8")
    metrics["ratios"]["speedup"].pop("batch_8")
    metrics["steps"][0].pop("latency_ms")
    html = render(metrics, job["spec"])
    assert_self_contained(html)
    for label in ("accuracy", "peak memory", "MACs per sample"):
        cells = re.findall(r'<td class="n">(.*?)</td>', row(html, label))
        assert cells[0] != cells[1] and 'class="absent"' in cells[1], (label, cells)
        assert cells[2] == "", (label, cells)  # no change computed against nothing
    latency = row(html, "batch 8")
    assert latency.count('class="absent"') == 4  # compressed p50, p95, mean, speedup
    steps = html[html.index('id="steps"') : html.index('id="layers"')]
    assert 'class="absent"' in row(steps, "1 prune.magnitude")
    assert "not measured" in steps  # and the waterfall says so where its bar would be


SEARCH = {
    "objectives": ["latency", "size"],
    "trials": [
        {
            "number": 0,
            "pipeline": [{"method": "quantize.dynamic", "params": {}}],
            "output_format": "onnx",
            "runtime": "onnxruntime",
            "status": "succeeded",
            "feasible": True,
            "violations": [],
            "seconds": 1.5,
            "metrics": {
                "original": {"accuracy": 0.97},
                "compressed": {"size_bytes": 24000, "accuracy": 0.965,
                               "latency_ms": {"batch_1": {"p50": 0.03, "p95": 0.04, "mean": 0.03}}},
                "fidelity": {"cosine_similarity": 0.999, "mse": 0.1, "max_abs_error": 0.5},
                "ratios": {"size": 3.5},
            },
        },
        {
            "number": 1,
            "pipeline": [{"method": "prune.magnitude", "params": {"amount": 0.9}}],
            "output_format": "pt2",
            "runtime": "torch",
            "status": "succeeded",
            "feasible": False,
            "violations": [{"constraint": "accuracy_drop", "bound": 0.01, "measured": 0.2}],
            "seconds": 2.0,
            "metrics": {
                "original": {"accuracy": 0.97},
                "compressed": {"size_bytes": 80000, "accuracy": 0.77,
                               "latency_ms": {"batch_1": {"p50": 0.4, "p95": 0.5, "mean": 0.4}}},
                "ratios": {"size": 1.05},
            },
        },
        {"number": 2, "pipeline": [{"method": "distill", "params": {}}], "status": "failed",
         "output_format": "pt2", "runtime": "torch",
         "error": {"code": "method_failed", "message": "distill needs a train dataset"}},
    ],
    "pareto": [0],
    "best": 0,
    "met": True,
    "unmet": [],
    "sensitivity": {"fc1": {"parameters": 8192, "quantized_cosine": 0.9991,
                            "pruned_accuracy": 0.95}, EVIL: {"quantized_cosine": 0.5}},
    "holdout": {"accuracy": {"value": 0.964, "n": 540, "ci95": [0.948, 0.98]}, "n": 540},
}  # fmt: skip


def test_a_search_card_has_the_pareto_plot_and_the_trial_and_sensitivity_tables() -> None:
    from worker.schemas import SearchMetrics

    assert SearchMetrics.model_validate(SEARCH).to_json() == SEARCH  # the contract's shape
    html = render_card(
        job_id="job_search",
        spec={"search": {"objectives": ["latency", "size"],
                         "constraints": {"accuracy_drop": 0.01, "size_bytes": 64266}},
              "evaluate": {"batch_sizes": [1]}},
        metrics={"search": SEARCH},
        model=FileRef("a" * 64),
        artifact=None,
    )  # fmt: skip
    page = assert_self_contained(html)
    assert "<script>" not in html
    labels = [attrs.get("aria-label") or "" for attrs in page.named("svg")]
    assert any(label.startswith("Pareto plot") for label in labels)
    search = html[html.index('id="search"') : html.index('id="machine"')]
    assert "Every constraint is met by trial 0" in search
    assert '<span class="tag best">best</span>' in search
    assert "accuracy_drop: 0.2 vs 0.01" in search  # the infeasible trial's violation
    assert "64,266" in html and "6.427e" not in html  # a size bound in full
    assert [search.count(f"<tr><td>{n}") for n in range(3)] == [1, 1, 1]  # every trial
    assert search.count('<tr><td class="mono">') == 2  # a sensitivity row per layer
    assert "quantized_cosine" in search and "pruned_accuracy" in search
    assert "&lt;script&gt;" in search  # a layer name, escaped
    assert "0.964 (n 540, 95 % CI 0.948 to 0.98)" in search  # the held-out interval
    # A trial that measured nothing is listed with why, and drawn nowhere.
    assert "distill needs a train dataset" in search
    assert "1 trial(s) without a latency or size" in search


# --- the worker stores it ----------------------------------------------------------------


@pytest.fixture
def api(embedded: dict[str, str]) -> Any:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(run_reaper=False)) as client:
        client.headers["Authorization"] = f"Bearer {embedded['alice']}"
        yield client


def _submit(api: Any, tmp_path: Path, *, prune: bool = True) -> tuple[str, Path, Path]:
    model_path = tiny_mlp_onnx(tmp_path / "mlp.onnx", trained=False)
    data_path = digits_npz(tmp_path / "digits.npz")
    steps = [{"method": "quantize.dynamic", "params": {}}]
    if prune:
        steps.insert(0, {"method": "prune.magnitude", "params": {"amount": 0.5}})
    with model_path.open("rb") as fh:
        model = api.post("/v1/models", files={"file": ("mlp.onnx", fh)}, data={"name": EVIL})
    assert model.status_code == 201, model.text
    with data_path.open("rb") as fh:
        dataset = api.post("/v1/datasets", files={"file": ("digits.npz", fh)})
    assert dataset.status_code == 201, dataset.text
    job = api.post(
        "/v1/jobs",
        json={
            "model_id": model.json()["id"],
            "pipeline": steps,
            "datasets": {"eval": dataset.json()["id"]},
            "evaluate": {"batch_sizes": [1, 8] if prune else [1], "warmup": 0, "iterations": 1},
        },
    )
    assert job.status_code == 202, job.text
    return job.json()["id"], model_path, data_path


def test_a_real_jobs_card_is_listed_served_as_html_and_shows_what_the_job_did(
    api: Any, tmp_path: Path
) -> None:
    from worker import tasks

    job_id, model_path, data_path = _submit(api, tmp_path)
    assert tasks.run_job(job_id) == "succeeded"
    job = api.get(f"/v1/jobs/{job_id}").json()
    artifacts = {a["name"]: a for a in job["artifacts"]}
    assert set(artifacts) == {"model", "report", "card"}
    card = artifacts["card"]
    assert card["media_type"] == "text/html" and card["filename"] == f"{job_id}-card.html"
    answer = api.get(card["url"])
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert hashlib.sha256(answer.content).hexdigest() == card["sha256"]
    html = answer.text
    assert "<script>" not in html and "&lt;script&gt;" in html  # the model's name, escaped
    # Identity: the hashes of the model, the dataset and the artifact.
    for digest in (sha(model_path), sha(data_path), artifacts["model"]["sha256"]):
        assert digest in html
    assert job_id in html
    check_figures_and_charts(html, job)
    # The same job's figures, re-rendered with hostile strings and with figures left out.
    check_escaping(job)
    check_absent(job)


def test_a_card_that_cannot_be_rendered_does_not_fail_the_job(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import card, tasks

    def broken(**_kwargs: Any) -> str:
        raise ValueError("no chart for you")

    monkeypatch.setattr(card, "render_card", broken)
    job_id, _model, _data = _submit(api, tmp_path, prune=False)
    assert tasks.run_job(job_id) == "succeeded"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert {a["name"] for a in job["artifacts"]} == {"model", "report"}
    events = api.get(f"/v1/jobs/{job_id}/events").text
    assert "compression card not rendered: ValueError: no chart for you" in events
