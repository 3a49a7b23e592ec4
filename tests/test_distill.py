"""The distillation engine: every method runs and reports, runs are reproducible, a killed run
resumes to the same result, steps make no host sync, bad input is refused before anything runs."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import signal
import sys
import warnings

import pytest
import torch
from torch import nn

from dfkd_fast.data import ImageSet
from dfkd_fast.distill import METHODS, DistillConfig, RunStopped, distill, preset_config
from dfkd_fast.distill.config import DATA_FREE_METHODS
from dfkd_fast.distill import engine, steps
from dfkd_fast.distill.averaging import WeightAverage
from dfkd_fast.distill.replay import GenerativeReplay, MemoryBank
from dfkd_fast.distill.report import class_forgetting, robustness
from dfkd_fast.distill.streams import (
    REPLAY_STREAM,
    SAMPLE_GRID_STREAM,
    SAMPLER_STREAM,
    stream_seed,
)
from dfkd_fast.io import load_checkpoint
from dfkd_fast.models import lenet5, small_cnn
from dfkd_fast.models.vae import VAE
from dfkd_fast.unlabeled import Collection, Source, noise_source
from dfkd_fast.unlabeled.scores import score_collection
from tests.conftest import needs_the_main_thread, requires_cuda, same_state

IMAGE_SHAPE = (1, 8, 8)
TINY = dict(steps=4, student_steps=2, batch_size=16, latent_dim=8, generator_width=4,
            vae_latent_dim=4, vae_width=4, memory_bank_size=24, eval_every=2,
            checkpoint_every=2, replay_start=0.25)  # fmt: skip


@pytest.fixture(autouse=True)
def compiled_cpu_kernels(monkeypatch):
    """The engine runs the ops' C++ CPU kernels here, as a user's would; the Triton kernels are
    tested under the interpreter by their own tests."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def networks(seed=0):
    torch.manual_seed(seed)
    return small_cnn(4).eval(), small_cnn(2)


def held_out(count=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, *IMAGE_SHAPE, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return ImageSet(images, labels, (0.0,), (1.0,), 10)


def small_collection(method):
    """For the unlabeled method: noise plus random 'digit' images of another size and colour."""
    if method != "unlabeled":
        return None
    generator = torch.Generator().manual_seed(2)
    other = Source.from_float("other", torch.rand(30, 3, 12, 12, generator=generator))
    return Collection([noise_source(40, IMAGE_SHAPE), other], IMAGE_SHAPE, (0.5,), (0.25,))


def run(tmp_path, method, name="run", resume=False, **overrides):
    teacher, student = networks()
    config = DistillConfig(method=method, **{**TINY, **overrides})
    return distill(teacher, student, config, IMAGE_SHAPE, test_set=held_out(),
                   output_dir=tmp_path / name, progress=False, resume=resume,
                   collection=small_collection(method))  # fmt: skip


def same_weights(first: nn.Module, second: nn.Module) -> bool:
    return same_state(first.state_dict(), second.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_the_student_and_writes_its_report(tmp_path, method):
    _, untouched = networks()
    result = run(tmp_path, method)
    assert not same_weights(result.student, untouched)
    files = {path.name for path in (tmp_path / "run").iterdir()}
    assert {"metrics.json", "curve.csv", "checkpoint.pt", "student.pt"} <= files
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 4
    assert [entry["step"] for entry in metrics["curve"]] == [2, 4]
    assert metrics["robustness"]["evaluations"] == 2
    assert 0 <= metrics["robustness"]["final_accuracy"] <= 1
    assert all(math.isfinite(entry["student_loss"]) for entry in metrics["curve"])
    expected_memory = {"adversarial": 0, "memory-bank": 24 * 64 * 4, "unlabeled": 0}
    if method in expected_memory:
        assert metrics["replay_memory_bytes"] == expected_memory[method]
    else:
        assert metrics["replay_memory_bytes"] > 0
    assert (tmp_path / "run" / "curve.csv").read_text().count("\n") == 3
    saved = load_checkpoint(tmp_path / "run" / "student.pt")
    assert saved["distill_config"]["method"] == method
    reloaded = small_cnn(2)
    reloaded.load_state_dict(saved["state_dict"])
    assert same_weights(reloaded, result.student)
    assert set(result.plots) == {name for name in files if name.endswith(".png")}
    if importlib.util.find_spec("matplotlib") is not None:
        last = "scores.png" if method == "unlabeled" else "class_shares.png"
        assert result.plots == ["accuracy.png", "class_accuracy.png", "samples.png", last]


def test_the_package_itself_is_the_entry_point_the_api_names():
    """``dfkd_fast.distill(teacher, student, config)`` is ``dfkd_fast.distill.distill``."""
    import dfkd_fast

    config = DistillConfig(method="pre-dfkd", **TINY)
    results = []
    for entry_point in (dfkd_fast.distill, distill):
        teacher, student = networks()
        results.append(entry_point(teacher, student, config, IMAGE_SHAPE, progress=False))
    assert same_weights(results[0].student, results[1].student)
    assert results[0].metrics["step"] == 4
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        dfkd_fast.distill(*networks(), {"steps": 4})


@pytest.mark.parametrize("method", METHODS)
def test_a_run_is_reproducible_under_its_seed(tmp_path, method):
    first = run(tmp_path, method, "first")
    second = run(tmp_path, method, "second")
    assert same_weights(first.student, second.student)
    third = run(tmp_path, method, "third", seed=1)
    assert not same_weights(first.student, third.student)


def test_the_data_free_methods_see_the_same_samples_until_replay_starts():
    """Replay draws from its own random stream: until its first replay step, pre-dfkd and
    memory-bank train the generator and the student exactly as adversarial does; from then on
    they differ."""
    config = dict(TINY, steps=10, replay_start=0.5)
    runs = {}
    for method in DATA_FREE_METHODS:
        teacher, student = networks()
        runs[method] = engine.Run(teacher, student, DistillConfig(method=method, **config),
                                  IMAGE_SHAPE, bn_layers=True)  # fmt: skip
    first_replay_step = runs["pre-dfkd"].config.first_replay_step
    assert first_replay_step == 5
    for step in range(1, first_replay_step):
        for run_state in runs.values():
            run_state.step_function(run_state, step)
    baseline = runs["adversarial"]
    for method in ("pre-dfkd", "memory-bank"):
        assert same_weights(runs[method].generator, baseline.generator)
        assert same_weights(runs[method].student, baseline.student)
    for run_state in runs.values():
        run_state.step_function(run_state, first_replay_step)
    for method in ("pre-dfkd", "memory-bank"):
        assert not same_weights(runs[method].student, baseline.student)


def test_a_checkpoint_without_the_replay_stream_is_refused(tmp_path):
    run(tmp_path, "pre-dfkd")
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    del checkpoint["run"]["replay_rng"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="earlier dfkd_fast"):
        run(tmp_path, "pre-dfkd", resume=True)


def test_a_checkpoint_of_a_vae_without_the_fitted_gaussian_is_refused(tmp_path):
    run(tmp_path, "pre-dfkd")
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = load_checkpoint(path)
    for name in ("fitted_mean", "fitted_second_moment", "fitted_scale"):
        del checkpoint["run"]["replay"]["vae"][name]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="no fitted Gaussian"):
        run(tmp_path, "pre-dfkd", resume=True)


def test_replay_decodes_the_fitted_gaussian_unless_told_not_to():
    """Both settings make the same first VAE update (the fit changes no weight, and the VAE
    rehearses no sample of its own yet); the replayed images differ."""
    replays = {}
    for fitted in (True, False):
        torch.manual_seed(0)
        replays[fitted] = GenerativeReplay(IMAGE_SHAPE, latent_dim=4, width=4, lr=1e-3,
                                           output_weight=1.0, kl_weight=0.1, self_replay=0.5,
                                           device="cpu", fitted_prior=fitted)  # fmt: skip
        teacher = small_cnn(4).eval().requires_grad_(False)
        images = torch.randn(16, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
        replays[fitted].update(images, teacher(images), teacher, torch.Generator().manual_seed(2))
    assert same_weights(replays[True].vae, replays[False].vae)  # the fit is kept either way
    fitted, prior = (replays[f].sample(8, torch.Generator().manual_seed(3)) for f in (True, False))
    assert not torch.allclose(fitted, prior)
    replays[False].vae.eval()
    with torch.no_grad():
        expected = replays[False].vae.sample(8, torch.Generator().manual_seed(3), fitted=False)
    assert torch.equal(prior, expected)


def test_the_unlabeled_index_draws_have_their_own_stream():
    """The sampler's indices and the shifts and mixing of the same batch come from different
    streams: seeded alike, the two would draw the same random bits."""
    teacher, student = networks()
    config = DistillConfig(method="unlabeled", **TINY)
    collection = small_collection("unlabeled")
    scored = score_collection(teacher, collection, config.score, progress=False)
    run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, True, collection, scored)
    assert not torch.equal(torch.rand(64, generator=run_state.rng),
                           torch.rand(64, generator=run_state.cpu_rng))  # fmt: skip


def test_stream_seeds_differ_by_stream_and_by_seed():
    streams = (REPLAY_STREAM, SAMPLER_STREAM, SAMPLE_GRID_STREAM)
    seeds = [stream_seed(seed, stream) for seed in range(4) for stream in streams]
    assert len(set(seeds) | set(range(4))) == len(seeds) + 4
    assert stream_seed(3, SAMPLER_STREAM) == stream_seed(3, SAMPLER_STREAM)


def kill_at_step_3(tmp_path, monkeypatch, method, name, **overrides):
    """Runs into tmp_path / name and crashes it in its third step."""
    original_step = engine.STEP_FUNCTIONS[method]

    def crash_at_step_3(run_state, step):
        if step == 3:
            raise RuntimeError("simulated crash")
        return original_step(run_state, step)

    with monkeypatch.context() as patch:
        patch.setitem(engine.STEP_FUNCTIONS, method, crash_at_step_3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, method, name, **overrides)


@pytest.mark.parametrize(
    "method, overrides",
    [(method, {}) for method in METHODS] + [("pre-dfkd", dict(vae_snapshot_every=1))],
    ids=[*METHODS, "pre-dfkd-vae-snapshots"],
)  # fmt: skip
def test_a_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch, method, overrides):
    uninterrupted = run(tmp_path, method, "uninterrupted", **overrides)
    kill_at_step_3(tmp_path, monkeypatch, method, "killed", **overrides)
    checkpoint = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert checkpoint["step"] == 2
    if overrides:
        assert checkpoint["run"]["replay"]["snapshot"] is not None
    assert not (tmp_path / "killed" / "student.pt").exists()
    resumed = run(tmp_path, method, "killed", resume=True, **overrides)
    assert same_weights(resumed.student, uninterrupted.student)
    assert resumed.curve == [
        {**entry, "seconds": resumed_entry["seconds"]}
        for entry, resumed_entry in zip(uninterrupted.curve, resumed.curve)
    ]


def test_a_run_resumed_on_another_machine_records_both(tmp_path, monkeypatch):
    kill_at_step_3(tmp_path, monkeypatch, "adversarial", "killed")
    here = engine.machine_description("cpu")
    assert "gpu" not in here  # a CPU run does not start CUDA to name a GPU
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["machines"] == [here]
    other = {**here, "cpu": "another CPU", "threads": here["threads"] + 1}
    monkeypatch.setattr(engine, "machine_description", lambda device: other)
    resumed = run(tmp_path, "adversarial", "killed", resume=True)
    assert resumed.metrics["machines"] == [here, other]
    written = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert written["machines"] == [here, other]


@pytest.mark.parametrize("method", DATA_FREE_METHODS)
def test_the_generator_warms_up_before_the_first_step_and_not_again_on_resume(
        tmp_path, monkeypatch, method):  # fmt: skip
    cold = run(tmp_path, method, "cold")
    warm = run(tmp_path, method, "warm", generator_warmup=3)
    generator_updates = {
        name: load_checkpoint(tmp_path / name / "checkpoint.pt")["run"]["generator_optimizer"]
        ["state"][0]["step"].item() for name in ("cold", "warm")
    }  # fmt: skip
    assert generator_updates == {"cold": TINY["steps"], "warm": TINY["steps"] + 3}
    assert not same_weights(warm.student, cold.student)
    kill_at_step_3(tmp_path, monkeypatch, method, "killed", generator_warmup=3)
    resumed = run(tmp_path, method, "killed", resume=True, generator_warmup=3)
    assert same_weights(resumed.student, warm.student)
    assert [entry["accuracy"] for entry in resumed.curve] == [
        entry["accuracy"] for entry in warm.curve]


def signal_in_step(tmp_path, monkeypatch, method, name, signals, at_step=3, **overrides):
    """Runs into tmp_path / name, raising `signals` (one after the other) inside step `at_step`;
    returns what the run raised, or None if it finished."""
    needs_the_main_thread()
    original_step = engine.STEP_FUNCTIONS[method]

    def signalled_step(run_state, step):
        if step == at_step:
            for number in signals:
                signal.raise_signal(number)
        return original_step(run_state, step)

    with monkeypatch.context() as patch:
        patch.setitem(engine.STEP_FUNCTIONS, method, signalled_step)
        try:
            run(tmp_path, method, name, **overrides)
        except KeyboardInterrupt as raised:
            return raised
    return None


@pytest.mark.parametrize("method", METHODS)
def test_a_signalled_run_finishes_its_step_checkpoints_it_and_resumes_to_the_same_result(
        tmp_path, monkeypatch, method):  # fmt: skip
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    uninterrupted = run(tmp_path, method, "uninterrupted")
    # step 3 is neither an evaluation nor a periodic checkpoint: its losses must travel too
    stopped = signal_in_step(tmp_path, monkeypatch, method, "stopped", [signal.SIGINT])
    assert isinstance(stopped, RunStopped)
    assert stopped.step == 3 and stopped.signal_name == "SIGINT" and stopped.exit_code == 130
    assert stopped.checkpoint == tmp_path / "stopped" / "checkpoint.pt"
    assert "stopped by SIGINT after step 3 of 4" in str(stopped)
    assert load_checkpoint(stopped.checkpoint)["step"] == 3
    assert not (tmp_path / "stopped" / "student.pt").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    resumed = run(tmp_path, method, "stopped", resume=True)
    assert same_weights(resumed.student, uninterrupted.student)
    assert resumed.curve == [
        {**entry, "seconds": resumed_entry["seconds"]}
        for entry, resumed_entry in zip(uninterrupted.curve, resumed.curve)
    ]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_sigterm_stops_a_run_like_sigint(tmp_path, monkeypatch):
    stopped = signal_in_step(tmp_path, monkeypatch, "pre-dfkd", "run", [signal.SIGTERM], at_step=2)
    assert isinstance(stopped, RunStopped) and stopped.signal_name == "SIGTERM"
    assert stopped.exit_code == 143 and load_checkpoint(stopped.checkpoint)["step"] == 2


def test_a_second_sigint_interrupts_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    interrupted = signal_in_step(tmp_path, monkeypatch, "adversarial", "run",
                                 [signal.SIGINT, signal.SIGINT])  # fmt: skip
    assert type(interrupted) is KeyboardInterrupt
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_in_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    assert signal_in_step(tmp_path, monkeypatch, "adversarial", "run", [signal.SIGINT],
                          at_step=4) is None  # fmt: skip
    assert (tmp_path / "run" / "student.pt").exists()


def test_a_run_without_an_output_folder_leaves_signals_alone(monkeypatch):
    needs_the_main_thread()
    teacher, student = networks()
    config = DistillConfig(method="adversarial", **TINY)
    original_step = engine.STEP_FUNCTIONS["adversarial"]

    def interrupted_step(run_state, step):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return original_step(run_state, step)

    monkeypatch.setitem(engine.STEP_FUNCTIONS, "adversarial", interrupted_step)
    with pytest.raises(KeyboardInterrupt) as raised:
        distill(teacher, student, config, IMAGE_SHAPE, progress=False)
    assert type(raised.value) is KeyboardInterrupt


def test_resume_refuses_another_config_and_keeps_the_files(tmp_path):
    run(tmp_path, "adversarial")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    teacher, student = networks()
    config = DistillConfig(method="adversarial", **{**TINY, "student_lr": 0.5})
    with pytest.raises(ValueError, match="another config.*student_lr"):
        distill(teacher, student, config, IMAGE_SHAPE, output_dir=tmp_path / "run", resume=True,
                progress=False)  # fmt: skip
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    # a change of reporting interval is no reason to refuse
    config = DistillConfig(method="adversarial", **{**TINY, "eval_every": 1})
    distill(teacher, student, config, IMAGE_SHAPE, output_dir=tmp_path / "run", resume=True,
            progress=False)  # fmt: skip


def test_a_folder_holding_a_run_is_not_overwritten_without_resume(tmp_path):
    run(tmp_path, "adversarial")
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path, "adversarial")
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    teacher, student = networks()
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        distill(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE, output_dir=folder,
                resume=True, progress=False)  # fmt: skip
    torch.save({"weights": torch.zeros(1)}, folder / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a dfkd-fast distillation checkpoint"):
        distill(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE, output_dir=folder,
                resume=True, progress=False)  # fmt: skip
    assert (folder / "checkpoint.pt").exists()


def test_an_unwritable_output_directory_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    teacher, student = networks()
    with pytest.raises(ValueError, match="not writable"):
        distill(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE,
                output_dir=blocker / "run", progress=False)  # fmt: skip


def test_bad_networks_and_shapes_are_refused():
    teacher, _ = networks()
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        distill(teacher, small_cnn(2, num_classes=7), DistillConfig(**TINY), IMAGE_SHAPE)
    with pytest.raises(ValueError, match="at least 1 channel and 4x4"):
        distill(teacher, small_cnn(2), DistillConfig(**TINY), (1, 3, 3))
    with pytest.raises(ValueError, match="cannot take images of shape"):
        distill(lenet5(), small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE)
    with pytest.raises(ValueError, match="cannot take images of shape"):
        distill(teacher, small_cnn(2, in_channels=3), DistillConfig(**TINY), IMAGE_SHAPE)
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        distill(teacher, small_cnn(2), dict(TINY), IMAGE_SHAPE)
    with pytest.raises(ValueError, match="test_set has 3 classes"):
        wrong = held_out()
        wrong.num_classes = 3
        distill(teacher, small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE, test_set=wrong)
    colour = ImageSet(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), (0.0,) * 3,
                      (1.0,) * 3, 10)  # fmt: skip
    with pytest.raises(ValueError, match=r"test_set holds images of shape \(3, 8, 8\), the "
                       r"teacher takes \(1, 8, 8\)"):  # fmt: skip
        distill(teacher, small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE, test_set=colour)
    with pytest.raises(TypeError, match="test_set must be a dfkd_fast.data.ImageSet"):
        distill(teacher, small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE, test_set=[1, 2])
    with pytest.raises(ValueError, match="test_set holds no images"):
        distill(teacher, small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE,
                test_set=held_out().subset(0))  # fmt: skip


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.layers(x)


def test_a_teacher_without_batchnorm_disables_matching_with_a_warning(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no BatchNorm layers.*disabled"):
        result = distill(NoBatchNorm(), small_cnn(2), DistillConfig(**TINY), IMAGE_SHAPE,
                         test_set=held_out(), progress=False)  # fmt: skip
    assert "bn_loss" not in result.curve[-1] and "generator_loss" in result.curve[-1]
    teacher, student = networks()
    result = distill(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE, progress=False)
    assert result.curve[-1]["bn_loss"] > 0


@pytest.mark.parametrize("method", DATA_FREE_METHODS)
def test_a_step_makes_no_host_sync(method, monkeypatch):
    """Reading a tensor's value on the host, from dfkd_fast's code, fails the test (PyTorch's
    own CPU-side bookkeeping, such as Adam's step count, is left alone; on CUDA the test below
    checks the whole step). The unlabeled method indexes its collection on the host by design."""
    teacher, student = networks()
    config = DistillConfig(method=method, **TINY)
    run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, bn_layers=True)
    run_state.step_function(run_state, 1)  # memory-bank: fill the bank first

    def patch(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("dfkd_fast"):
                raise AssertionError(f"host sync ({name}) in {caller}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        patch(name)
    losses = run_state.step_function(run_state, config.steps)
    monkeypatch.undo()
    shares = losses.pop("synthetic_class_shares")
    assert {"generator", "student", "disagreement", "bn"} <= set(losses)
    assert all(loss.dim() == 0 for loss in losses.values()) and shares.shape == (10,)


@requires_cuda
@pytest.mark.parametrize("method", DATA_FREE_METHODS)
def test_a_cuda_step_makes_no_device_sync(method):
    teacher, student = networks()
    config = DistillConfig(method=method, device="cuda", **TINY)
    run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, bn_layers=True)
    run_state.step_function(run_state, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_state.step_function(run_state, config.steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_student_steps_leave_generator_and_teacher_without_gradients():
    teacher, student = networks()
    run_state = engine.Run(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE, bn_layers=True)
    from dfkd_fast.distill.steps import student_updates

    student_updates(run_state, replay_count=0)
    assert all(p.grad is None for p in run_state.generator.parameters())
    assert all(p.grad is None for p in run_state.teacher.parameters())
    assert all(p.grad is not None for p in run_state.student.parameters())


@pytest.mark.parametrize("replay_count", [0, 5])
def test_student_batches_are_fresh_samples_then_replay_with_the_teachers_logits(replay_count):
    """A step's student batches come from generator forwards and replay draws of up to a batch
    each: batch i holds the i-th slice of fresh samples, then the i-th slice of replayed ones."""
    from dfkd_fast.distill.steps import chunk_sizes, student_batches
    from dfkd_fast.ops.reparameterize import sample_prior

    teacher, student = networks()
    config = DistillConfig(**{**TINY, "student_steps": 3}, method="memory-bank")
    run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, bn_layers=True)
    stored = torch.arange(24.0).view(24, 1, 1, 1).expand(24, *IMAGE_SHAPE)
    run_state.replay.update(stored, None, teacher, run_state.replay_rng)
    rng_state = run_state.rng.get_state()
    images, teacher_logits = student_batches(run_state, replay_count)
    assert images.shape == (3, 16, *IMAGE_SHAPE) and teacher_logits.shape == (3, 16, 10)
    run_state.rng.set_state(rng_state)
    chunks = chunk_sizes(3 * (16 - replay_count), 16)
    assert chunks == ([16, 16, 16] if replay_count == 0 else [11, 11, 11])
    with torch.no_grad():
        fresh = torch.cat([run_state.generator(sample_prior(count, TINY["latent_dim"],
                                                            generator=run_state.rng))
                           for count in chunks])  # fmt: skip
    torch.testing.assert_close(images[:, : 16 - replay_count].flatten(0, 1), fresh)
    replayed = images[:, 16 - replay_count :]
    # each replayed image is one of the stored ones (constant images 0, 1, ..., 23)
    assert torch.equal(replayed, replayed[..., :1, :1].expand_as(replayed))
    assert set(replayed[..., 0, 0].flatten().tolist()) <= set(range(24))
    with torch.no_grad():
        expected_logits = teacher(images.flatten(0, 1)).view(3, 16, 10)
    torch.testing.assert_close(teacher_logits, expected_logits)


def test_chunk_sizes_split_evenly_into_as_few_parts_as_fit():
    from dfkd_fast.distill.steps import chunk_sizes

    assert chunk_sizes(640, 256) == [214, 213, 213]
    assert chunk_sizes(1280, 256) == [256] * 5
    assert chunk_sizes(7, 256) == [7]
    assert chunk_sizes(257, 256) == [129, 128]


def test_a_replay_fraction_that_leaves_no_fresh_sample_is_refused():
    with pytest.raises(ValueError, match="at least one must be a fresh generator sample"):
        DistillConfig(method="pre-dfkd", batch_size=16, replay_fraction=0.99)
    assert DistillConfig(method="adversarial", batch_size=16, replay_fraction=0.99)


def test_memory_bank_keeps_the_newest_images_and_samples_only_stored_ones():
    bank = MemoryBank(IMAGE_SHAPE, capacity=5, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="empty"):
        bank.sample(2, generator)
    batches = [torch.full((3, *IMAGE_SHAPE), float(i)) for i in range(3)]
    bank.update(batches[0], None, None, generator)
    assert set(bank.sample(50, generator)[:, 0, 0, 0].tolist()) == {0.0}
    bank.update(batches[1], None, None, generator)
    bank.update(batches[2], None, None, generator)
    assert sorted(bank.images[:, 0, 0, 0].tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert bank.memory_bytes() == 5 * 64 * 4
    restored = MemoryBank(IMAGE_SHAPE, capacity=5, device="cpu")
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.images, bank.images) and restored.next_slot == bank.next_slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generative_replay_learns_a_fixed_batch(dtype):
    torch.manual_seed(0)
    teacher = small_cnn(4).eval().requires_grad_(False)
    autocast = contextlib.nullcontext
    if dtype == torch.bfloat16:
        autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    replay = GenerativeReplay(IMAGE_SHAPE, latent_dim=8, width=8, lr=3e-3, output_weight=1.0,
                              kl_weight=0.01, self_replay=0.5, device="cpu", autocast=autocast)  # fmt: skip
    decoded_dtypes = set()
    replay.vae.decoder.register_forward_hook(lambda m, i, output: decoded_dtypes.add(output.dtype))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, *IMAGE_SHAPE, generator=generator)
    logits = teacher(images)
    losses = [replay.update(images, logits, teacher, generator).item() for _ in range(60)]
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])
    assert decoded_dtypes == {dtype}
    assert all(p.dtype == torch.float32 for p in replay.vae.parameters())
    samples = replay.sample(7, generator)
    assert samples.shape == (7, *IMAGE_SHAPE) and torch.isfinite(samples).all()


def test_generative_replay_rehearses_a_frozen_snapshot_in_a_share_that_grows():
    """With snapshot_every=2, the VAE copies itself after its 2nd and its 4th update. The updates
    after a copy learn the last n/2 (one copy), then the last n/3 (two) of the fresh images together
    with decodings of the copy, which the updates in between leave unchanged."""
    torch.manual_seed(0)
    teacher = small_cnn(4).eval().requires_grad_(False)
    replay = GenerativeReplay(IMAGE_SHAPE, latent_dim=4, width=4, lr=1e-2, output_weight=1.0,
                              kl_weight=0.1, self_replay=0.5, device="cpu",
                              snapshot_every=2)  # fmt: skip
    single_copy = replay.memory_bytes()
    learnt = []
    replay.vae.register_forward_pre_hook(lambda module, inputs: learnt.append(inputs[0].clone()))
    images = torch.randn(15, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    for update, (rehearsed, copies) in enumerate([(0, 0), (8, 0), (8, 1), (8, 1), (10, 2)]):
        assert replay.snapshots == copies
        vae_before = {name: t.clone() for name, t in replay.vae.state_dict().items()}
        if replay.snapshot is not None:
            copy_before = {name: t.clone() for name, t in replay.snapshot.state_dict().items()}
        state = generator.get_state()
        replay.update(images, teacher(images), teacher, generator)
        if update in (0, 1):  # the VAE's own samples, half as many as the 15 fresh images
            assert len(learnt[-1]) == 15 + rehearsed and torch.equal(learnt[-1][:15], images)
            continue
        assert len(learnt[-1]) == 15
        torch.testing.assert_close(learnt[-1][: 15 - rehearsed], images[rehearsed:])
        if update in (2, 4):  # the copy was taken at the end of the update before
            assert same_state(copy_before, vae_before)
        else:
            assert same_state(copy_before, previous_copy)
        snapshot = VAE(IMAGE_SHAPE, latent_dim=4, width=4).eval()
        snapshot.load_state_dict(copy_before)
        with torch.no_grad():
            decoded = snapshot.sample(rehearsed, torch.Generator().set_state(state))
        torch.testing.assert_close(learnt[-1][15 - rehearsed :], decoded)
        if update == 2:  # no copy at its end
            assert not same_weights(replay.snapshot, replay.vae)
        assert not any(p.requires_grad for p in replay.snapshot.parameters())
        previous_copy = copy_before
    assert replay.memory_bytes() == 2 * single_copy
    restored = GenerativeReplay(IMAGE_SHAPE, latent_dim=4, width=4, lr=1e-2, output_weight=1.0,
                                kl_weight=0.1, self_replay=0.5, device="cpu",
                                snapshot_every=2)  # fmt: skip
    restored.load_state_dict(replay.state_dict())
    assert restored.snapshots == 2 and same_weights(restored.snapshot, replay.snapshot)


def test_robustness_statistics_of_a_known_curve():
    curve = [{"step": s, "accuracy": a} for s, a in [(1, 0.5), (2, 0.9), (3, 0.8), (4, 0.85)]]
    numbers = robustness(curve)
    assert numbers["final_accuracy"] == 0.85 and numbers["best_accuracy"] == 0.9
    assert numbers["mean_accuracy"] == pytest.approx(0.7625)
    assert numbers["accuracy_variance"] == pytest.approx(0.02421875)
    assert numbers["final_minus_best"] == pytest.approx(-0.05)
    assert numbers["largest_drop"] == pytest.approx(0.1)
    assert robustness([{"step": 1}]) == {}


@pytest.mark.parametrize(
    "overrides, error",
    [
        (dict(method="dfad"), ValueError), (dict(steps=0), ValueError),
        (dict(batch_size=1), ValueError), (dict(student_lr=0.0), ValueError),
        (dict(replay_fraction=1.0), ValueError), (dict(adversarial_weight=-1.0), ValueError),
        (dict(temperature=float("nan")), ValueError), (dict(steps=2.5), TypeError),
        (dict(bn_weight="1"), TypeError), (dict(student_ema=1.0), ValueError),
        (dict(max_shift=-1), ValueError), (dict(seed=-1), ValueError),
        (dict(vae_prior_decay=1.0), ValueError), (dict(vae_fitted_prior=1), TypeError),
        (dict(horizontal_flip="yes"), TypeError), (dict(generator_warmup=-1), ValueError),
        (dict(generator_warmup=1.5), TypeError), (dict(vae_snapshot_every=-1), ValueError),
        (dict(vae_snapshot_every=2.0), TypeError),
        (dict(device="mps"), ValueError), (dict(device="cuda:x"), ValueError),
        (dict(device=0), TypeError), (dict(device=torch.device("cpu")), TypeError),
    ],
)  # fmt: skip
def test_config_rejects_bad_values(overrides, error):
    with pytest.raises(error):
        DistillConfig(**overrides)


def test_a_device_this_machine_lacks_is_refused_by_name_before_any_work(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    teacher, student = networks()
    with pytest.raises(ValueError, match=f"config.device '{missing}': (no CUDA device|this machine)"):
        distill(teacher, student, DistillConfig(device=missing, **TINY), IMAGE_SHAPE,
                output_dir=tmp_path / "run", progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_config_round_trips_and_presets_apply():
    config = preset_config("digits", method="memory-bank", steps=7)
    assert config.steps == 7 and config.batch_size == 128 and config.method == "memory-bank"
    assert DistillConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown config fields: colour"):
        DistillConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_config("imagenet")


@pytest.mark.parametrize("native", [True, False, None])
def test_a_presets_cpu_amp_is_dropped_only_where_the_cpu_lacks_bfloat16(monkeypatch, native):
    from dfkd_fast.distill import config as config_module

    monkeypatch.setattr(config_module, "cpu_has_bfloat16_instructions", lambda: native)
    assert preset_config("mnist").cpu_amp is (native is not False)
    assert preset_config("mnist", cpu_amp=True).cpu_amp is True
    assert preset_config("mnist", cpu_amp=False).cpu_amp is False
    assert preset_config("digits").cpu_amp is False


def test_student_gradient_clipping_bounds_the_update():
    from dfkd_fast.distill.steps import student_updates

    changes = {}
    for clip in (0.0, 1e-3):
        teacher, student = networks()
        config = DistillConfig(**{**TINY, "student_steps": 1}, student_grad_clip=clip,
                               student_weight_decay=0.0)  # fmt: skip
        run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, bn_layers=True)
        before = [p.detach().clone() for p in run_state.student.parameters()]
        student_updates(run_state, replay_count=0)
        changes[clip] = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in
                                       zip(run_state.student.parameters(), before)))  # fmt: skip
    # SGD's first step moves the weights by lr * gradient: at most lr * clip when clipped
    assert changes[1e-3] <= TINY.get("student_lr", 0.1) * 1e-3 * (1 + 1e-5)
    assert changes[0.0] > 10 * changes[1e-3]


def test_the_activation_term_rewards_strong_teacher_features():
    from dfkd_fast.distill.steps import generator_loss

    teacher_logits, student_logits = torch.randn(6, 10), torch.randn(6, 10)
    features = torch.randn(6, 84)
    config = DistillConfig(activation_weight=0.25)
    with_features, _ = generator_loss(teacher_logits, student_logits, None, features, config)
    without, _ = generator_loss(teacher_logits, student_logits, None, None, config)
    expected = 0.25 * features.double().abs().mean()
    torch.testing.assert_close((without - with_features).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature, disagreement_temperature, expected_temperature",
                         [(4.0, 0.0, 4.0), (4.0, 1.0, 1.0), (1.0, 3.0, 3.0)])  # fmt: skip
def test_the_disagreement_term_uses_its_own_temperature_when_given(
    temperature, disagreement_temperature, expected_temperature
):
    from dfkd_fast.distill.steps import generator_loss

    teacher_logits, student_logits = 6 * torch.randn(7, 10), 6 * torch.randn(7, 10)
    config = DistillConfig(temperature=temperature, disagreement_temperature=disagreement_temperature)
    _, disagreement = generator_loss(teacher_logits, student_logits, None, None, config)
    teacher_p = (teacher_logits.double() / expected_temperature).softmax(dim=1)
    student_p = (student_logits.double() / expected_temperature).softmax(dim=1)
    middle = (teacher_p + student_p) / 2
    expected = ((teacher_p * (teacher_p / middle).log()).sum(1)
                + (student_p * (student_p / middle).log()).sum(1)).mean() / 2  # fmt: skip
    torch.testing.assert_close(disagreement.double(), expected_temperature**2 * expected,
                               rtol=1e-4, atol=1e-6)


def test_a_run_with_the_activation_term_captures_the_teachers_features():
    from dfkd_fast.distill.steps import generator_step

    teacher, student = networks()
    config = DistillConfig(**TINY, activation_weight=0.1)
    run_state = engine.Run(teacher, student, config, IMAGE_SHAPE, bn_layers=True)
    generator_step(run_state)
    assert run_state.feature_hooks.value.shape == (TINY["batch_size"], 8)  # small_cnn(4)'s last Linear
    assert run_state.feature_hooks.value.grad_fn is not None
    assert engine.Run(teacher, student, DistillConfig(**TINY), IMAGE_SHAPE, True).feature_hooks is None


def test_the_weight_average_follows_its_warmed_up_recurrence():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)).train()
    average = WeightAverage(network, decay=0.6)
    expected = {name: value.double().clone() for name, value in network.state_dict().items()}
    for update in range(1, 9):
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(torch.randn_like(parameter))
        network(torch.randn(7, 3) * 3)  # moves the BatchNorm statistics and its batch count
        average.update(network)
        decay = min(0.6, (1 + update) / (10 + update))
        for name, value in network.state_dict().items():
            if value.is_floating_point():
                expected[name] = decay * expected[name] + (1 - decay) * value.double()
            else:
                expected[name] = value.clone()
    for name, value in average.network.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, expected[name]) and int(value) == 8
    assert not any(parameter.requires_grad for parameter in average.network.parameters())
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(network, decay)


@pytest.mark.parametrize("method", ["pre-dfkd", "unlabeled"])
def test_weight_averaging_keeps_the_average_without_changing_training(tmp_path, monkeypatch, method):
    last = run(tmp_path, method, "last")
    averaged = run(tmp_path, method, "averaged", student_ema=0.5)
    # the trained weights follow the same path; what is evaluated and kept is their average
    assert [entry["trained_weights_accuracy"] for entry in averaged.curve] == [
        entry["accuracy"] for entry in last.curve
    ]
    assert not same_weights(averaged.student, last.student)
    saved = load_checkpoint(tmp_path / "averaged" / "student.pt")
    assert same_state(saved["state_dict"], averaged.student.state_dict())
    checkpoint = load_checkpoint(tmp_path / "averaged" / "checkpoint.pt")
    assert checkpoint["run"]["student_average"]["updates"] == TINY["steps"] * TINY["student_steps"]
    kill_at_step_3(tmp_path, monkeypatch, method, "killed", student_ema=0.5)
    resumed = run(tmp_path, method, "killed", resume=True, student_ema=0.5)
    assert same_weights(resumed.student, averaged.student)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("augmentation", [dict(max_shift=2), dict(horizontal_flip=True)])
def test_augmenting_the_student_batches_changes_what_the_student_learns(tmp_path, method,
                                                                        augmentation):
    still = run(tmp_path, method, "still")
    augmented = run(tmp_path, method, "augmented", **augmentation)
    assert not same_weights(still.student, augmented.student)
    assert same_weights(augmented.student, run(tmp_path, method, "again", **augmentation).student)


def run_recording_teacher_dtypes(tmp_path, method, name, **overrides):
    """A run, and the dtypes of every output of its teacher."""
    teacher, student = networks()
    dtypes = set()
    teacher.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    config = DistillConfig(method=method, **{**TINY, **overrides})
    result = distill(teacher, student, config, IMAGE_SHAPE, output_dir=tmp_path / name,
                     progress=False, collection=small_collection(method))  # fmt: skip
    return result, dtypes


@pytest.mark.parametrize("method", METHODS)
def test_cpu_amp_runs_the_steps_in_bfloat16_and_keeps_float32_weights(tmp_path, method):
    full, full_dtypes = run_recording_teacher_dtypes(tmp_path, method, "float32")
    assert full_dtypes == {torch.float32}
    mixed, mixed_dtypes = run_recording_teacher_dtypes(tmp_path, method, "amp", cpu_amp=True)
    assert torch.bfloat16 in mixed_dtypes
    assert all(p.dtype == torch.float32 for p in mixed.student.parameters())
    assert all(math.isfinite(entry["student_loss"]) for entry in mixed.curve)
    assert not same_weights(full.student, mixed.student)
    again, _ = run_recording_teacher_dtypes(tmp_path, method, "again", cpu_amp=True)
    assert same_weights(again.student, mixed.student)


def test_a_killed_cpu_amp_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    uninterrupted = run(tmp_path, "pre-dfkd", "uninterrupted", cpu_amp=True)
    kill_at_step_3(tmp_path, monkeypatch, "pre-dfkd", "killed", cpu_amp=True)
    resumed = run(tmp_path, "pre-dfkd", "killed", resume=True, cpu_amp=True)
    assert same_weights(resumed.student, uninterrupted.student)


@pytest.mark.parametrize("native", [True, False, None])
def test_cpu_amp_warns_on_a_cpu_without_bfloat16_instructions(tmp_path, monkeypatch, native):
    monkeypatch.setattr(engine, "cpu_has_bfloat16_instructions", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, "adversarial", cpu_amp=True)
        run(tmp_path, "adversarial", "float32")
    messages = [str(warning.message) for warning in caught if "cpu_amp" in str(warning.message)]
    assert len(messages) == (1 if native is False else 0)
    assert all("no bfloat16 instructions" in message for message in messages)


def test_a_plot_of_many_runs_puts_its_legend_beside_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from dfkd_fast.distill.report import LEGEND_INSIDE_MAX_LINES, plot_curves

    curve = [{"step": step, "accuracy": step / 100} for step in range(10, 100, 10)]
    few = {f"run {index}": curve for index in range(LEGEND_INSIDE_MAX_LINES)}
    many = {f"run {index}": curve for index in range(LEGEND_INSIDE_MAX_LINES + 1)}
    assert plot_curves(tmp_path / "few.png", few, "few")
    assert plot_curves(tmp_path / "many.png", many, "many")
    few_width = Image.open(tmp_path / "few.png").size[0]
    many_width = Image.open(tmp_path / "many.png").size[0]
    assert many_width > few_width * 1.15  # the legend widens the picture instead of covering it


def test_predicted_class_shares_count_each_rows_largest_logit():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 7, generator=generator) * 30  # extreme logits, an odd class count
    logits[5] = 0.0  # a tie goes to the first class, as argmax says
    expected = torch.bincount(logits.argmax(dim=1), minlength=7).double() / 37
    shares = steps.predicted_class_shares(logits)
    assert shares.shape == (7,)
    torch.testing.assert_close(shares.double(), expected)


@pytest.mark.parametrize("method", DATA_FREE_METHODS)
def test_data_free_runs_report_the_teachers_classes_of_each_intervals_synthetic_batches(
        tmp_path, monkeypatch, method):  # fmt: skip
    teacher_predictions_per_step = []
    original = steps.generator_step

    def recording_generator_step(run_state):
        images, teacher_logits, losses = original(run_state)
        teacher_predictions_per_step.append(teacher_logits.argmax(dim=1))
        return images, teacher_logits, losses

    monkeypatch.setattr(steps, "generator_step", recording_generator_step)
    result = run(tmp_path, method)
    shares_per_step = [torch.bincount(predicted, minlength=10).double() / len(predicted)
                       for predicted in teacher_predictions_per_step]  # fmt: skip
    # TINY evaluates every 2 steps of 4
    for entry, interval in zip(result.curve, (shares_per_step[:2], shares_per_step[2:])):
        expected = torch.stack(interval).mean(dim=0)
        assert entry["synthetic_class_shares"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert sum(entry["synthetic_class_shares"]) == pytest.approx(1.0, abs=1e-4)
    header = (tmp_path / "run" / "curve.csv").read_text().splitlines()[0].split(",")
    assert [column for column in header if column.startswith("synthetic_class_shares")] == [
        f"synthetic_class_shares_{k}" for k in range(10)]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "run" / "class_shares.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["pre-dfkd", "unlabeled"])
def test_each_evaluation_records_the_students_accuracy_on_each_class(tmp_path, method):
    result = run(tmp_path, method)
    test_set = held_out()
    predictions = result.student(test_set.images).argmax(dim=1)
    expected = [float(((test_set.labels == k) & (predictions == k)).sum()
                      / (test_set.labels == k).sum()) for k in range(10)]  # fmt: skip
    final = result.curve[-1]
    assert final["class_accuracy"] == pytest.approx(expected, abs=1e-5)
    for entry in result.curve:
        by_class = sum(accuracy * count for accuracy, count in
                       zip(entry["class_accuracy"], test_set.class_counts.tolist()))  # fmt: skip
        assert by_class / len(test_set) == pytest.approx(entry["accuracy"], abs=1e-4)
    assert result.metrics["robustness"]["class_forgetting"] == pytest.approx(
        class_forgetting(result.curve)["class_forgetting"])
    header = (tmp_path / "run" / "curve.csv").read_text().splitlines()[0].split(",")
    assert [column for column in header if column.startswith("class_accuracy")] == [
        f"class_accuracy_{k}" for k in range(10)]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "run" / "class_accuracy.png").stat().st_size > 0


def test_class_forgetting_of_known_per_class_curves():
    """Class 0 forgets 0.3 for good, class 1 dips by 0.5 and recovers, class 2 only learns, class
    3 has no test images."""
    rows = [[0.9, 0.8, 0.1, None], [0.6, 0.3, 0.5, None], [0.7, 0.9, 0.6, None],
            [0.6, 0.85, 0.9, None]]  # fmt: skip
    curve = [{"step": step, "accuracy": 0.5, "class_accuracy": row}
             for step, row in enumerate(rows, 1)]  # fmt: skip
    numbers = class_forgetting(curve)
    assert numbers["class_forgetting"] == round((0.3 + 0.05 + 0.0) / 3, 5)
    assert numbers["largest_class_forgetting"] == 0.3  # exactly: rounded to the inputs' digits
    assert numbers["most_forgotten_class"] == 0
    assert numbers["largest_class_drop"] == robustness(curve)["largest_class_drop"] == 0.5
    learning = [{"step": step, "class_accuracy": row} for step, row in ((1, [0.1, 0.2]),
                                                                       (2, [0.3, 0.2]))]  # fmt: skip
    assert class_forgetting(learning) == {"class_forgetting": 0.0, "largest_class_forgetting": 0.0,
                                          "most_forgotten_class": None, "largest_class_drop": 0.0}
    assert class_forgetting(curve[:1]) == {}
    assert class_forgetting([{"step": 1, "accuracy": 0.5}] * 3) == {}
    assert "class_forgetting" not in robustness([{"step": 1, "accuracy": 0.5}] * 3)


def test_an_unlabeled_run_reports_no_synthetic_class_shares(tmp_path):
    result = run(tmp_path, "unlabeled")
    assert all("synthetic_class_shares" not in entry for entry in result.curve)
    assert not (tmp_path / "run" / "class_shares.png").exists()


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_the_class_share_plot_draws_any_number_of_classes(tmp_path, classes):
    pytest.importorskip("matplotlib")
    from dfkd_fast.distill.report import plot_class_shares

    generator = torch.Generator().manual_seed(classes)
    curve = [{"step": step, "synthetic_class_shares": torch.rand(classes, generator=generator)
              .softmax(dim=0).tolist()} for step in (50, 100, 150)]  # fmt: skip
    assert plot_class_shares(tmp_path / "shares.png", curve)
    assert (tmp_path / "shares.png").read_bytes().startswith(b"\x89PNG")
    assert not plot_class_shares(tmp_path / "none.png", [{"step": 50, "accuracy": 0.5}])
    assert not (tmp_path / "none.png").exists()
