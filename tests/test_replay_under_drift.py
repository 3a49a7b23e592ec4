"""benchmarks/replay_under_drift.py: the class schedule, the loss that pulls the generator onto a
phase's classes, the summary of a run, and a short run of the script on the digits default."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dfkd_fast.distill import DistillConfig, steps

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def drift(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return importlib.import_module("replay_under_drift")


def test_phases_split_the_classes_and_the_steps_in_order(drift):
    assert [drift.phase_classes(p, 3, 10) for p in range(3)] == [[0, 1, 2], [3, 4, 5],
                                                                  [6, 7, 8, 9]]  # fmt: skip
    assert [drift.phase_classes(p, 2, 10) for p in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [drift.phase_of(step, 9, 3) for step in range(1, 10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [drift.phase_of(step, 5, 2) for step in range(1, 6)] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pull_is_the_cross_entropy_of_the_mean_prediction_to_the_phases_classes(drift, dtype):
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(37, 10, generator=generator) * 20).to(dtype)  # extreme logits
    classes = [3, 4, 5]
    mean = logits.double().softmax(dim=1).mean(dim=0)
    expected = -mean[classes].log().mean()
    assert drift.pull_onto(logits, classes).item() == pytest.approx(expected.item(), rel=1e-5)
    onto = torch.full((8, 10), -30.0)
    onto[torch.arange(8), torch.tensor([3, 4, 5, 3, 4, 5, 3, 4])] = 30.0
    away = torch.full((8, 10), -30.0)
    away[:, 0] = 30.0
    assert drift.pull_onto(onto, classes) < 1.2 < drift.pull_onto(away, classes)


def test_the_drifting_generator_loss_swaps_the_balance_term_for_the_pull(drift):
    generator = torch.Generator().manual_seed(7)
    teacher_logits, student_logits = torch.randn(2, 24, 10, generator=generator)
    config = DistillConfig(balance_weight=3.0)
    with drift.Drift(total_steps=10, phases=2) as drifting:
        drifting.phase = 1
        assert steps.generator_loss == drifting.generator_loss
        loss, disagreement = steps.generator_loss(teacher_logits, student_logits, None, None,
                                                  config)  # fmt: skip
    assert steps.generator_loss is not drifting.generator_loss  # restored
    unbalanced, expected_disagreement = steps.generator_loss(
        teacher_logits, student_logits, None, None, DistillConfig(balance_weight=0.0))
    pull = drift.pull_onto(teacher_logits, [5, 6, 7, 8, 9])
    torch.testing.assert_close(loss, unbalanced + 3.0 * pull)
    torch.testing.assert_close(disagreement, expected_disagreement)


def test_the_summary_reads_each_side_of_the_switch(drift):
    rows = [[0.9, 0.8, 0.1, 0.2], [0.6, 0.7, 0.5, 0.6], [0.7, 0.5, 0.9, 0.8]]
    shares = [[0.5, 0.4, 0.1, 0.0], [0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5]]
    curve = [{"step": step, "accuracy": sum(row) / 4, "class_accuracy": row,
              "synthetic_class_shares": share}
             for step, row, share in zip((2, 4, 6), rows, shares)]  # fmt: skip
    numbers = drift.summary(curve, total_steps=6, phases=2)
    assert numbers["switch_step"] == 4 and numbers["before_step"] == 2
    assert numbers["first_classes"] == [0, 1]
    assert numbers["first_classes_before"] == pytest.approx(0.85)
    assert numbers["later_classes_before"] == pytest.approx(0.15)
    assert numbers["first_classes_final"] == pytest.approx(0.6)
    assert numbers["later_classes_final"] == pytest.approx(0.85)
    assert numbers["first_classes_lowest_after_switch"] == pytest.approx(0.6)
    assert numbers["synthetic_share_of_first_classes_before"] == pytest.approx(0.9)
    assert numbers["synthetic_share_of_first_classes_final"] == 0.0


def test_a_short_run_on_the_digits_default_writes_its_summary(drift, tmp_path, capsys):
    report = tmp_path / "drift.json"
    assert drift.main(["--steps", "6", "--eval-every", "2", "--methods", "pre-dfkd",
                       "--output-root", str(tmp_path / "runs"), "--json", str(report),
                       "--plot", str(tmp_path / "drift.png"),
                       "--batch-size", "16", "--student-steps", "1", "--quiet"]) == 0  # fmt: skip
    assert steps.STEP_FUNCTIONS["pre-dfkd"] is steps.replay_step  # restored
    saved = json.loads(report.read_text())
    assert saved["distill_arguments"] == ["--eval-every", "2", "--batch-size", "16",
                                          "--student-steps", "1", "--quiet"]  # fmt: skip
    (run,) = saved["runs"]
    assert run["method"] == "pre-dfkd" and run["switch_step"] == 4 and run["before_step"] == 2
    curve = json.loads((tmp_path / "runs" / "pre-dfkd-seed0" / "metrics.json").read_text())["curve"]
    assert run == {**run, **drift.summary(curve, 6, 2)}
    assert "pre-dfkd, seed 0: classes [0, 1, 2, 3, 4]" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "drift.png").read_bytes().startswith(b"\x89PNG")
