"""The dfkd-fast command: train-teacher and distill on the embedded digits, --resume, and
errors reported as messages with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dfkd_fast.cli import main
from dfkd_fast.io import load_checkpoint
from dfkd_fast.training import load_classifier

pytest.importorskip("sklearn", reason="the embedded default reads scikit-learn's bundled digits")

TINY = ["--steps", "3", "--batch-size", "16", "--student-steps", "1", "--eval-every", "1",
        "--checkpoint-every", "2", "--quiet"]  # fmt: skip


@pytest.fixture(autouse=True)
def compiled_cpu_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_distill_runs_the_embedded_default_and_resumes_idempotently(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["distill", "--method", "memory-bank", "--output-dir", str(output), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "teacher: cnn32 on the digits" in printed and "student: cnn8, final" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["config"]["method"] == "memory-bank" and metrics["config"]["batch_size"] == 16
    assert metrics["config"]["latent_dim"] == 64  # from the digits preset
    assert [entry["step"] for entry in metrics["curve"]] == [1, 2, 3]
    teacher, info = load_classifier(output / "digits-teacher.pt")
    assert info.test_accuracy > 0.9
    student, student_info = load_classifier(output / "student.pt")
    assert student_info.arch == "cnn8" and student_info.dataset == "digits"
    assert load_checkpoint(output / "student.pt")["distill_config"]["steps"] == 3
    # a second call refuses to overwrite; with --resume it finds the run finished
    assert main(["distill", "--method", "memory-bank", "--output-dir", str(output), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    before = (output / "student.pt").read_bytes()
    assert main(["distill", "--method", "memory-bank", "--output-dir", str(output), "--resume",
                 *TINY]) == 0  # fmt: skip
    assert load_checkpoint(output / "student.pt")["state_dict"].keys() == \
        load_checkpoint(output / "checkpoint.pt")["run"]["student"].keys()  # fmt: skip
    assert len(before) > 0
    assert main(["distill", "--method", "memory-bank", "--output-dir", str(output), "--resume",
                 "--student-lr", "0.3", *TINY]) == 2  # fmt: skip
    assert "another config (student_lr" in capsys.readouterr().err


def test_train_teacher_on_digits_writes_a_loadable_classifier(tmp_path, capsys):
    output = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--dataset", "digits", "--arch", "cnn8", "--epochs", "2",
                 "--output", str(output)]) == 0  # fmt: skip
    model, info = load_classifier(output)
    assert info.arch == "cnn8" and info.image_shape == (1, 8, 8) and 0 < info.test_accuracy <= 1
    assert f"saved {output}" in capsys.readouterr().out


def test_cli_errors_are_messages(tmp_path, capsys):
    assert main(["train-teacher", "--dataset", "mnist", "--arch", "lenet5"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path / "missing.pt"), "--quiet"]) == 2
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    assert main(["distill", "--teacher", str(corrupt)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert main(["distill", "--steps", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--method", "dfad"])


def test_module_entry_point_prints_help():
    completed = subprocess.run([sys.executable, "-m", "dfkd_fast", "distill", "--help"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    assert "--method" in completed.stdout and "pre-dfkd" in completed.stdout
