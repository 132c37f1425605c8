"""A trial runs its recipe as a pipeline, measured against the original, and reuses the
longest stored prefix of its steps."""

from __future__ import annotations

from pathlib import Path

from worker.context import RecordingReporter
from worker.search.space import Recipe
from worker.search.trial import _unpack, run_trial


class DictPrefixes:
    """A PrefixStore in a folder, counting what was asked and stored."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.puts: list[str] = []
        self.hits: list[str] = []

    def get(self, key: str) -> Path | None:
        source = self.root / key
        copy = self.root / f"{key}.copy"
        if not source.exists():
            return None
        self.hits.append(key)
        copy.write_bytes(source.read_bytes())
        return copy

    def put(self, key: str, path: Path) -> None:
        self.puts.append(key)
        (self.root / key).write_bytes(path.read_bytes())


def _run(files: dict[str, Path], recipe: Recipe, tmp: Path, store: DictPrefixes | None):
    reporter = RecordingReporter()
    result = run_trial(
        files["pt2"], "pt2", recipe, {"eval": files["eval"]}, "cpu", [1], 1, 3, tmp, reporter,
        store, peak_memory=False,  # two fresh processes per run: not what is tested here
    )  # fmt: skip
    return result, reporter


def test_trials_share_a_prefix_and_measure_against_the_original(
    files: dict[str, Path], tmp_path: Path
) -> None:
    store = DictPrefixes(tmp_path / "store")
    prune = ("prune.magnitude", {"amount": 0.5})
    first = Recipe([prune, ("prune.semi_structured", {})], "pt2")
    second = Recipe([prune, ("lowrank", {"rank_ratio": 0.5})], "pt2")
    a, _ = _run(files, first, tmp_path / "a", store)
    assert a.reused_steps == 0
    assert store.puts == [first.prefixes("pt2")[0][0]]  # the pruned pt2 model
    b, log = _run(files, second, tmp_path / "b", store)
    assert b.reused_steps == 1 and store.hits == store.puts
    assert any("reused" in line["message"] for line in log.logs)
    steps_a, steps_b = a.measured.steps or [], b.measured.steps or []
    assert [s.method for s in steps_b] == ["prune.magnitude", "lowrank"]
    assert steps_b[0].sparsity == steps_a[0].sparsity and (steps_b[0].sparsity or 0) > 0.4
    # measured against the uploaded model, not the reused one
    assert b.measured.original.size_bytes == a.measured.original.size_bytes
    assert b.artifact_format == "pt2" and b.artifact_path.exists()
    assert b.measured.compressed.accuracy is not None
    assert b.measured.compressed.peak_memory_bytes is None  # peak_memory=False


def test_a_broken_prefix_is_not_used(tmp_path: Path) -> None:
    broken = tmp_path / "stored"
    broken.write_bytes(b"not a zip")
    reporter = RecordingReporter()
    assert _unpack(broken, 1, tmp_path / "out", "pt2", reporter) is None
    assert any("could not be read" in line["message"] for line in reporter.logs)
    assert not broken.exists()  # the store's copy is not left behind
    assert _unpack(None, 1, tmp_path / "out", "pt2", reporter) is None
