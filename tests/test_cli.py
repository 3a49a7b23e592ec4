"""The dfkd-fast command: train-teacher and distill on the embedded digits, --resume, and
errors reported as messages with exit status 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfkd_fast import cli
from dfkd_fast.cli import main
from dfkd_fast.distill import FIELD_HELP, DistillConfig, report
from dfkd_fast.io import load_checkpoint
from dfkd_fast.training import TRAIN_FIELD_HELP, TrainConfig, load_classifier
from tests.conftest import same_state

pytest.importorskip("sklearn", reason="the embedded default reads scikit-learn's bundled digits")

TINY = ["--steps", "3", "--batch-size", "16", "--student-steps", "1", "--eval-every", "1",
        "--checkpoint-every", "2", "--quiet"]  # fmt: skip


@pytest.fixture(autouse=True)
def compiled_cpu_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_distill_runs_the_embedded_default_and_resumes_idempotently(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["distill", "--method", "memory-bank", "--output-dir", str(output), *TINY]) == 0
    printed, bars = capsys.readouterr()
    assert "teacher: cnn32 on the digits" in printed and "student: cnn8, final" in printed
    assert "the teacher's classes of the last synthetic samples: " in printed
    assert "accuracy.png, class_accuracy.png, samples.png, class_shares.png, student.pt)" in printed
    assert re.search(r"forgetting per class \(its best accuracy before the end minus its final\): "
                     r"mean \d+\.\d\d%, largest \d+\.\d\d%", printed)  # fmt: skip
    assert "teacher (supervised)" not in bars and "distill (" not in bars  # --quiet
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


@pytest.mark.parametrize("method", ["adversarial", "pre-dfkd"])
def test_distill_without_matplotlib_says_so_instead_of_listing_plots(method, tmp_path, capsys,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # its import now raises ImportError

    def no_sample_grid(*args, **kwargs):
        raise AssertionError("the sample grid's latents drawn with nothing to plot them")

    monkeypatch.setattr(report, "sample_prior", no_sample_grid)
    output = tmp_path / "run"
    assert main(["distill", "--method", method, "--output-dir", str(output), *TINY]) == 0
    printed = capsys.readouterr().out
    assert (f"report: {output}/ (metrics.json, curve.csv, student.pt); no plots without "
            "matplotlib: pip install matplotlib") in printed  # fmt: skip
    assert not list(output.glob("*.png"))


def test_sigterm_stops_distill_after_a_step_with_a_checkpoint_and_the_shells_exit_code(tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "dfkd_fast", "distill", "--output-dir", str(output),
               "--steps", "5000", "--batch-size", "16", "--student-steps", "1",
               "--eval-every", "1000", "--checkpoint-every", "1", "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (output / "checkpoint.pt").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, error = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, error
    step = load_checkpoint(output / "checkpoint.pt")["step"]
    assert 1 <= step < 5000
    assert f"stopped by SIGTERM after step {step} of 5000" in error
    assert "--resume continues it" in error and "Traceback" not in error
    assert not (output / "student.pt").exists()


def test_train_teacher_on_digits_writes_a_loadable_classifier(tmp_path, capsys):
    outputs = [tmp_path / "teacher.pt", tmp_path / "again.pt"]
    bars = []
    for output, quiet in zip(outputs, ([], ["--quiet"])):
        torch.manual_seed(len(str(output)))  # the global random state must not matter
        assert main(["train-teacher", "--dataset", "digits", "--arch", "cnn8", "--epochs", "2",
                     "--output", str(output), *quiet]) == 0  # fmt: skip
        printed, bar = capsys.readouterr()
        assert f"saved {output}" in printed
        bars.append(bar)
    assert "teacher (supervised)" in bars[0] and "teacher (supervised)" not in bars[1]
    model, info = load_classifier(outputs[0])
    assert info.arch == "cnn8" and info.image_shape == (1, 8, 8) and 0 < info.test_accuracy <= 1
    assert same_state(model.state_dict(), load_classifier(outputs[1])[0].state_dict())


def test_train_teacher_resume_continues_a_checkpoint_and_leaves_a_finished_teacher(tmp_path, capsys):
    output = tmp_path / "teacher.pt"
    checkpoint = tmp_path / "teacher.checkpoint.pt"
    command = ["train-teacher", "--dataset", "digits", "--arch", "cnn8", "--epochs", "1",
               "--output", str(output), "--quiet"]  # fmt: skip
    torch.save({"not": "a training"}, checkpoint)
    assert main(command) == 2
    assert "unfinished training: resume it, or delete it" in capsys.readouterr().err
    assert main([*command, "--resume"]) == 2
    assert "not a dfkd-fast training checkpoint" in capsys.readouterr().err
    checkpoint.unlink()
    assert main([*command, "--resume"]) == 0  # nothing to resume: trains from the start
    assert output.exists() and not checkpoint.exists()  # removed once the teacher is saved
    before = output.read_bytes()
    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out and output.read_bytes() == before


def test_distill_is_reproducible_under_its_seed_whatever_the_global_random_state(tmp_path):
    """The CLI initialises the student from --seed; the user's Python code may have drawn
    anything from torch's global generator before."""
    first = tmp_path / "first"
    assert main(["distill", "--output-dir", str(first), *TINY]) == 0
    teacher = ["--teacher", str(first / "digits-teacher.pt")]
    students = {}
    for name, seed in (("again", 0), ("other-seed", 1)):
        torch.rand(1000)
        assert main(["distill", *teacher, "--output-dir", str(tmp_path / name), "--seed",
                     str(seed), *TINY]) == 0  # fmt: skip
        students[name] = load_checkpoint(tmp_path / name / "student.pt")["state_dict"]
    reference = load_checkpoint(first / "student.pt")["state_dict"]
    assert same_state(students["again"], reference)
    assert not same_state(students["other-seed"], reference)


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
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    for command in (["distill", "--output-dir", str(tmp_path / "y")],
                    ["train-teacher", "--dataset", "digits", "--arch", "cnn8"]):  # fmt: skip
        assert main([*command, "--device", missing]) == 2
        assert f"--device '{missing}'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # refused before the digits teacher was trained
    assert main(["distill", "--method", "unlabeled", "--output-dir", str(tmp_path / "u")]) == 2
    assert "needs at least one --collection" in capsys.readouterr().err
    assert main(["distill", "--collection", "noise:64", "--output-dir", str(tmp_path / "u")]) == 2
    assert "--collection is for --method unlabeled" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
    assert main(["distill", "--test-data", str(tmp_path), "--output-dir", str(tmp_path / "z")]) == 2
    assert "--test-data: only with --teacher" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["distill", "--output-dir", str(tmp_path / "file" / "run")]) == 2
    assert "output directory" in capsys.readouterr().err
    teacher = tmp_path / "teacher.pt"
    assert main(["train-teacher", "--dataset", "digits", "--arch", "cnn8", "--epochs", "1",
                 "--output", str(teacher), "--quiet"]) == 0  # fmt: skip
    assert main(["distill", "--teacher", str(teacher), "--teacher-arch", "cnn16", "--dataset",
                 "digits", "--output-dir", str(tmp_path / "w")]) == 2  # fmt: skip
    assert "records its own: cnn8 on digits" in capsys.readouterr().err


def test_an_interrupt_outside_a_run_is_a_message_and_the_shells_exit_code(monkeypatch, capsys):
    def interrupted(arguments):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "compare", interrupted)
    assert main(["compare", "anything"]) == 130
    error = capsys.readouterr().err
    assert "dfkd-fast compare: interrupted" in error and "Traceback" not in error


def test_cli_keeps_freed_host_memory_before_any_command(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_host_memory", lambda: calls.append("retained"))
    assert main(["distill", "--steps", "0", "--output-dir", str(tmp_path / "x")]) == 2
    assert main(["train-teacher", "--dataset", "mnist", "--arch", "lenet5"]) == 2
    assert calls == ["retained", "retained"]


def test_version_names_the_package_torch_and_the_compiled_kernels(capsys, monkeypatch):
    import dfkd_fast
    from dfkd_fast._extension import cpu_kernel_target

    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: the line is still one line
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"dfkd-fast {dfkd_fast.__version__} (torch {torch.__version__};")
    assert printed.count("\n") == 1
    assert dfkd_fast.extension_status() in printed
    assert f"compiled kernels: cpu ({cpu_kernel_target()})" in printed


def test_every_config_flag_is_explained_with_its_default_and_the_presets_values(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps INT steps of the run; each is one generator update" in text
    assert "(default 800; presets: digits 300, mnist 2400, mnist-unlabeled 10000" in text
    assert "--score STR unlabeled: relatedness score, msp | entropy | energy" in text
    for name in ("student_ema", "vae_fitted_prior", "cpu_amp", "uniform_share"):
        assert f"--{name.replace('_', '-')}" in text and FIELD_HELP[name].split(",")[0] in text
    assert set(FIELD_HELP) == {field.name for field in dataclasses.fields(DistillConfig)}
    assert set(TRAIN_FIELD_HELP) == {field.name for field in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("command", [[], ["distill"], ["train-teacher"], ["compare"]])
def test_help_prints_percent_signs_once(command, capsys):
    """argparse %-formats help strings, not descriptions: a doubled % shows in one of them."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "%%" not in text
    if command == ["compare"]:
        assert "first step at 95%," in text


def test_module_entry_point_prints_help():
    completed = subprocess.run([sys.executable, "-m", "dfkd_fast", "distill", "--help"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    assert "--method" in completed.stdout and "pre-dfkd" in completed.stdout


def test_replay_quality_describes_a_finished_pre_dfkd_run(tmp_path, capsys):
    """benchmarks/replay_quality.py reads a run's checkpoint and scores three kinds of images;
    only the numbers' shapes and ranges can be checked on a 3-step run."""
    script = Path(__file__).parents[1] / "benchmarks" / "replay_quality.py"
    spec = importlib.util.spec_from_file_location("replay_quality", script)
    replay_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay_quality)
    run = tmp_path / "run"
    assert main(["distill", "--method", "pre-dfkd", "--replay-start", "0", "--output-dir",
                 str(run), *TINY]) == 0  # fmt: skip
    report = tmp_path / "quality.json"
    assert replay_quality.main([str(run), "--teacher", str(run / "digits-teacher.pt"),
                                "--count", "40", "--json", str(report)]) == 0  # fmt: skip
    numbers = json.loads(report.read_text())
    assert numbers["step"] == 3 and numbers["count"] == 40
    assert set(numbers["samples"]) == {"generator", "vae, fitted Gaussian", "vae, N(0, I)"}
    for described in numbers["samples"].values():
        assert sum(described["teacher_class_counts"]) == 40
        assert len(described["teacher_class_counts"]) == 10
        assert 0.1 <= described["teacher_top_probability"] <= 1
        assert 0 <= described["student_agreement"] <= 1 and described["image_std"] > 0
    assert numbers["posterior_std"] > 0 and numbers["posterior_mean_spread"] > 0
    assert "posteriors of the generator's images" in capsys.readouterr().out
    other = tmp_path / "memory-bank"
    assert main(["distill", "--method", "memory-bank", "--teacher", str(run / "digits-teacher.pt"),
                 "--output-dir", str(other), *TINY]) == 0  # fmt: skip
    with pytest.raises(SystemExit):
        replay_quality.main([str(other), "--teacher", str(run / "digits-teacher.pt")])
    assert "not a pre-dfkd one" in capsys.readouterr().err
