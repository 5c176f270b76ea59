"""benchmarks/plot.py draws committed results as PNG figures, one or two per file by what it holds, and
refuses a file it does not know."""

import json
from pathlib import Path

import pytest

from benchmarks.plot import plot

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def _drawn(paths: list[Path]) -> list[str]:
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000  # a real picture, not an empty canvas
    return [p.name for p in paths]


def test_an_offload_result_with_approximate_rows_gives_the_modes_and_the_sparsity_figure(tmp_path):
    assert _drawn(plot(RESULTS / "results_offload_sparse.json", tmp_path)) == [
        "offload_sparse.png", "offload_sparse_sparsity.png"]


def test_an_offload_result_without_them_gives_the_modes_only(tmp_path):
    assert _drawn(plot(RESULTS / "results_offload_emulated_disk_rerun.json", tmp_path)) == [
        "offload_emulated_disk_rerun.png"]


def test_a_drafters_result_gives_one_figure(tmp_path):
    assert _drawn(plot(RESULTS / "results_drafters.json", tmp_path)) == ["drafters.png"]


def test_a_file_that_is_neither_is_refused(tmp_path):
    other = tmp_path / "results_other.json"
    other.write_text(json.dumps({"rows": [{"mode": "x"}]}))
    with pytest.raises(ValueError, match="neither an offload nor a drafters result"):
        plot(other, tmp_path)
