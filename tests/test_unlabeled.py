"""Unlabeled collections: format conversion, relatedness scores against their formulas, sampling
policies, mixing, caching, and the bad inputs."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd_fast.distill import DistillConfig, RunStopped, distill
from dfkd_fast.io import load_checkpoint
from dfkd_fast.models import cifar_resnet, small_cnn
from dfkd_fast.unlabeled import (
    Collection,
    RelatednessSampler,
    Source,
    mix_batch,
    noise_source,
    score_collection,
    source_from_spec,
)
from dfkd_fast.unlabeled import scores as scores_module
from dfkd_fast.unlabeled.scores import SCORES, BNTypicality, energy, msp, negative_entropy
from dfkd_fast.unlabeled.sampling import balance_classes, base_weights

from .conftest import needs_the_main_thread
from .shared import shared_path


@pytest.fixture(autouse=True)
def compiled_cpu_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def uint8_images(count, channels, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, size, size), generator=generator,
                         dtype=torch.uint8)  # fmt: skip


def test_batches_come_out_in_the_teachers_format():
    gray, colour = uint8_images(5, 1, 8, 0), uint8_images(4, 3, 16, 1)
    collection = Collection([Source("gray", gray), Source("colour", colour)], (3, 8, 8),
                            mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))  # fmt: skip
    assert len(collection) == 9 and collection.source_names == ["gray", "colour"]
    batch = collection.batch(torch.tensor([6, 0, 4]))
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected_gray = ((gray[[0, 4]].float() / 255).expand(-1, 3, -1, -1) - mean) / std
    torch.testing.assert_close(batch[1:], expected_gray)
    resized = F.interpolate(colour[[1]].float() / 255, size=(8, 8), mode="bilinear",
                            align_corners=False, antialias=True)  # fmt: skip
    torch.testing.assert_close(batch[:1], (resized - mean) / std)
    to_gray = Collection([Source("colour", colour)], (1, 16, 16), (0.0,), (1.0,))
    luma = (colour[:2].double() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).double()).sum(1, keepdim=True)
    torch.testing.assert_close(to_gray.batch(torch.tensor([0, 1])).double(), luma, atol=1e-6, rtol=0)
    with pytest.raises(IndexError):
        collection.batch(torch.tensor([9]))


def test_bad_collections_are_refused():
    with pytest.raises(ValueError, match="at least one source"):
        Collection([], (1, 8, 8), (0.0,), (1.0,))
    with pytest.raises(TypeError, match="Source objects"):
        Collection([uint8_images(2, 1, 8)], (1, 8, 8), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="NaN or infinite"):
        Source.from_float("bad", torch.tensor([float("nan")]).view(1, 1, 1, 1).expand(2, 1, 4, 4))
    with pytest.raises(TypeError, match="must be uint8"):
        Source("floats", torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="is empty"):
        Source("empty", torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        Source("two-channel", torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="noise:10000"):
        source_from_spec("noise:many", (1, 8, 8))
    with pytest.raises(FileNotFoundError):
        source_from_spec("/no/such/file.npz", (1, 8, 8))
    teacher, student = small_cnn(4), small_cnn(2)
    small = Collection([noise_source(10, (1, 8, 8))], (1, 8, 8), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="fewer than a batch"):
        distill(teacher, student, DistillConfig(method="unlabeled", batch_size=16), (1, 8, 8),
                collection=small)  # fmt: skip
    with pytest.raises(ValueError, match="needs a collection"):
        distill(teacher, student, DistillConfig(method="unlabeled"), (1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        distill(teacher, student, DistillConfig(method="unlabeled", batch_size=4), (1, 16, 16),
                collection=small)  # fmt: skip
    with pytest.raises(ValueError, match="data-free"):
        distill(teacher, student, DistillConfig(), (1, 8, 8), collection=small)


def test_sources_from_files_and_specs(tmp_path):
    images = uint8_images(10, 3, 6).permute(0, 2, 3, 1).numpy()  # NHWC, as CIFAR stores them
    np.savez(tmp_path / "extra.npz", images=images)
    source = source_from_spec(str(tmp_path / "extra.npz"), (1, 8, 8))
    assert source.images.shape == (10, 3, 6, 6)
    assert torch.equal(source.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    subset = source_from_spec(f"{tmp_path / 'extra.npz'}@0.3", (1, 8, 8))
    assert len(subset) == 3 and subset.name == "extra@0.3"
    noise = source_from_spec("noise:7", (3, 8, 8))
    assert noise.images.shape == (7, 3, 8, 8)
    with pytest.raises(ValueError, match="needs the data set's folder: 'kmnist:FOLDER'"):
        source_from_spec("kmnist", (1, 8, 8))


def test_fashion_mnist_source_reads_the_shared_files():
    folder = shared_path("data", "fashion-mnist")
    source = source_from_spec(f"fashion-mnist:{folder}@0.01", (1, 32, 32))
    assert source.images.shape == (600, 1, 28, 28) and source.images.dtype == torch.uint8


def test_scores_from_logits_match_their_formulas():
    logits = 8 * torch.randn(33, 10, dtype=torch.float64)
    logits[0] = torch.tensor([1e4] + [0.0] * 9, dtype=torch.float64)
    probs = logits.softmax(1)
    torch.testing.assert_close(msp(logits).double(), probs.max(1).values, rtol=1e-6, atol=1e-7)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(1)
    torch.testing.assert_close(negative_entropy(logits).double(), -entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(energy(logits).double(), logits.logsumexp(1), rtol=1e-6, atol=1e-3)


def test_bn_typicality_uses_per_sample_statistics_and_noise_calibration():
    torch.manual_seed(0)
    teacher = cifar_resnet(8).eval()
    typicality = BNTypicality(teacher)
    images = torch.randn(5, 3, 16, 16)
    distances, logits = typicality.distances(images)
    torch.testing.assert_close(logits, teacher(images))
    # the hand-written reference: per-sample, per-channel statistics of each BN input
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, i: inputs.append((m, i[0])))
               for layer in typicality.layers]  # fmt: skip
    teacher(images)
    for handle in handles:
        handle.remove()
    for column, (layer, x) in enumerate(inputs):
        var, mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
        expected = ((mean - layer.running_mean.double()).norm(dim=1)
                    + (var - layer.running_var.double()).norm(dim=1))  # fmt: skip
        torch.testing.assert_close(distances[:, column].double(), expected, rtol=1e-4, atol=1e-5)
    typicality.calibrate((3, 16, 16), "cpu", torch.Generator().manual_seed(0))
    noise_scores, _ = typicality(torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert noise_scores.mean().item() == pytest.approx(-1.0, abs=1e-4)
    with pytest.raises(ValueError, match="BatchNorm"):
        BNTypicality(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


@pytest.mark.parametrize("score", SCORES)
def test_score_collection_is_batched_cached_and_in_index_order(tmp_path, score, monkeypatch):
    torch.manual_seed(0)
    teacher = small_cnn(4).eval()
    collection = Collection([noise_source(11, (1, 8, 8)), Source("other", uint8_images(6, 1, 8))],
                            (1, 8, 8), (0.5,), (0.25,))  # fmt: skip
    scored = score_collection(teacher, collection, score, batch_size=4, cache_dir=tmp_path,
                              progress=False)  # fmt: skip
    assert scored.scores.shape == (17,) and scored.teacher_logits.shape == (17, 10)
    with torch.no_grad():
        torch.testing.assert_close(scored.teacher_logits, teacher(collection.batch(torch.arange(17))))
    if score in ("msp", "energy"):
        formula = msp if score == "msp" else energy
        torch.testing.assert_close(scored.scores, formula(scored.teacher_logits))
    monkeypatch.setattr(teacher, "forward", lambda x: (_ for _ in ()).throw(AssertionError))
    cached = score_collection(teacher, collection, score, cache_dir=tmp_path, progress=False)
    assert torch.equal(cached.scores, scored.scores)


def scoring_interrupted_at_batch(tmp_path, score, at_batch, action):
    """Scores a 17-sample collection in batches of 4 into tmp_path, `action()` running before the
    teacher's at_batch-th forward; returns (teacher, collection, what was raised)."""
    torch.manual_seed(0)
    teacher = small_cnn(4).eval()
    collection = Collection([noise_source(11, (1, 8, 8)), Source("other", uint8_images(6, 1, 8))],
                            (1, 8, 8), (0.5,), (0.25,))  # fmt: skip
    calls = [0]

    def before_forward(module, inputs):
        calls[0] += 1
        if calls[0] == at_batch:
            action()

    hook = teacher.register_forward_pre_hook(before_forward)
    try:
        score_collection(teacher, collection, score, batch_size=4, cache_dir=tmp_path,
                         progress=False)  # fmt: skip
        raised = None
    except (RuntimeError, KeyboardInterrupt) as error:
        raised = error
    hook.remove()
    return teacher, collection, raised


@pytest.mark.parametrize("score", ["energy", "energy+bn-typicality"])
def test_scoring_stopped_by_a_signal_goes_on_from_the_batches_scored(tmp_path, score):
    needs_the_main_thread()
    expected = score_collection(*scoring_interrupted_at_batch(tmp_path / "a", score, 0, None)[:2],
                                score, batch_size=4, progress=False)  # fmt: skip
    calibration = 0 if score == "energy" else 1  # BN typicality first calibrates on noise
    teacher, collection, stopped = scoring_interrupted_at_batch(
        tmp_path / "b", score, 2 + calibration, lambda: signal.raise_signal(signal.SIGINT))
    assert isinstance(stopped, RunStopped) and "after sample 8 of 17" in str(stopped)
    assert stopped.checkpoint.name.endswith(".partial.pt")
    assert len(load_checkpoint(stopped.checkpoint)["scores"]) == 8
    forwards = [0]
    teacher.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + 1))
    resumed = score_collection(teacher, collection, score, batch_size=4, cache_dir=tmp_path / "b",
                               progress=False)  # fmt: skip
    assert forwards[0] == 3 + calibration  # the 3 batches left
    torch.testing.assert_close(resumed.scores, expected.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.teacher_logits, expected.teacher_logits, rtol=0, atol=1e-6)
    assert not stopped.checkpoint.exists()


def test_scoring_keeps_its_batches_every_so_often_so_a_crash_loses_few(tmp_path, monkeypatch):
    monkeypatch.setattr(scores_module, "PARTIAL_EVERY_BATCHES", 2)

    def crash():
        raise RuntimeError("simulated crash")

    _, _, raised = scoring_interrupted_at_batch(tmp_path, "msp", 4, crash)
    assert isinstance(raised, RuntimeError)
    (partial,) = tmp_path.glob("scores-*.partial.pt")
    assert len(load_checkpoint(partial)["scores"]) == 8  # batches 1-2 kept, the 3rd lost


def test_energy_plus_bn_typicality_adds_the_standardised_scores():
    torch.manual_seed(0)
    teacher = small_cnn(4).eval()
    collection = Collection([noise_source(20, (1, 8, 8)), Source("other", uint8_images(9, 1, 8))],
                            (1, 8, 8), (0.5,), (0.25,))  # fmt: skip
    combined = score_collection(teacher, collection, "energy+bn-typicality", batch_size=8,
                                progress=False)  # fmt: skip
    typicality = score_collection(teacher, collection, "bn-typicality", progress=False).scores
    energies = energy(combined.teacher_logits).double()
    expected = ((energies - energies.mean()) / energies.std()
                + (typicality.double() - typicality.double().mean()) / typicality.double().std())
    torch.testing.assert_close(combined.scores.double(), expected, rtol=1e-4, atol=1e-4)
    assert combined.scores.mean().abs() < 1e-4


def test_odin_raises_the_tempered_max_softmax():
    torch.manual_seed(0)
    teacher = small_cnn(4).eval()
    collection = Collection([noise_source(32, (1, 8, 8))], (1, 8, 8), (0.5,), (0.25,))
    scored = score_collection(teacher, collection, "odin", progress=False)
    plain = (scored.teacher_logits / 1000.0).softmax(1).amax(1)
    assert (scored.scores >= plain - 1e-7).float().mean() > 0.9


def test_sampling_policies():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    predictions = torch.tensor([0, 0, 0, 0, 0, 1])
    uniform = base_weights(scores, "uniform", 1.0, 0.1)
    assert torch.equal(uniform, torch.ones(6))
    top = base_weights(scores, "top-k", 1.0, 0.5)
    assert top.tolist() == [0, 0, 0, 1, 1, 1]
    proportional = base_weights(scores, "proportional", 0.5, 0.1)
    assert (proportional.diff() > 0).all()
    standardised = (scores - scores.mean()) / scores.std()
    torch.testing.assert_close(proportional / proportional.sum(), (standardised / 0.5).softmax(0))
    balanced = balance_classes(torch.ones(6), predictions)
    assert balanced[:5].sum().item() == pytest.approx(0.5) and balanced[5].item() == pytest.approx(0.5)
    sampler = RelatednessSampler(scores, predictions, "uniform", class_balance=False,
                                 disagreement_weight=1.0)  # fmt: skip
    first = sampler.draw(1000, torch.Generator().manual_seed(0))
    assert torch.equal(first, sampler.draw(1000, torch.Generator().manual_seed(0)))
    counts = torch.bincount(first, minlength=6).float()
    assert (counts - 1000 / 6).abs().max() < 60
    sampler.record(torch.tensor([2, 3]), torch.tensor([3.0, 1.0]))
    sampler.refresh()
    p = sampler.probabilities
    # unseen samples keep the mean divergence (relative 1), sample 2 has 1.5x, sample 3 0.5x
    assert p[2] / p[0] == pytest.approx(2.5 / 2.0) and p[3] / p[0] == pytest.approx(1.5 / 2.0)
    with pytest.raises(ValueError, match="policy must be"):
        base_weights(scores, "greedy", 1.0, 0.1)
    # a uniform share keeps every sample reachable under a sharp policy
    sharp = RelatednessSampler(scores, predictions, "top-k", top_fraction=0.2,
                               class_balance=False, uniform_share=0.3)  # fmt: skip
    expected = torch.full((6,), 0.05)
    expected[5] += 0.7
    torch.testing.assert_close(sharp.probabilities, expected)


def test_mixing_keeps_the_rest_of_the_batch_and_mixes_within_it():
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 6, 6).clone()
    mixed = mix_batch(images, 0.25, 0.5, generator)
    assert torch.equal(mixed[6:], images[6:])
    assert ((mixed[:2] >= 0) & (mixed[:2] <= 7)).all()  # convex combinations of batch images
    for row in mixed[2:6]:  # cutmix: every pixel is some batch image's value
        assert set(row.unique().tolist()) <= set(range(8))
    assert torch.equal(mix_batch(images, 0.0, 0.0, generator), images)


def test_random_translation_shifts_each_image_within_bounds():
    from dfkd_fast.training import random_translate

    generator = torch.Generator().manual_seed(0)
    height, width, shift = 9, 11, 2
    ramp = (torch.arange(height).view(-1, 1) * 100 + torch.arange(width)).float()
    images = ramp.expand(64, 2, height, width).clone()
    images[:, 1] += 10_000  # channels move together
    moved = random_translate(images, shift, generator)
    offsets = set()
    for image in moved:
        # the centre pixel of a shifted ramp says by how much; every interior pixel agrees
        offset = int(image[0, height // 2, width // 2] - ramp[height // 2, width // 2])
        dy = round(offset / 100)
        dx = offset - 100 * dy
        assert abs(dy) <= shift and abs(dx) <= shift
        # the whole image, borders included, is a window of the edge-replicated original
        padded = F.pad(images[:1], (shift,) * 4, mode="replicate")[0]
        window = (slice(shift + dy, shift + dy + height), slice(shift + dx, shift + dx + width))
        assert torch.equal(image, padded[:, window[0], window[1]])
        offsets.add((dy, dx))
    assert len(offsets) > 10  # shifts differ between images
    assert random_translate(images, 0, generator) is images
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(random_translate(channels_last, shift, torch.Generator().manual_seed(1)),
                       random_translate(images, shift, torch.Generator().manual_seed(1)))


def test_random_mirror_flips_about_half_of_the_images_left_right():
    from dfkd_fast.training import random_mirror

    images = torch.randn(200, 3, 5, 7)
    mirrored = random_mirror(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(after, before.flip(-1)) for after, before in zip(mirrored, images)]
    kept = [torch.equal(after, before) for after, before in zip(mirrored, images)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image exactly one of the two
    assert 70 < sum(flipped) < 130
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(random_mirror(channels_last, torch.Generator().manual_seed(0)), mirrored)


def test_an_image_folder_is_a_source(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    pixels = uint8_images(3, 3, 5).permute(0, 2, 3, 1).numpy()
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    source = source_from_spec(str(tmp_path), (1, 8, 8))
    assert source.images.shape == (3, 3, 5, 5)
    assert torch.equal(source.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        source_from_spec(str(tmp_path / "empty"), (1, 8, 8))
