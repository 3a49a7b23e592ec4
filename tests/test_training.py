"""Teacher training: its checkpoint, resumed after a crash or a signal to the same weights, and the
checkpoints it refuses."""

from __future__ import annotations

import signal

import pytest
import torch

from dfkd_fast.data import ImageSet
from dfkd_fast.io import load_checkpoint
from dfkd_fast.models import small_cnn
from dfkd_fast.stopping import RunStopped
from dfkd_fast.training import (
    ClassifierInfo,
    TrainConfig,
    accuracy,
    correct_per_class,
    load_classifier,
    train_classifier,
)
from tests.conftest import needs_the_main_thread, same_state

CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05, max_shift=1, seed=4)
STEPS_PER_EPOCH = 7  # 100 images in batches of 16


def images(count: int, seed: int) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randn(count, 1, 8, 8, generator=generator),
                    torch.randint(0, 10, (count,), generator=generator), (0.0,), (1.0,), 10)  # fmt: skip


TRAIN, TEST = images(100, 1), images(30, 2)


def fresh_model():
    torch.manual_seed(0)
    return small_cnn(2)


def train(checkpoint=None, resume=False, at_step=None, action=None, config=CONFIG, model=None):
    """Trains a fresh model; on the at_step-th training forward, `action()` runs first."""
    model = model or fresh_model()
    calls = [0]

    def before_forward(module, inputs):
        if module.training:
            calls[0] += 1
            if calls[0] == at_step:
                action()

    hook = model.register_forward_pre_hook(before_forward)
    try:
        curve = train_classifier(model, TRAIN, TEST, config, progress=False,
                                 checkpoint=checkpoint, resume=resume)  # fmt: skip
    finally:
        hook.remove()
    return model, curve


def crash():
    raise RuntimeError("simulated crash")


def test_a_crashed_training_resumes_from_its_last_epoch_to_the_same_weights(tmp_path):
    reference, reference_curve = train()
    checkpoint = tmp_path / "teacher.checkpoint.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(checkpoint, at_step=STEPS_PER_EPOCH + 3, action=crash)
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 2 and state["next_batch"] == 0 and len(state["curve"]) == 1
    resumed, curve = train(checkpoint, resume=True)
    assert same_state(resumed.state_dict(), reference.state_dict())
    assert curve == reference_curve and len(curve) == CONFIG.epochs
    assert load_checkpoint(checkpoint)["epoch"] == CONFIG.epochs + 1  # finished: resuming is a no-op
    again, again_curve = train(checkpoint, resume=True)
    assert same_state(again.state_dict(), reference.state_dict()) and again_curve == curve


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_training_stops_after_its_step_and_resumes_to_the_same_weights(tmp_path, number):
    needs_the_main_thread()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reference, reference_curve = train()
    checkpoint = tmp_path / "teacher.checkpoint.pt"
    step = STEPS_PER_EPOCH + 3  # inside the second epoch
    with pytest.raises(RunStopped) as stopped:
        train(checkpoint, at_step=step, action=lambda: signal.raise_signal(number))
    assert stopped.value.step == step and stopped.value.checkpoint == checkpoint
    assert f"after step {step} of {CONFIG.epochs * STEPS_PER_EPOCH}" in str(stopped.value)
    assert load_checkpoint(checkpoint)["next_batch"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    resumed, curve = train(checkpoint, resume=True)
    assert same_state(resumed.state_dict(), reference.state_dict()) and curve == reference_curve


def test_a_signal_in_the_last_step_lets_the_training_finish(tmp_path):
    needs_the_main_thread()
    reference, _ = train()
    model, _ = train(tmp_path / "c.pt", at_step=CONFIG.epochs * STEPS_PER_EPOCH,
                     action=lambda: signal.raise_signal(signal.SIGINT))  # fmt: skip
    assert same_state(model.state_dict(), reference.state_dict())


def test_training_without_a_checkpoint_leaves_signals_alone():
    needs_the_main_thread()
    with pytest.raises(KeyboardInterrupt) as raised:
        train(at_step=2, action=lambda: signal.raise_signal(signal.SIGINT))
    assert type(raised.value) is KeyboardInterrupt


def test_checkpoints_that_cannot_be_resumed_are_refused_and_kept(tmp_path):
    checkpoint = tmp_path / "teacher.checkpoint.pt"
    with pytest.raises(RuntimeError):
        train(checkpoint, at_step=STEPS_PER_EPOCH + 1, action=crash)
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="unfinished training: resume it"):
        train(checkpoint)
    other = TrainConfig(**{**CONFIG.__dict__, "lr": 0.1})
    with pytest.raises(ValueError, match=r"another config \(lr: 0.05 -> 0.1\)"):
        train(checkpoint, resume=True, config=other)
    with pytest.raises(ValueError, match="another architecture"):
        train(checkpoint, resume=True, model=small_cnn(4))
    assert checkpoint.read_bytes() == before
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a dfkd-fast training checkpoint"):
        train(foreign, resume=True)


def test_a_state_dict_of_another_architecture_is_refused_with_a_short_account(tmp_path):
    info = ClassifierInfo("cnn8", 10, (1, 8, 8), (0.0,), (1.0,))
    path = tmp_path / "bare.pt"
    torch.save({"state_dict": small_cnn(2).state_dict()}, path)
    with pytest.raises(ValueError, match=r"does not hold a cnn8: of another shape: "
                       r"0\.weight \(2, 1, 3, 3\) for \(8, 1, 3, 3\), .*\(19 in all\)$"):  # fmt: skip
        load_classifier(path, info)
    state = small_cnn(8).state_dict()
    state["extra.weight"] = state.pop("0.weight")
    del state["1.num_batches_tracked"]  # older checkpoints lack it: not reported
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"cnn8: missing: 0\.weight; unexpected: extra\.weight$"):
        load_classifier(path, info)
    del state["extra.weight"]
    state["0.weight"] = small_cnn(8).state_dict()["0.weight"]
    torch.save(state, path)
    assert load_classifier(path, info)[1] == info


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_correct_per_class_counts_each_class_and_sums_to_the_accuracy(batch_size):
    """Labels drawn unevenly, class 9 without images; batches that do not divide the set."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 9, (53,), generator=generator)
    data = ImageSet(torch.randn(53, 1, 8, 8, generator=generator), labels, (0.0,), (1.0,), 10)
    model = fresh_model().eval()
    predictions = model(data.images).argmax(dim=1)
    expected = [int(((labels == k) & (predictions == k)).sum()) for k in range(10)]
    correct = correct_per_class(model, data, batch_size=batch_size)
    assert correct.dtype == torch.int64 and correct.tolist() == expected
    assert data.class_counts.tolist() == [int((labels == k).sum()) for k in range(10)]
    assert accuracy(model, data, batch_size) == pytest.approx(sum(expected) / 53)
    assert 0 < sum(expected) < 53  # the check above compares something


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (torch.tensor([0, 10]), ValueError, r"labels must be in \[0, num_classes=10\), got "
                                            r"labels from 0 to 10"),  # fmt: skip
        (torch.tensor([-1, 3]), ValueError, "labels from -1 to 3"),
        (torch.tensor([0.0, 1.0]), TypeError, "labels must be an int64 tensor, got torch.float32"),
        (torch.tensor([0, 1], dtype=torch.int32), TypeError, "got torch.int32"),
    ],
)
def test_an_image_set_refuses_labels_outside_its_classes(labels, error, match):
    with pytest.raises(error, match=match):
        ImageSet(torch.zeros(2, 1, 8, 8), labels, (0.0,), (1.0,), 10)
