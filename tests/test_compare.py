"""Runs side by side: dfkd_fast.distill.compare_runs and `dfkd-fast compare`, on real tiny runs."""

from __future__ import annotations

import json
import shutil

import pytest

from dfkd_fast.cli import main
from dfkd_fast.distill import DistillConfig, compare_runs, distill
from dfkd_fast.distill.compare import COLUMNS
from tests.test_distill import IMAGE_SHAPE, TINY, held_out, networks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs evaluated on test data, one run without test data, one killed run."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)  # as compiled_cpu_kernels, module-wide
        for method, test_set in (("adversarial", held_out()), ("memory-bank", held_out()),
                                 ("pre-dfkd", None)):  # fmt: skip
            teacher, student = networks()
            distill(teacher, student, DistillConfig(method=method, **TINY), IMAGE_SHAPE,
                    test_set=test_set, output_dir=root / method, progress=False)  # fmt: skip
    killed = root / "killed"
    shutil.copytree(root / "adversarial", killed)
    metrics = json.loads((killed / "metrics.json").read_text())
    metrics.update(finished=False, step=2, curve=metrics["curve"][:1])
    (killed / "metrics.json").write_text(json.dumps(metrics))
    return root


def cells(table: str) -> dict[str, dict[str, str]]:
    """Markdown table -> {run: {column: cell}}."""
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def test_the_table_holds_each_finished_runs_numbers(runs):
    comparison = compare_runs([runs / "adversarial", runs / "memory-bank", runs / "pre-dfkd",
                               runs / "killed"])  # fmt: skip
    assert list(comparison.runs) == ["adversarial", "memory-bank", "pre-dfkd"]
    assert comparison.left_out == {str(runs / "killed"): "unfinished (step 2 of 4)"}
    table = cells(comparison.markdown())
    assert list(table) == ["adversarial", "memory-bank", "pre-dfkd"]
    for name in ("adversarial", "memory-bank"):
        metrics = json.loads((runs / name / "metrics.json").read_text())
        final = metrics["curve"][-1]["accuracy"]
        mean = (metrics["curve"][0]["accuracy"] + final) / 2
        assert table[name]["final"] == f"{final:.2%}" and table[name]["mean"] == f"{mean:.2%}"
        assert table[name]["wall time"] == f"{metrics['seconds'] / 60:.1f} min"
        assert set(table[name]) == set(COLUMNS)
    assert table["memory-bank"]["replay memory"] == f"{24 * 64 * 4 / 2**20:.2f} MiB"
    assert table["adversarial"]["replay memory"] == "0.00 MiB"
    # evaluated on no test data: no accuracy to report, the rest is there
    assert table["pre-dfkd"]["final"] == table["pre-dfkd"]["first step at 95%"] == "-"
    assert table["pre-dfkd"]["wall time"].endswith(" min")


def test_unfinished_runs_are_labelled_when_included_and_same_names_keep_their_paths(runs, tmp_path):
    other = tmp_path / "elsewhere" / "adversarial"
    shutil.copytree(runs / "adversarial", other)
    comparison = compare_runs([runs / "adversarial", other, runs / "killed"],
                              include_unfinished=True)  # fmt: skip
    assert list(comparison.runs) == [str(runs / "adversarial"), str(other),
                                     "killed (unfinished, step 2 of 4)"]  # fmt: skip
    assert comparison.left_out == {}


def test_json_and_plot_are_written(runs, tmp_path):
    comparison = compare_runs([runs / "adversarial", runs / "memory-bank"])
    comparison.write_json(tmp_path / "out" / "summary.json")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(written) == {"machine", "runs"} and "torch" in written["machine"]
    assert written["runs"]["memory-bank"] == json.loads((runs / "memory-bank" / "metrics.json").read_text())
    pytest.importorskip("matplotlib")
    assert comparison.plot(tmp_path / "out" / "accuracy.png", "two runs")
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_folders_that_are_not_runs_are_refused_by_name(runs, tmp_path):
    with pytest.raises(ValueError, match="folders: give at least one"):
        compare_runs([])
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'}: no metrics.json"):
        compare_runs([runs / "adversarial", tmp_path / "missing"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{ not json")
    with pytest.raises(ValueError, match="broken/metrics.json: not valid JSON"):
        compare_runs([tmp_path / "broken"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(ValueError, match="not a run's metrics"):
        compare_runs([tmp_path / "foreign"])


def test_the_compare_command_prints_the_table_and_writes_what_it_is_asked(runs, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    assert main(["compare", str(runs / "adversarial"), str(runs / "killed"),
                 "--json", str(summary)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "| adversarial |" in captured.out and f"metrics: {summary}" in captured.out
    assert "killed: left out, unfinished (step 2 of 4)" in captured.err
    assert list(json.loads(summary.read_text())["runs"]) == ["adversarial"]
    assert main(["compare", str(runs / "killed")]) == 2
    assert "no finished run to compare" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here: no metrics.json" in capsys.readouterr().err
