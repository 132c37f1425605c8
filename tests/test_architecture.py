"""The shape rules of the code base: which processes import what, and what git may hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.factories import digits_npz, tiny_mlp_onnx

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnxruntime", "torchao", "torch_pruning", "transformers")


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SQUISH_")}, **(env or {})},
    )


def test_the_contract_module_needs_only_the_standard_library() -> None:
    done = run_python(
        """
        import sys
        before = set(sys.modules)
        import worker.contract
        new = {m.split('.')[0] for m in set(sys.modules) - before}
        foreign = sorted(new - set(sys.stdlib_module_names) - {'worker'})
        assert not foreign, foreign
        """
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "module", ["worker.contract", "worker.spec", "worker.methods", "worker.errors", "app.main"]
)
def test_torch_free_modules_import_no_torch(module: str) -> None:
    done = run_python(
        f"""
        import sys, {module}
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        assert not heavy, heavy
        """
    )
    assert done.returncode == 0, done.stderr


def test_the_api_takes_a_job_for_every_method_without_importing_torch(tmp_path: Path) -> None:
    """The API in its own process: upload an ONNX model and data, post a job per method."""
    from tests.worker.test_registry import EXAMPLES

    model = tiny_mlp_onnx(tmp_path / "mlp.onnx")
    data = digits_npz(tmp_path / "digits.npz")
    examples = {
        name: {k: v for k, v in params.items() if not k.endswith("_model_id")}
        for name, params in EXAMPLES.items()
    }
    examples["quantize.half"] = {"dtype": "fp16"}  # ONNX Runtime's CPU provider has no bf16
    done = run_python(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from app.db import session_scope
        from app.keys import create_key
        from app.main import create_app
        from app.migrate import upgrade

        upgrade()
        with session_scope() as session:
            key = create_key(session, "acme")
        app = create_app(run_reaper=False)
        answers = {{}}
        with TestClient(app, raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {{key}}"
            with open({str(model)!r}, "rb") as fh:
                model = client.post("/v1/models", files={{"file": ("mlp.onnx", fh)}})
            assert model.status_code == 201, model.text
            with open({str(data)!r}, "rb") as fh:
                data = client.post("/v1/datasets", files={{"file": ("digits.npz", fh)}})
            assert data.status_code == 201, data.text
            ds = data.json()["id"]
            for name, params in {examples!r}.items():
                spec = {{
                    "model_id": model.json()["id"],
                    "pipeline": [{{"method": name, "params": params}}],
                    "datasets": {{"calibration": ds, "train": ds, "eval": ds}},
                }}
                answer = client.post("/v1/jobs", json=spec)
                answers[name] = [answer.status_code, answer.json().get("detail")]
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print(json.dumps({{"answers": answers, "heavy": heavy}}))
        """,
        env={"SQUISH_DATA_DIR": str(tmp_path / "data")},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    answers = result["answers"]
    assert set(answers) == set(EXAMPLES)
    from worker.methods import REGISTRY

    for name, (status, detail) in answers.items():
        expected = 202 if "onnx" in REGISTRY[name].formats else 422
        assert status == expected, (name, status, detail)
        if status == 422:
            assert "does not accept onnx" in detail


def test_make_lint_refuses_tracked_files_over_one_mebibyte(tmp_path: Path) -> None:
    guard = REPO / "scripts" / "check-large-files"
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "small.txt").write_bytes(b"x" * 1024)
    subprocess.run(["git", "-C", str(tmp_path), "add", "small.txt"], check=True)
    assert subprocess.run([guard], cwd=tmp_path, capture_output=True).returncode == 0
    (tmp_path / "scratch.data").write_bytes(b"\0" * ((1 << 20) + 1))
    subprocess.run(["git", "-C", str(tmp_path), "add", "scratch.data"], check=True)
    done = subprocess.run([guard], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1
    assert "scratch.data" in done.stderr and "small.txt" not in done.stderr
