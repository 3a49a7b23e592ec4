"""The digits demo, its command line, the small models and the atomic file helpers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dfkd_fast.cli import main
from dfkd_fast.demo import DemoConfig, run_demo
from dfkd_fast.io import atomic_torch_save, atomic_write_text, load_checkpoint
from dfkd_fast.models import Generator, small_cnn

pytest.importorskip("sklearn", reason="the demo reads scikit-learn's bundled digits")

TINY = dict(steps=20, teacher_epochs=3, batch_size=32, eval_every=10)


def test_demo_trains_distills_and_writes_its_report(tmp_path):
    result = run_demo(DemoConfig(**TINY, output_dir=str(tmp_path)))
    assert result.teacher_accuracy > 0.8  # three epochs suffice for the digits
    assert 0.0 <= result.student_accuracy <= 1.0
    assert result.student_parameters * 10 < result.teacher_parameters
    assert [step for step, _ in result.accuracy_curve] == [10, 20]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["student_accuracy"] == result.student_accuracy
    assert metrics["config"]["steps"] == 20
    assert (tmp_path / "accuracy_curve.csv").read_text().splitlines()[0] == (
        "step,student_test_accuracy"
    )
    checkpoint = load_checkpoint(tmp_path / "student.pt")
    student = small_cnn(checkpoint["config"]["student_width"])
    student.load_state_dict(checkpoint["state_dict"])


def test_demo_is_reproducible_under_its_seed(tmp_path):
    first = run_demo(DemoConfig(**TINY, output_dir=str(tmp_path / "a")))
    second = run_demo(DemoConfig(**TINY, output_dir=str(tmp_path / "b")))
    assert first.accuracy_curve == second.accuracy_curve


@pytest.mark.parametrize(
    "field,value", [("steps", 0), ("batch_size", -1), ("temperature", 0.0), ("bn_loss_weight", -1.0)]
)
def test_demo_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})


def test_cli_reports_bad_arguments_without_a_traceback(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        run_demo(DemoConfig(**TINY, output_dir=str(blocker / "run")))


def test_python_dash_m_runs_the_cli():
    completed = subprocess.run(
        [sys.executable, "-m", "dfkd_fast", "demo", "--help"], capture_output=True, text=True
    )
    assert completed.returncode == 0 and "--student-width" in completed.stdout


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 6, 10)])
def test_generator_makes_images_of_the_asked_shape(image_shape):
    generator = Generator(16, image_shape, width=8)
    assert generator(torch.randn(5, 16)).shape == (5, *image_shape)


@pytest.mark.parametrize("image_shape", [(1, 7, 8), (1, 8, 9), (0, 8, 8)])
def test_generator_rejects_image_sizes_it_cannot_make(image_shape):
    with pytest.raises(ValueError, match="even height and width"):
        Generator(16, image_shape)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save(target, {"bad": Unpicklable()})
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)


def test_checkpoints_with_code_are_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({"callable": print}, path)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_checkpoint(path)
