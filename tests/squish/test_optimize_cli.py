"""``squish optimize``: the constraint flags, the live trial table and the unmet verdict."""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from squish.cli import (
    ProgressBar,
    TrialTable,
    cli,
    constraints_from_options,
    trial_row,
    unmet_lines,
)


def test_constraint_flags_become_the_spec_names() -> None:
    assert constraints_from_options(1.0, 0.99, ("0.5", "32=4"), 2_000_000, ("2",)) == {
        "accuracy_drop": 0.01,
        "cosine_similarity": 0.99,
        "latency_ms": {"batch_1": 0.5, "batch_32": 4.0},
        "size_bytes": 2_000_000,
        "speedup": {"batch_1": 2.0},
    }
    assert constraints_from_options(None, None, (), None, ()) == {}
    for bad in ("fast", "0=1", "4=-1"):
        with pytest.raises(click.BadParameter):
            constraints_from_options(None, None, (bad,), None, ())


def trial(number: int, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "number": number,
        "pipeline": [{"method": "prune.magnitude", "params": {}}, {"method": "quantize.dynamic"}],
        "output_format": "onnx",
        "status": status,
        **extra,
    }


def test_the_trial_table_prints_each_finished_trial_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = {
        "compressed": {
            "size_bytes": 4096,
            "accuracy": 0.95,
            "latency_ms": {"batch_1": {"p50": 0.25}},
        }
    }
    table = TrialTable("batch_1", ProgressBar())
    job: dict[str, Any] = {
        "status": "running",
        "metrics": {"search": {"trials": [trial(0, "running")]}},
    }
    table(job)
    assert capsys.readouterr().out == ""
    job["metrics"]["search"]["trials"] = [
        trial(0, "succeeded", metrics=metrics, feasible=True),
        trial(1, "failed", error={"code": "method_failed", "message": "ORT refused it"}),
        trial(2, "succeeded", metrics=metrics, feasible=False,
              violations=[{"constraint": "latency_ms.batch_1", "bound": 0.1, "measured": 0.25}]),
    ]  # fmt: skip
    table(job)
    table(job)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["trial", "recipe", "size", "latency", "accuracy", "feasible"]
    assert len(lines) == 4
    assert "prune.magnitude > quantize.dynamic > onnx" in lines[1]
    assert "4.0 KiB" in lines[1] and "0.250 ms" in lines[1] and lines[1].endswith("yes")
    assert lines[2].endswith("failed: ORT refused it")
    assert lines[3].endswith("no: latency_ms.batch_1")
    assert trial_row(trial(3, "cancelled"), "batch_1")[-1] == "cancelled"


def test_unmet_constraints_are_named_with_the_closest_value() -> None:
    job = {
        "metrics": {
            "search": {
                "unmet": [
                    {"constraint": "size_bytes", "bound": 1, "closest": 2048, "trial": 4},
                    {"constraint": "cosine_similarity", "bound": 1.0},
                ]
            }
        }
    }
    assert unmet_lines(job) == [
        "unmet: size_bytes bound 1, closest 2048 (trial 4)",
        "unmet: cosine_similarity bound 1, closest not measured",
    ]


def test_optimize_needs_eval_data(tmp_path: Any) -> None:
    result = CliRunner().invoke(
        cli, ["--url", "http://127.0.0.1:9", "optimize", "m.onnx", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--data eval=FILE" in result.output
