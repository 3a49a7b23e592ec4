"""benchmarks/profile_step.py, the script that says where a step's time goes on a GPU machine:
run here on the CPU, where everything but its CUDA parts can be checked."""

from __future__ import annotations

import gzip
import importlib
import json
import warnings
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
STEP_PARTS = {"generator update", "replay update", "student batches", "student update"}


@pytest.fixture
def profile_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("profile_step")


def test_every_part_of_a_pre_dfkd_step_is_timed_and_profiled(profile_step, tmp_path, capsys):
    report_path = tmp_path / "profile.json"
    assert profile_step.main(["--preset", "mnist", "--device", "cpu", "--steps", "2", "--warmup",
                              "1", "--top", "6", "--set", "batch_size=24", "--set",
                              "student_steps=2", "--set", "vae_batch_size=8", "--json",
                              str(report_path), "--trace", str(tmp_path / "trace.json.gz")]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["config"]["batch_size"] == 24 and report["config"]["student_steps"] == 2
    assert report["images_per_step"] == 24 * 3
    phases = report["phase_ms"]
    assert set(phases) == STEP_PARTS | {"other", "step"}
    assert all(phases[name] > 0 for name in STEP_PARTS)
    assert sum(phases[name] for name in STEP_PARTS | {"other"}) >= phases["step"] * 0.999
    assert report["step_ms"] > 0 and report["aten_calls_per_step"] > 10
    assert len(report["top_cpu_ops"]) == 6
    # "aten::convolution" or, where oneDNN is not used, "aten::_slow_conv2d_forward"
    assert any("conv" in op["name"] for op in report["top_cpu_ops"])
    assert "device_busy_ms_per_step" not in report  # a CUDA measurement
    with gzip.open(tmp_path / "trace.json.gz") as trace:
        events = json.load(trace)["traceEvents"]
    marked = {event.get("name") for event in events}
    assert {f"dfkd_fast.{part}" for part in STEP_PARTS} <= marked
    text = capsys.readouterr().out
    assert "| student update |" in text and "lenet5 -> lenet5_half" in text


def test_a_step_leaves_the_run_as_it_was(profile_step):
    """The timed parts are marked through Run.phase, replaced for the measurement only."""
    from harness import preset_run

    run = preset_run("mnist", method="pre-dfkd", batch_size=16, student_steps=1, vae_batch_size=8)
    profile_step.step(run)
    parts = profile_step.phase_milliseconds(run, steps=1)
    assert set(parts) == STEP_PARTS | {"other", "step"}
    assert "phase" not in vars(run)


def test_warnings_are_counted_by_the_place_that_raised_them(profile_step):
    def noisy():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")

    places = profile_step.warning_places(noisy, "synchronizing")
    assert sorted(places.values()) == [1, 3]
    assert all(place.startswith("test_profile_step.py:") for place in places)
    assert any("warnings.warn(" in place for place in places)


def test_a_set_that_makes_no_sound_config_is_refused(profile_step, capsys):
    with pytest.raises(SystemExit):
        profile_step.main(["--set", "no_such_field=3"])
    assert "'no_such_field' is not a DistillConfig field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_step.main(["--set", "batch_size"])
    assert "FIELD=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_step.main(["--set", "method=unlabeled"])
    assert "the unlabeled method needs a collection" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_step.main(["--preset", "mnist", "--set", "batch_size=0"])
    assert "batch_size must be >= 1" in capsys.readouterr().err


def test_device_work_leaves_out_the_step_parts_mirrored_on_the_device(profile_step):
    import torch
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernel = SimpleNamespace(device_type=cuda, key="void cudnn::conv_kernel", is_user_annotation=False)
    annotation = SimpleNamespace(device_type=cuda, key="dfkd_fast.student update",
                                 is_user_annotation=True)  # fmt: skip
    unflagged = SimpleNamespace(device_type=cuda, key="dfkd_fast.generator update")  # older torch
    operator = SimpleNamespace(device_type=cpu, key="aten::conv2d", is_user_annotation=False)
    assert [profile_step.is_device_work(e) for e in (kernel, annotation, unflagged, operator)] == [
        True, False, False, False]  # fmt: skip
