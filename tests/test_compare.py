"""Runs side by side: dfkd_fast.distill.compare_runs and `dfkd-fast compare`, on real tiny runs."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from dfkd_fast.cli import main
from dfkd_fast.distill import DistillConfig, compare_runs, distill
from dfkd_fast.distill.compare import COLUMNS, GROUP_COLUMNS, differing_keys, spread
from dfkd_fast.distill.report import curve_band, describe_network
from dfkd_fast.machine import machine_description, machine_label
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


def run_with_curve(runs, tmp_path, name: str, method: str, accuracies: list[float], seconds: float,
                   class_accuracies: list[list[float]] | None = None):  # fmt: skip
    """A copy of the adversarial run under another name, method, accuracy curve (per class too,
    if given) and wall time."""
    folder = tmp_path / name
    shutil.copytree(runs / "adversarial", folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["config"]["method"] = method
    metrics["curve"] = [{"step": 10 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]
    for entry, per_class in zip(metrics["curve"], class_accuracies or []):
        entry["class_accuracy"] = per_class
    metrics["seconds"] = seconds
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_each_run_records_its_machine_and_runs_from_several_are_told_apart(runs, tmp_path):
    metrics = json.loads((runs / "adversarial" / "metrics.json").read_text())
    assert metrics["machines"] == [machine_description()]
    same = compare_runs([runs / "adversarial", runs / "memory-bank"])
    assert same.machines_note() == ""
    assert list(same.groups(["machine"])) == [f"machine={machine_label(machine_description())}"]

    elsewhere = run_with_curve(runs, tmp_path, "elsewhere", "adversarial", [0.5, 0.9], 60.0)
    other = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "bfloat16_flags": [], "threads": 2}
    moved = json.loads((elsewhere / "metrics.json").read_text())
    moved["machines"] = [other]
    (elsewhere / "metrics.json").write_text(json.dumps(moved))
    unrecorded = run_with_curve(runs, tmp_path, "unrecorded", "adversarial", [0.5, 0.9], 60.0)
    old = json.loads((unrecorded / "metrics.json").read_text())
    del old["machines"]
    (unrecorded / "metrics.json").write_text(json.dumps(old))

    comparison = compare_runs([runs / "adversarial", elsewhere])
    note = comparison.machines_note().splitlines()
    assert note[0].startswith("The runs come from 2 machines: wall times")
    assert note[1:] == [f"- adversarial: {machine_label(machine_description())}",
                        "- elsewhere: AMD EPYC (AVX2), 2 threads"]  # fmt: skip
    assert list(comparison.groups(["machine"]).values()) == [["adversarial"], ["elsewhere"]]
    summary = comparison.group_summaries(["method"])["method=adversarial"]
    assert "machine" in summary["differing_config"]
    with pytest.raises(ValueError, match="group by machine: run unrecorded recorded no machine"):
        compare_runs([runs / "adversarial", unrecorded]).groups(["machine"])
    note = compare_runs([runs / "adversarial", unrecorded]).machines_note().splitlines()
    assert note[0].startswith("The runs come from 1 machine (and some runs recorded none)")
    assert note[-1] == "- unrecorded: not recorded"


def test_spread_is_mean_sample_deviation_and_range_of_the_values_given():
    assert spread([0.9, None, 0.7, 0.8]) == pytest.approx(
        {"mean": 0.8, "std": 0.1, "min": 0.7, "max": 0.9, "count": 3})
    assert spread([0.5]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5, "count": 1}
    assert spread([None]) == spread([]) == {"count": 0}


def test_groups_summarise_their_runs_spread(runs, tmp_path):
    folders = [
        run_with_curve(runs, tmp_path, "a0", "pre-dfkd", [0.90, 0.96, 0.98], 60.0),
        run_with_curve(runs, tmp_path, "b0", "adversarial", [0.50, 0.70, 0.60], 120.0),
        run_with_curve(runs, tmp_path, "a1", "pre-dfkd", [0.80, 0.94, 0.97], 180.0),
        run_with_curve(runs, tmp_path, "a2", "pre-dfkd", [0.95, 0.99, 0.96], 120.0),
        run_with_curve(runs, tmp_path, "b1", "adversarial", [0.90, 0.95, 0.96], 120.0),
    ]
    comparison = compare_runs(folders)
    assert comparison.groups(["method"]) == {"method=pre-dfkd": ["a0", "a1", "a2"],
                                             "method=adversarial": ["b0", "b1"]}  # fmt: skip
    summaries = comparison.group_summaries(["method"])
    ours = summaries["method=pre-dfkd"]
    assert ours["runs"] == ["a0", "a1", "a2"]
    assert ours["final_accuracy"] == pytest.approx(
        {"mean": 0.97, "std": 0.01, "min": 0.96, "max": 0.98, "count": 3})
    assert ours["best_accuracy"]["mean"] == pytest.approx((0.98 + 0.97 + 0.99) / 3)
    assert ours["mean_accuracy"]["mean"] == pytest.approx((2.84 / 3 + 2.71 / 3 + 2.90 / 3) / 3)
    assert ours["final_minus_best"]["min"] == pytest.approx(-0.03)
    assert ours["largest_drop"]["max"] == pytest.approx(0.03)
    assert ours["first_step_at_95"] == pytest.approx(
        {"mean": 20, "std": 10, "min": 10, "max": 30, "count": 3})
    assert ours["seconds"] == pytest.approx({"mean": 120, "std": 60, "min": 60, "max": 180,
                                             "count": 3})  # fmt: skip
    assert summaries["method=adversarial"]["first_step_at_95"]["count"] == 1
    assert ours["differing_config"] == []

    table = cells(comparison.group_markdown(["method"]))
    assert list(table) == ["method=pre-dfkd", "method=adversarial"]
    assert set(table["method=pre-dfkd"]) == set(GROUP_COLUMNS)
    ours, theirs = table["method=pre-dfkd"], table["method=adversarial"]
    assert (ours["runs"], ours["final"]) == ("3", "97.00% ± 1.00%")
    assert ours["best"] == "98.00% ± 1.00%"
    assert (ours["first step at 95%"], ours["wall time"]) == ("20 ± 10", "2.0 min ± 1.0 min")
    assert ours["replay memory"] == "0.00 MiB"  # the same in every run: no spread shown
    assert theirs["final"] == f"78.00% ± {math.sqrt(2 * 0.18**2):.2%}"
    assert theirs["first step at 95%"] == "20 (1 of 2 runs)"
    assert theirs["wall time"] == "2.0 min"


def test_both_tables_show_what_each_class_was_forgotten(runs, tmp_path):
    """Run a forgets 0.2 of class 0 and nothing of class 1; run b 0.1 of class 1 and nothing of
    class 0; run c has no per-class accuracies (made before runs recorded them)."""
    folders = [
        run_with_curve(runs, tmp_path, "a", "pre-dfkd", [0.8, 0.8], 60.0, [[0.9, 0.5], [0.7, 0.9]]),
        run_with_curve(runs, tmp_path, "b", "pre-dfkd", [0.8, 0.8], 60.0, [[0.5, 0.9], [0.6, 0.8]]),
        run_with_curve(runs, tmp_path, "c", "adversarial", [0.8, 0.8], 60.0),
    ]
    comparison = compare_runs(folders)
    table = cells(comparison.markdown())
    column = "class forgetting, mean / largest"
    assert table["a"][column] == "10.00% / 20.00%"
    assert table["b"][column] == "5.00% / 10.00%"
    assert table["c"][column] == "-"
    summaries = comparison.group_summaries(["method"])
    assert summaries["method=pre-dfkd"]["largest_class_forgetting"] == pytest.approx(
        {"mean": 0.15, "std": math.sqrt(2 * 0.05**2), "min": 0.1, "max": 0.2, "count": 2})
    assert summaries["method=adversarial"]["class_forgetting"] == {"count": 0}
    groups = cells(comparison.group_markdown(["method"]))
    assert groups["method=pre-dfkd"][column] == (
        f"7.50% ± {math.sqrt(2 * 0.025**2):.2%} / 15.00% ± {math.sqrt(2 * 0.05**2):.2%}")
    assert groups["method=adversarial"][column] == "-"


def test_a_group_of_runs_without_test_data_has_no_accuracies(runs, tmp_path):
    alone = run_with_curve(runs, tmp_path, "never", "pre-dfkd", [0.5, 0.6], 60.0)
    comparison = compare_runs([alone, runs / "pre-dfkd"])
    summary = comparison.group_summaries(["method"])["method=pre-dfkd"]
    assert summary["final_accuracy"]["count"] == 1 and summary["seconds"]["count"] == 2
    row = cells(comparison.group_markdown(["method"]))["method=pre-dfkd"]
    assert (row["final"], row["first step at 95%"]) == ("60.00%", "never")
    no_test_data = cells(compare_runs([runs / "pre-dfkd"]).group_markdown(["method", "seed"]))
    assert list(no_test_data) == [f"method=pre-dfkd, seed={DistillConfig().seed}"]
    assert no_test_data[f"method=pre-dfkd, seed={DistillConfig().seed}"]["final"] == "-"
    assert no_test_data[f"method=pre-dfkd, seed={DistillConfig().seed}"]["first step at 95%"] == "-"


def test_grouping_by_a_key_no_config_has_is_refused_by_name(runs):
    comparison = compare_runs([runs / "adversarial"])
    with pytest.raises(ValueError, match="group by nonsense: not in the config of run adversarial"):
        comparison.groups(["method", "nonsense"])
    with pytest.raises(ValueError, match="keys: give a list of config keys"):
        comparison.groups("method")
    with pytest.raises(ValueError, match="keys: give a list"):
        comparison.group_summaries([])


def test_the_compare_command_groups_runs_in_table_json_and_plot(runs, tmp_path, capsys):
    folders = [run_with_curve(runs, tmp_path, f"r{i}", "pre-dfkd", [0.9, 0.95 + i / 100], 60.0)
               for i in range(2)]  # fmt: skip
    summary, plot = tmp_path / "summary.json", tmp_path / "accuracy.png"
    arguments = ["compare", *map(str, folders), str(runs / "adversarial"), "--group-by", "method",
                 "--json", str(summary)]  # fmt: skip
    assert main(arguments) == 0
    captured = capsys.readouterr()
    assert "| group | runs | final |" in captured.out
    assert "| method=pre-dfkd | 2 | 95.50% ± 0.71% |" in captured.out
    assert "differ in" not in captured.err
    written = json.loads(summary.read_text())
    assert set(written["groups"]) == {"method=pre-dfkd", "method=adversarial"}
    assert written["groups"]["method=pre-dfkd"]["final_accuracy"]["mean"] == pytest.approx(0.955)
    metrics = json.loads((folders[1] / "metrics.json").read_text())
    metrics["config"].update(seed=7, student_lr=0.5)
    (folders[1] / "metrics.json").write_text(json.dumps(metrics))
    assert main(arguments[:-2]) == 0
    assert "method=pre-dfkd: its runs differ in seed, student_lr" in capsys.readouterr().err
    assert main(["compare", str(runs / "adversarial"), "--group-by", "nonsense"]) == 2
    assert "group by nonsense: not in the config of run adversarial" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    assert main(arguments[:-2] + ["--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_groups_band_is_the_mean_and_range_at_the_steps_all_its_runs_evaluated():
    curves = [
        [{"step": 1, "accuracy": 0.2}, {"step": 2, "accuracy": 0.4}, {"step": 3, "accuracy": 0.9}],
        [{"step": 2, "accuracy": 0.6}, {"step": 3, "accuracy": 0.7}, {"step": 4, "accuracy": 0.8}],
        [{"step": 2, "loss": 1.0}],  # a run without test data
    ]
    steps, means, lows, highs = curve_band(curves)
    assert steps == [2, 3]
    assert means == pytest.approx([0.5, 0.8])
    assert (lows, highs) == ([0.4, 0.7], [0.6, 0.9])
    assert curve_band([curves[2]]) == curve_band([]) == ([], [], [], [])


def test_differing_keys_names_what_is_not_the_same_in_every_config():
    configs = [{"method": "pre-dfkd", "seed": 0, "lr": 0.1}, {"method": "pre-dfkd", "seed": 1},
               {"method": "pre-dfkd", "seed": 0, "lr": 0.1}]  # fmt: skip
    assert differing_keys(configs) == ["lr", "seed"]
    assert differing_keys(configs[:1]) == differing_keys([]) == []


def test_a_run_records_its_teachers_class_size_and_weights(runs):
    teacher, _ = networks()
    metrics = json.loads((runs / "adversarial" / "metrics.json").read_text())
    assert metrics["teacher"] == describe_network(teacher)
    assert metrics["teacher"]["class"] == type(teacher).__name__
    assert metrics["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())


def test_a_networks_fingerprint_follows_its_weights_not_their_layout():
    torch.manual_seed(3)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5))
    network.register_buffer("mask", torch.rand(4) > 0.5)  # a bool buffer hashes too
    fingerprint = describe_network(network)["weights_sha256"]
    assert len(fingerprint) == 64
    channels_last = network.to(memory_format=torch.channels_last)
    assert describe_network(channels_last)["weights_sha256"] == fingerprint
    assert describe_network(copy.deepcopy(network).bfloat16())["weights_sha256"] != fingerprint
    changed = copy.deepcopy(network)
    with torch.no_grad():
        changed[0].weight[0, 0, 0, 0] += 1e-3
    assert describe_network(changed)["weights_sha256"] != fingerprint
    assert describe_network(network)["parameters"] == 3 * 5 * 9 + 5 + 5 + 5


def test_runs_group_by_their_teacher_and_name_a_teacher_that_differs(runs, tmp_path):
    other = tmp_path / "other-teacher"
    shutil.copytree(runs / "memory-bank", other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["config"]["method"] = "adversarial"
    metrics["teacher"]["weights_sha256"] = "f" * 64
    (other / "metrics.json").write_text(json.dumps(metrics))
    comparison = compare_runs([runs / "adversarial", other])
    ours = describe_network(networks()[0])
    assert comparison.groups(["teacher"]) == {
        f"teacher={ours['class']}:{ours['weights_sha256'][:12]}": ["adversarial"],
        f"teacher={ours['class']}:ffffffffffff": ["other-teacher"],
    }
    assert comparison.group_summaries(["method"])["method=adversarial"]["differing_config"] == [
        "teacher"]
    del metrics["teacher"]  # a run made before teachers were recorded
    (other / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="group by teacher: run other-teacher recorded no teacher"):
        compare_runs([runs / "adversarial", other]).groups(["teacher"])
