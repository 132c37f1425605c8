"""The README lists what clients and operators need, and stays true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.settings import Settings
from worker.contract import ErrorCode

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_error_code_is_listed() -> None:
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in README]
    assert not missing, missing


def test_every_setting_is_listed() -> None:
    missing = [
        f"SQUISH_{name.upper()}"
        for name in Settings.model_fields
        if f"SQUISH_{name.upper()}" not in README
    ]
    assert not missing, missing


def test_every_linked_file_exists() -> None:
    root = Path(__file__).resolve().parents[1]
    for target in ("docs/reference.md", "benchmarks/README.md"):
        assert f"]({target}" in README and (root / target).is_file(), target


def test_the_repository_map_lists_every_module_with_its_docstring() -> None:
    root = Path(__file__).resolve().parents[1]
    generated = subprocess.run(
        [sys.executable, str(root / "scripts" / "repository-map")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    start = README.index("| file | responsibility |", README.index("### Repository map"))
    current = README[start : README.index("\n\n", start) + 1]
    assert current == generated, "run scripts/repository-map --write to update README.md"
