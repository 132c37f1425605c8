"""The ``squish`` CLI against the real application, served in process (tests/squish/conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from squish import Client
from squish.cli import (
    ProgressBar,
    SquishGroup,
    build_pipeline,
    cli,
    detect_format,
    parse_param,
    register_server_commands,
    scan_pipeline_options,
    summary_lines,
)
from tests.squish.service import BATCH_SIZES, InProcessWorker, Live, submit

REPO = Path(__file__).resolve().parents[2]
# Accepted by POST /v1/jobs (the API cannot see layers), refused by the engine at step 1.
FAILING = [
    ("prune.magnitude", {"amount": 0.5}),
    ("prune.structured", {"amount": 0.5, "importance": "bn_scale"}),
]
FAILING_ARGS = (
    "-m", "prune.magnitude", "-p", "amount=0.5",
    "-m", "prune.structured", "-p", "amount=0.5", "-p", "importance=bn_scale",
)  # fmt: skip


@pytest.fixture
def squish(live: Live, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``squish ARGS...`` against the live server; returns the click `Result`."""
    monkeypatch.delenv("SQUISH_URL", raising=False)
    monkeypatch.delenv("SQUISH_API_KEY", raising=False)
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(cli, ["--url", live.url, "--api-key", live.api_key, *args])

    return run


@pytest.fixture
def model_file(model_files: dict[str, Path], tmp_path: Path) -> Path:
    return shutil.copyfile(model_files["pt2"], tmp_path / "net.pt2")


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(live.url, live.api_key, backoff=0.0) as c:
        yield c


def kib(size: int) -> str:
    assert 1024 <= size < 1024 * 1024
    return f"{size / 1024:.1f} KiB"


FAST = ("--poll-interval", "0")


# -- compress ---------------------------------------------------------------------------


def test_compress_end_to_end(
    squish: Any,
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_file: Path,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    calib = shutil.copyfile(model_files["calibration"], tmp_path / "calib.npz")
    labelled = shutil.copyfile(model_files["eval"], tmp_path / "eval.npz")
    out = tmp_path / "out" / "net.small.pt2"
    worker.serve(lockstep=True)  # every state the job goes through is seen by the CLI
    result = squish(
        "compress", str(model_file),
        "--method", "prune.magnitude", "--param", "amount=0.5", "-p", "scope=global",
        "-m", "quantize.dynamic", "--param=dtype=int8",
        "--dataset", f"calibration={calib}", "-d", f"eval={labelled}",
        "--batch-size", "1", "-b", "32", "--device", "cpu",
        "--out", str(out), *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (job_id,) = live.job_ids()
    job = client.get_job(job_id)
    assert out.read_bytes() == live.artifact_bytes(job_id, "model", tmp_path)
    (create,) = live.faults.requests_to("POST", "/v1/jobs")
    assert json.loads(create.body)["pipeline"] == [
        {"method": "prune.magnitude", "params": {"amount": 0.5, "scope": "global"}},
        {"method": "quantize.dynamic", "params": {"dtype": "int8"}},
    ]
    assert create.headers["idempotency-key"]
    spec = job["spec"]
    datasets = {d["name"]: d["id"] for d in client.list_datasets()}
    assert spec["datasets"] == {"calibration": datasets["calib.npz"], "eval": datasets["eval.npz"]}
    assert spec["evaluate"]["batch_sizes"] == BATCH_SIZES == [1, 32]
    assert spec["target"]["device"] == "cpu"
    # The summary on stdout, from the job's measured metrics; progress on stderr.
    metrics = job["metrics"]
    original, compressed, ratios = metrics["original"], metrics["compressed"], metrics["ratios"]
    assert f"job                   {job_id} (succeeded)" in result.stdout
    size = f"{kib(original['size_bytes'])} -> {kib(compressed['size_bytes'])}"
    assert f"size                  {size} (ratio {ratios['size']:.2f}x)" in result.stdout
    for batch, label in ((1, "batch 1 "), (32, "batch 32")):
        key = f"batch_{batch}"
        before, after = original["latency_ms"][key]["p50"], compressed["latency_ms"][key]["p50"]
        latency = f"{before:.2f} ms -> {after:.2f} ms ({ratios['speedup'][key]:.2f}x)"
        assert f"latency p50 {label}  {latency}" in result.stdout
    accuracy = f"{original['accuracy']:.4f} -> {compressed['accuracy']:.4f}"
    assert f"accuracy              {accuracy}" in result.stdout
    fidelity = ", ".join(
        f"{k} {metrics['fidelity'][k]:.4g}"
        for k in ("top1_agreement", "cosine_similarity", "mse", "max_abs_error")
    )
    assert f"fidelity              {fidelity}" in result.stdout
    first = next(
        e for e in live.stored_events(job_id)
        if e["kind"] == "progress" and e["data"]["stage"] == "quantize.dynamic"
    )  # fmt: skip
    assert f"running {round(first['data']['progress'] * 100)}% quantize.dynamic" in result.stderr
    assert "succeeded 100%" in result.stderr


def test_compress_with_an_uploaded_model_and_dataset_id_and_json(
    squish: Any,
    live: Live,
    worker: InProcessWorker,
    model_file: Path,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    model = json.loads(squish("models", "upload", str(model_file), "--json").stdout)
    data = shutil.copyfile(model_files["eval"], tmp_path / "eval.npz")
    dataset = json.loads(squish("datasets", "upload", str(data), "--json").stdout)
    out = tmp_path / "small.onnx"
    worker.serve()
    result = squish(
        "compress", model["id"], "-m", "prune.magnitude", "-p", "amount=0.5",
        "-d", f"eval={dataset['id']}", "--output-format", "onnx", "--out", str(out), "--json",
        *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded"
    assert job["spec"]["datasets"] == {"eval": dataset["id"]}
    assert job["spec"]["output_format"] == "onnx"
    assert out.read_bytes() == live.artifact_bytes(job["id"], "model", tmp_path)
    assert live.model_ids() == [model["id"]]  # nothing uploaded again


def test_compress_refused_spec_exits_2_with_the_field_errors(
    squish: Any, live: Live, model_file: Path, tmp_path: Path
) -> None:
    result = squish(
        "compress", str(model_file), "-m", "prune.magnitude", "-p", "amount=1.5",
        "--out", str(tmp_path / "x.pt2"), *FAST,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "error: 422 Invalid job spec\n  - pipeline.0.params.amount: Input should be less than 1\n"
    )
    assert live.job_ids() == []
    assert not (tmp_path / "x.pt2").exists()


def test_compress_failed_job_exits_1_with_the_error(
    squish: Any,
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_file: Path,
    tmp_path: Path,
) -> None:
    worker.serve()
    result = squish(
        "compress", str(model_file), *FAILING_ARGS, "--out", str(tmp_path / "x.pt2"), *FAST
    )
    assert result.exit_code == 1
    (job_id,) = live.job_ids()
    error = client.get_job(job_id)["error"]
    assert error["code"] == "invalid_params"
    assert (
        f"error: job {job_id} failed: invalid_params: {error['message']} (step prune.structured)"
        in result.stderr
    )
    assert not (tmp_path / "x.pt2").exists()


def test_compress_timeout_exits_1_and_says_how_to_follow_up(
    squish: Any, live: Live, model_file: Path, tmp_path: Path
) -> None:
    # No worker runs: the job stays queued.
    result = squish(
        "compress", str(model_file), "-m", "prune.magnitude", "-p", "amount=0.5",
        "--out", str(tmp_path / "x.pt2"), "--timeout", "0.05", "--poll-interval", "0.02",
    )  # fmt: skip
    assert result.exit_code == 1
    (job_id,) = live.job_ids()
    assert f"squish jobs wait {job_id}" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "amount=0.5", "-m", "prune.magnitude"], "comes before any --method"),
        ([], "give at least one --method"),
        (["-m", "prune.magnitude", "-p", "amount"], "is not KEY=VALUE"),
        (["-m", "prune.magnitude", "-d", "validation=x.npz"], "unknown role 'validation'"),
        (["-m", "prune.magnitude", "-d", "eval=missing/val.npz"], "no such file: missing/val.npz"),
    ],
)
def test_compress_usage_errors_exit_2(
    squish: Any, live: Live, model_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = squish("compress", str(model_file), *args, "--out", str(tmp_path / "x.pt2"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert live.job_ids() == []


def test_compress_missing_model_file_exits_2(squish: Any, tmp_path: Path) -> None:
    result = squish("compress", "nope/net.pt2", "-m", "prune.magnitude", "--out", "x.pt2")
    assert result.exit_code == 2
    assert "no such file: nope/net.pt2" in result.stderr


# -- parsing helpers ----------------------------------------------------------------------


def test_params_attach_to_the_preceding_method() -> None:
    command = cli.commands["compress"]
    order = scan_pipeline_options(
        command,
        [
            "m.pt2", "--out", "--method", "-m", "a", "-p", "x=1", "--device", "cpu",
            "--method=b", "--param", "y=[1, 2]", "-pz={\"k\": true}", "-mc", "--", "-m", "d",
        ],
    )  # fmt: skip
    # "--out --method" is the value of --out, not a method.
    assert order == [
        ("method", "a"), ("param", "x=1"), ("method", "b"), ("param", "y=[1, 2]"),
        ("param", 'z={"k": true}'), ("method", "c"),
    ]  # fmt: skip
    assert build_pipeline(order) == [
        ("a", {"x": 1}),
        ("b", {"y": [1, 2], "z": {"k": True}}),
        ("c", {}),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amount=0.5", ("amount", 0.5)),
        ("scope=global", ("scope", "global")),
        ("per_channel=true", ("per_channel", True)),
        ("bits=4", ("bits", 4)),
        ('layers=["fc1", "fc2"]', ("layers", ["fc1", "fc2"])),
        ("name=a=b", ("name", "a=b")),
        ("dtype=", ("dtype", "")),
        ("value=null", ("value", None)),
    ],
)
def test_param_values_parse_as_json_when_they_can(text: str, expected: tuple) -> None:
    assert parse_param(text) == expected


def test_format_comes_from_the_suffix_unless_given() -> None:
    assert detect_format(Path("a/net.pt2"), None) == "pt2"
    assert detect_format(Path("net.ONNX"), None) == "onnx"
    assert detect_format(Path("net.bin"), "onnx") == "onnx"
    with pytest.raises(click.UsageError, match="pass --format"):
        detect_format(Path("net.bin"), None)


def test_summary_leaves_out_what_was_not_measured() -> None:
    job = {
        "id": "job_1",
        "status": "succeeded",
        "metrics": {
            "original": {"size_bytes": 4096},
            "compressed": {"size_bytes": 1024},
            "ratios": {"size": 4.0},
        },
    }
    assert summary_lines(job, Path("o.pt2")) == [
        "output  o.pt2",
        "job     job_1 (succeeded)",
        "size    4.0 KiB -> 1.0 KiB (ratio 4.00x)",
    ]


def test_progress_redraws_one_line_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar()
    bar.tty = True
    bar({"status": "running", "progress": 0.5, "stage": "quantize.dynamic"})
    bar({"status": "succeeded", "progress": 1.0, "stage": None})
    bar.close()
    err = capsys.readouterr().err
    frames = err.split("\r")[1:]
    assert frames[0].startswith("running   [###############---------------]  50% quantize.dynamic")
    assert frames[1].rstrip() == "succeeded [##############################] 100%"
    assert err.endswith("\n")


def test_progress_in_a_log_prints_changes_not_every_tick(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = ProgressBar()
    bar.tty = False
    for i in range(1, 10):
        bar({"status": "running", "progress": i / 100, "stage": "distill"})
    bar({"status": "running", "progress": 0.12, "stage": "distill"})
    bar({"status": "running", "progress": 0.13, "stage": "quantize.dynamic"})
    assert capsys.readouterr().err.splitlines() == [
        "running 1% distill",
        "running 12% distill",
        "running 13% quantize.dynamic",
    ]


# -- --local ----------------------------------------------------------------------------


@dataclass
class FakeSpec:
    """Mirrors ``worker.pipeline.PipelineSpec``."""

    steps: list
    output_format: str
    device: str = "cpu"
    batch_sizes: list = field(default_factory=lambda: [1])
    warmup: int = 3
    iterations: int = 20


class FakeEngineError(Exception):
    def __init__(self, code: str, message: str, step: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.step = code, message, step


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Stand-ins for ``worker.pipeline`` and ``worker.errors`` (the engine is tested elsewhere)."""
    calls: list[dict] = []

    def run_pipeline(model_path, model_format, spec, datasets, work_dir, reporter):  # type: ignore[no-untyped-def]
        calls.append(
            {"model_path": model_path, "format": model_format, "spec": spec, "datasets": datasets}
        )
        if spec.steps[0][0] == "test.fail":
            raise FakeEngineError("unsupported_model", "cannot prune this model", "test.fail")
        reporter.progress(0.5, spec.steps[0][0])
        reporter.log("measured", data={})
        artifact = Path(work_dir) / "out.bin"
        artifact.write_bytes(b"compressed!")
        metrics = {"original": {"size_bytes": 20}, "compressed": {"size_bytes": 11}}
        return types.SimpleNamespace(artifact_path=artifact, metrics=metrics)

    worker = types.ModuleType("worker")
    pipeline = types.ModuleType("worker.pipeline")
    pipeline.PipelineSpec = FakeSpec  # type: ignore[attr-defined]
    pipeline.run_pipeline = run_pipeline  # type: ignore[attr-defined]
    errors = types.ModuleType("worker.errors")
    errors.EngineError = FakeEngineError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker", worker)
    monkeypatch.setitem(sys.modules, "worker.pipeline", pipeline)
    monkeypatch.setitem(sys.modules, "worker.errors", errors)
    return calls


def test_local_passes_the_parsed_pipeline_to_the_engine(
    fake_engine: list[dict], live: Live, model_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "calib.npz"
    data.write_bytes(b"PK")
    out = tmp_path / "small.pt2"
    result = CliRunner().invoke(
        cli,
        [
            "--url", live.url, "--api-key", live.api_key, "compress", str(model_file), "--local",
            "-m", "prune.magnitude", "-p", "amount=0.25", "-m", "quantize.dynamic",
            "-d", f"calibration={data}", "--output-format", "onnx", "--device", "gpu",
            "-b", "8", "--warmup", "3", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = fake_engine
    assert call["model_path"] == model_file
    assert call["format"] == "pt2"
    assert call["datasets"] == {"calibration": data}
    spec = call["spec"]
    assert spec.steps == [("prune.magnitude", {"amount": 0.25}), ("quantize.dynamic", {})]
    assert (spec.output_format, spec.device, spec.batch_sizes) == ("onnx", "gpu", [8])
    assert (spec.warmup, spec.iterations) == (3, 20)
    assert out.read_bytes() == b"compressed!"
    assert "size    20 B -> 11 B (ratio 1.82x)" in result.stdout
    assert live.faults.requests == []  # no server involved


def test_local_engine_failure_exits_1(
    fake_engine: list[dict], model_file: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli, ["compress", str(model_file), "--local", "-m", "test.fail", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "error: unsupported_model: cannot prune this model (step test.fail)" in result.stderr
    (call,) = fake_engine
    assert call["spec"].output_format == "pt2"  # the input's format when not given
    assert call["spec"].batch_sizes == [1]


def test_local_needs_files_and_a_known_format(fake_engine: list[dict], tmp_path: Path) -> None:
    weird = tmp_path / "net.bin"
    weird.write_bytes(b"x")
    runner = CliRunner()
    result = runner.invoke(cli, ["compress", str(weird), "--local", "-m", "a", "-o", "o.pt2"])
    assert result.exit_code == 2
    assert "pass --format" in result.stderr
    result = runner.invoke(
        cli,
        [
            "compress",
            str(weird),
            "--local",
            "--format",
            "onnx",
            "-m",
            "a",
            "-d",
            "eval=ds_1",
            "-o",
            "o",
        ],
    )
    assert result.exit_code == 2
    assert "--local needs files, not ids" in result.stderr
    assert fake_engine == []


# -- resource commands ------------------------------------------------------------------


def test_models_commands(squish: Any, live: Live, model_file: Path, tmp_path: Path) -> None:
    result = squish("models", "upload", str(model_file), "--name", "resnet")
    assert result.exit_code == 0, result.output
    (model_id,) = live.model_ids()
    assert f"id          {model_id}" in result.stdout
    listed = squish("models", "list")
    assert listed.stdout.splitlines()[0].split() == ["ID", "NAME", "FORMAT", "SIZE", "CREATED"]
    assert f"{model_id}  resnet  pt2     {kib(model_file.stat().st_size)}" in listed.stdout
    assert json.loads(squish("models", "get", model_id, "--json").stdout)["name"] == "resnet"
    copy = tmp_path / "copy.pt2"
    assert squish("models", "download", model_id, "-o", str(copy)).exit_code == 0
    assert copy.read_bytes() == model_file.read_bytes()
    assert squish("models", "delete", model_id).stdout == f"deleted {model_id}\n"
    missing = squish("models", "get", model_id)
    assert missing.exit_code == 2
    assert f"error: 404 Not found: No model '{model_id}'." in missing.stderr
    assert squish("models", "list").stdout == "(none)\n"


def test_datasets_commands(
    squish: Any, live: Live, model_files: dict[str, Path], tmp_path: Path
) -> None:
    data = shutil.copyfile(model_files["eval"], tmp_path / "val.npz")
    assert squish("datasets", "upload", str(data)).exit_code == 0
    (dataset_id,) = live.dataset_ids()
    assert dataset_id in squish("datasets", "list").stdout
    shown = json.loads(squish("datasets", "get", dataset_id, "--json").stdout)
    assert shown["size_bytes"] == data.stat().st_size
    assert squish("datasets", "delete", dataset_id).exit_code == 0
    assert json.loads(squish("datasets", "list", "--json").stdout) == []


def test_jobs_list_get_cancel(
    squish: Any, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    done = submit(client, model_files)
    worker.run(done["id"])
    done = client.wait(done["id"], poll_interval=0)
    queued = client.create_job(done["model_id"], [("quantize.dynamic", {})])

    listed = squish("jobs", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PROGRESS", "STAGE", "MODEL", "CREATED"]
    assert lines[1].startswith(f"{queued['id']}  queued     0%")
    assert lines[2].startswith(f"{done['id']}  succeeded  100%")
    only = json.loads(squish("jobs", "list", "--status", "succeeded", "--json").stdout)
    assert [j["id"] for j in only] == [done["id"]]
    assert squish("jobs", "list", "--status", "bogus").exit_code == 2

    shown = squish("jobs", "get", done["id"])
    assert "status     succeeded" in shown.stdout
    assert 'pipeline   prune.magnitude{"amount": 0.5, ' in shown.stdout
    model_size = next(a["size_bytes"] for a in done["artifacts"] if a["name"] == "model")
    (artifacts,) = [line for line in shown.stdout.splitlines() if line.startswith("artifacts  ")]
    assert f"model ({kib(model_size)})" in artifacts and "report" in artifacts
    assert "card (" in artifacts
    assert "latency p50 batch 1" in shown.stdout
    assert json.loads(squish("jobs", "get", done["id"], "--json").stdout)["id"] == done["id"]

    cancelled = squish("jobs", "cancel", queued["id"])
    assert cancelled.exit_code == 0
    assert cancelled.stdout == f"job {queued['id']} cancelled\n"
    again = squish("jobs", "cancel", queued["id"])
    assert again.exit_code == 2
    assert "error: 409 Conflict: The job has already cancelled" in again.stderr


def test_jobs_wait_exit_codes(
    squish: Any, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    ok = submit(client, model_files)
    bad = client.create_job(ok["model_id"], FAILING)
    worker.serve()
    result = squish("jobs", "wait", ok["id"], *FAST, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "succeeded"
    result = squish("jobs", "wait", bad["id"], *FAST)
    assert result.exit_code == 1
    error = client.get_job(bad["id"])["error"]
    assert f"error      invalid_params: {error['message']} (step prune.structured)" in result.stdout
    assert f"error: job {bad['id']} failed" in result.stderr


def test_jobs_events(
    squish: Any, client: Client, worker: InProcessWorker, model_files: dict[str, Path]
) -> None:
    job = submit(client, model_files)
    worker.serve()
    result = squish("jobs", "events", job["id"], "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["data"]["status"] == "succeeded"
    human = squish("jobs", "events", job["id"], "--last-event-id", str(events[0]["id"]))
    kinds = [line.split()[2] for line in human.stdout.splitlines()]
    assert len(kinds) == len(events) - 1
    assert kinds[0] == "status" and "log" in kinds and kinds[-1] == "status"
    assert human.stdout.splitlines()[-1].endswith("succeeded")


def test_artifacts_get_and_jobs_card(
    squish: Any,
    live: Live,
    client: Client,
    worker: InProcessWorker,
    model_files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = submit(client, model_files)
    worker.run(job["id"])
    out = tmp_path / "report.json"
    result = squish("artifacts", "get", job["id"], "report", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == live.artifact_bytes(job["id"], "report", tmp_path)
    missing = squish("artifacts", "get", job["id"], "weights", "-o", str(tmp_path / "w"))
    assert missing.exit_code == 2
    assert "has no artifact 'weights'; available: card, model, report" in missing.stderr
    # The compression card, from the same job: downloaded, then opened in the browser.
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    out = tmp_path / "card.html"
    result = squish("jobs", "card", job["id"], "--out", str(out), "--open")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == live.artifact_bytes(job["id"], "card", tmp_path)
    assert out.read_text().startswith("<!DOCTYPE html>") and job["id"] in out.read_text()
    assert opened == [out.resolve().as_uri()]
    monkeypatch.chdir(tmp_path)  # the default name, in the current folder
    assert client.download_card(job["id"]) == Path(f"{job['id']}-card.html")
    assert Path(f"{job['id']}-card.html").read_bytes() == out.read_bytes()
    queued = client.create_job(job["model_id"], [("quantize.dynamic", {})])
    missing = squish("jobs", "card", queued["id"])
    assert missing.exit_code == 2 and "has no artifact 'card'" in missing.stderr


def test_methods(squish: Any, client: Client) -> None:
    result = squish("methods", "-v")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FORMATS", "NEEDS", "DEVICES", "SUMMARY"]
    distill = next(m for m in client.methods() if m["name"] == "distill")
    (row,) = [line for line in lines if line.startswith("distill ")]
    columns = ["distill", ",".join(distill["formats"]), "train", ",".join(distill["devices"])]
    assert row.split()[:4] == columns
    assert row.endswith(distill["summary"])
    assert "\nprune.magnitude\n  amount" in result.stdout
    names = [m["name"] for m in json.loads(squish("methods", "--json").stdout)]
    assert "quantize.dynamic" in names


def test_url_and_key_come_from_the_environment(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQUISH_URL", live.url)
    monkeypatch.setenv("SQUISH_API_KEY", live.api_key)
    assert CliRunner().invoke(cli, ["jobs", "list", "--json"]).stdout.strip() == "[]"
    monkeypatch.setenv("SQUISH_API_KEY", "wrong")
    result = CliRunner().invoke(cli, ["jobs", "list"])
    assert result.exit_code == 2
    assert "401 Invalid API key" in result.stderr


def test_unreachable_server_exits_1() -> None:
    result = CliRunner().invoke(cli, ["--url", "http://127.0.0.1:9", "--retry-for", "0", "methods"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: GET http://127.0.0.1:9/v1/methods:")


# -- server commands --------------------------------------------------------------------


def test_server_commands_are_added_when_app_commands_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = types.ModuleType("app")
    commands = types.ModuleType("app.commands")

    def register(group: click.Group) -> None:
        @group.command()
        def serve() -> None:
            click.echo("serving")

    commands.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "app", app)
    monkeypatch.setitem(sys.modules, "app.commands", commands)
    group = SquishGroup(name="squish")
    assert CliRunner().invoke(group, ["serve"]).stdout == "serving\n"


def test_a_missing_server_package_is_tolerated_but_a_broken_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "app.commands", None)  # import raises ModuleNotFoundError
    assert register_server_commands(click.Group()) is False

    broken = types.ModuleType("app.commands")

    def __getattr__(name: str) -> Any:
        raise ModuleNotFoundError("No module named 'sqlalchemy'", name="sqlalchemy")

    broken.__getattr__ = __getattr__  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "app.commands", broken)
    with pytest.raises(ModuleNotFoundError, match="sqlalchemy"):
        register_server_commands(click.Group())


def test_client_commands_do_not_import_the_server() -> None:
    code = (
        "import sys; from click.testing import CliRunner; from squish.cli import cli; "
        "r = CliRunner().invoke(cli, ['jobs', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'app' not in sys.modules and 'app.commands' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
