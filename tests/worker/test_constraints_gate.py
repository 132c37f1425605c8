"""Constraints on a pipeline job as a CI gate: checked at POST (422), judged by the worker
after the pipeline (a violation fails the job `constraints_unmet`, naming each violated
constraint with its measured value, metrics and artifacts kept), and `squish compress`
exiting 1 with the violations, through the server and with ``--local``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner, Result

from squish import Client
from squish.cli import cli, constraints_from_options
from tests.factories import digits_npz, tiny_mlp_onnx
from tests.squish.conftest import engine_runs, live, worker  # noqa: F401
from tests.squish.service import InProcessWorker, Live

QUICK = ("--warmup", "0", "--iterations", "1", "--poll-interval", "0")


@pytest.fixture
def squish(live: Live, monkeypatch: pytest.MonkeyPatch) -> Any:  # noqa: F811
    monkeypatch.delenv("SQUISH_URL", raising=False)
    monkeypatch.delenv("SQUISH_API_KEY", raising=False)

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--url", live.url, "--api-key", live.api_key, *args])

    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    return {
        "model": tiny_mlp_onnx(root / "net.onnx", trained=False),
        "eval": digits_npz(root / "eval.npz"),
        "calibration": digits_npz(root / "calib.npz", split="train", labels=False),
    }


@pytest.fixture
def inputs(files: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {role: shutil.copyfile(path, tmp_path / path.name) for role, path in files.items()}


def test_the_flags_become_the_spec_constraints() -> None:
    assert constraints_from_options(1.0, 0.99, ("0.5", "32=2"), 2_000_000, ("1.5",)) == {
        "accuracy_drop": 0.01,
        "cosine_similarity": 0.99,
        "latency_ms": {"batch_1": 0.5, "batch_32": 2.0},
        "size_bytes": 2_000_000,
        "speedup": {"batch_1": 1.5},
    }
    # Without BATCH= a per-batch bound is for the first batch size measured.
    bounds = constraints_from_options(None, None, (), None, ("1.5", "batch_64=3"), first_batch=8)
    assert bounds == {"speedup": {"batch_8": 1.5, "batch_64": 3.0}}
    with pytest.raises(click.BadParameter, match="not VALUE or BATCH=VALUE"):
        constraints_from_options(None, None, ("fast",), None, ())


def test_constraints_that_cannot_be_judged_are_refused_at_post(
    live: Live,  # noqa: F811
    inputs: dict[str, Path],
) -> None:
    auth = {"Authorization": f"Bearer {live.api_key}"}
    with Client(live.url, live.api_key, backoff=0.0) as client:
        model_id = client.upload_model(inputs["model"])["id"]
        calibration = client.upload_dataset(inputs["calibration"])["id"]
        cases = {
            # No labelled eval data: accuracy cannot be measured; nor fidelity without eval.
            ("constraints", "accuracy_drop"): {"accuracy_drop": 0.01},
            ("constraints", "cosine_similarity"): {"cosine_similarity": 0.9},
            ("constraints", "speedup", "batch_32"): {"speedup": {"batch_32": 1.5}},
        }
        for loc, constraints in cases.items():
            answer = httpx.post(
                f"{live.url}/v1/jobs",
                headers=auth,
                json={
                    "model_id": model_id,
                    "pipeline": [{"method": "quantize.dynamic"}],
                    "datasets": {"calibration": calibration},
                    "constraints": constraints,
                },
            )
            assert answer.status_code == 422, answer.text
            assert [e["loc"] for e in answer.json()["errors"]] == [list(loc)]
        wrong = httpx.post(
            f"{live.url}/v1/jobs",
            headers=auth,
            json={
                "model_id": model_id,
                "pipeline": [{"method": "quantize.dynamic"}],
                "constraints": {"speedup": {"b1": 2}, "accuracy": 0.5},
            },
        )
        assert wrong.status_code == 422
        assert live.job_ids() == []


def test_a_violated_constraint_fails_the_job_keeping_metrics_and_artifacts(
    squish: Any,
    live: Live,  # noqa: F811
    worker: InProcessWorker,  # noqa: F811
    inputs: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "gate" / "net.small.onnx"
    worker.serve()
    result = squish(
        "compress", str(inputs["model"]), "-m", "quantize.dynamic", "-d", f"eval={inputs['eval']}",
        "--max-size-bytes", "1", "--min-cosine", "0.5", "--max-latency-ms", "60000",
        "--out", str(out), *QUICK,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    (job_id,) = live.job_ids()
    with Client(live.url, live.api_key, backoff=0.0) as client:
        job = client.get_job(job_id)
    assert job["status"] == "failed"
    error = job["error"]
    assert error["code"] == "constraints_unmet" and error["step"] == "constraints"
    size = job["metrics"]["compressed"]["size_bytes"]
    assert f"size_bytes ≤ 1: measured {size:.4g}" in error["message"]
    # Only the violated bound is named; the met ones (cosine, latency) are not.
    assert error["violations"] == [{"constraint": "size_bytes", "bound": 1.0, "measured": size}]
    assert "cosine_similarity" not in error["message"] and "latency" not in error["message"]
    assert job["metrics"]["fidelity"]["cosine_similarity"] >= 0.5
    # The CLI says why, and still writes the model that did not pass; the API serves it.
    assert "constraints_unmet" in result.stderr and "size_bytes ≤ 1" in result.stderr
    assert {a["name"] for a in job["artifacts"]} >= {"model", "report"}
    assert out.read_bytes() == live.artifact_bytes(job_id, "model", tmp_path)


def test_constraints_that_hold_let_the_job_succeed(
    squish: Any,
    live: Live,  # noqa: F811
    worker: InProcessWorker,  # noqa: F811
    inputs: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "net.small.onnx"
    worker.serve()
    result = squish(
        "compress", str(inputs["model"]), "-m", "quantize.dynamic", "-d", f"eval={inputs['eval']}",
        "--max-accuracy-drop", "50", "--min-cosine", "0.5", "--out", str(out), *QUICK,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (job_id,) = live.job_ids()
    with Client(live.url, live.api_key, backoff=0.0) as client:
        job = client.get_job(job_id)
    assert job["status"] == "succeeded" and job["error"] is None
    assert job["spec"]["constraints"] == {"accuracy_drop": 0.5, "cosine_similarity": 0.5}


def test_local_mode_judges_the_constraints_too(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "local.onnx"
    args = ["compress", str(inputs["model"]), "--local", "-m", "quantize.dynamic",
            "-d", f"eval={inputs['eval']}", "--out", str(out), "--warmup", "0"]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--iterations", "1", "--max-size-bytes", "1"])
    assert result.exit_code == 1, result.output
    assert "constraints_unmet" in result.stderr and "size_bytes ≤ 1: measured" in result.stderr
    assert out.is_file()  # the model that did not pass is kept
    # What POST /v1/jobs refuses, --local refuses before running, in the same words.
    refused = CliRunner().invoke(cli, [*args, "--min-speedup", "32=2"])
    assert refused.exit_code == 2
    assert "constraints.speedup.batch_32: batch size 32 is not measured" in refused.output
