"""One training step of each data-free method. They share the generator update and the student
update; they differ in what the student rehearses.

    adversarial  (DAFL / DFAD / Fast-DFKD family): generator step, then student steps on fresh
                 generator samples.
    pre-dfkd     (PRE-DFKD): the same, and the synthetic batch also trains a VAE; every student
                 batch mixes fresh samples with samples decoded by the VAE. No sample is stored.
    memory-bank  the same, but the replay samples come from a stored bank of past batches.
    unlabeled    no generator: student steps on samples of an unlabeled collection, drawn by
                 the teacher's relatedness scores, partly mixed (dfkd_fast.unlabeled).

A step returns its losses as 0-d tensors and, for the data-free methods, the share of the
generator's batch that the teacher assigns to each class (no host sync); the engine reads them at
its logging interval. The student never backpropagates through the generator and the teacher runs
without autograd in student steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd_fast.ops.kd_div import js_div, kd_div
from dfkd_fast.ops.reparameterize import sample_prior
from dfkd_fast.training import random_mirror, random_translate
from dfkd_fast.unlabeled.mixing import mix_batch


def augmented(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """A student batch's images shifted by up to `max_shift` pixels and, with `horizontal_flip`,
    each mirrored with probability 1/2; the teacher labels the result."""
    images = random_translate(images, config.max_shift, generator)
    return random_mirror(images, generator) if config.horizontal_flip else images


def generator_loss(teacher_logits, student_logits, bn_loss, features, config):
    """DAFL's confidence, class-balance and activation terms, DeepInversion's BN-statistic
    matching, and the student/teacher disagreement (Jensen-Shannon, PRE-DFKD) that the generator
    maximises. `bn_loss` and `features` (the teacher's penultimate features) may be None."""
    confidence = F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))
    mean_prediction = teacher_logits.float().softmax(dim=1).mean(dim=0)
    negative_entropy = (mean_prediction * mean_prediction.clamp_min(1e-12).log()).sum()
    disagreement = js_div(student_logits, teacher_logits,
                          config.disagreement_temperature or config.temperature)
    loss = (
        config.confidence_weight * confidence
        + config.balance_weight * negative_entropy
        - config.adversarial_weight * disagreement
    )
    if bn_loss is not None:
        loss = loss + config.bn_weight * bn_loss
    if features is not None:
        loss = loss - config.activation_weight * features.float().abs().mean()
    return loss, disagreement


def generator_step(run) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Updates the generator; returns its (detached) images, the teacher's logits on them and
    the losses."""
    config = run.config
    with run.phase("generator update"):
        latent = sample_prior(config.batch_size, config.latent_dim, generator=run.rng,
                              device=run.device)  # fmt: skip
        run.student.requires_grad_(False)
        with run.autocast():
            images = run.generator(latent)
            with run.bn_matching() as bn_matching, run.penultimate_features() as features:
                teacher_logits = run.teacher(images)
            student_logits = run.student(images)
            bn_loss = bn_matching.loss() if bn_matching is not None else None
            features = features.value if features is not None else None
            loss, disagreement = generator_loss(teacher_logits, student_logits, bn_loss, features,
                                                config)  # fmt: skip
        run.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.generator_optimizer.step()
        run.student.requires_grad_(True)
        if bn_matching is not None and config.bn_momentum > 0:
            bn_matching.update_ema()
    losses = {"generator": loss.detach(), "disagreement": disagreement.detach(),
              "synthetic_class_shares": predicted_class_shares(teacher_logits)}
    if bn_loss is not None:
        losses["bn"] = bn_loss.detach()
    return images.detach(), teacher_logits.detach(), losses


def predicted_class_shares(logits: torch.Tensor) -> torch.Tensor:
    """The fraction of the batch whose largest logit is each class's, as a (classes,) tensor; a
    comparison, not a bincount, which would sync with the host on CUDA."""
    classes = torch.arange(logits.shape[1], device=logits.device)
    return (logits.argmax(dim=1, keepdim=True) == classes).float().mean(dim=0)


def update_student(run, loss: torch.Tensor) -> None:
    run.student_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.student_grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.student.parameters(), run.config.student_grad_clip)
    run.student_optimizer.step()
    if run.student_average is not None:
        run.student_average.update(run.student)


def chunk_sizes(total: int, largest: int) -> list[int]:
    """`total` split into as few parts of at most `largest` as can hold it, of equal sizes (to
    one): no small remainder, whose BatchNorm statistics would be noisy."""
    parts = -(-total // largest)
    size, remainder = divmod(total, parts)
    return [size + 1] * remainder + [size] * (parts - remainder)


def student_batches(run, replay_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and the teacher's logits of all `student_steps` student updates of a step,
    (student_steps, batch_size, ...) each: fresh generator samples, `replay_count` of each batch
    replaced by replay samples, each image `augmented`; the teacher's soft outputs on the
    augmented images are the targets.

    The generator and the replay memory do not change during the student updates, so their
    samples are drawn together, in forwards of up to `batch_size` images (fewer, fuller forwards
    than one per update, none larger than the generator update's): 1.05-1.10x per replay step of the
    mnist preset (benchmarks/step_student_batches.py). The generator's BatchNorm normalises over
    each such forward."""
    config = run.config
    updates, fresh_count = config.student_steps, config.batch_size - replay_count
    with run.phase("student batches"), torch.no_grad(), run.autocast():
        images = torch.cat([
            run.generator(sample_prior(count, config.latent_dim, generator=run.rng,
                                       device=run.device))
            for count in chunk_sizes(updates * fresh_count, config.batch_size)
        ]).unflatten(0, (updates, fresh_count))  # fmt: skip
        if replay_count:
            replayed = torch.cat([
                run.replay.sample(count, run.replay_rng)
                for count in chunk_sizes(updates * replay_count, config.batch_size)
            ]).to(images.dtype)  # fmt: skip
            images = torch.cat([images, replayed.unflatten(0, (updates, replay_count))], dim=1)
        images = augmented(images.flatten(0, 1), config, run.rng)
        teacher_logits = torch.cat([run.teacher(batch) for batch in images.split(config.batch_size)])
    return (images.unflatten(0, (updates, config.batch_size)),
            teacher_logits.unflatten(0, (updates, config.batch_size)))  # fmt: skip


def student_updates(run, replay_count: int) -> torch.Tensor:
    """`student_steps` student updates, each on one of the step's `student_batches`; returns the
    last update's loss."""
    all_images, all_teacher_logits = student_batches(run, replay_count)
    for images, teacher_logits in zip(all_images, all_teacher_logits):
        with run.phase("student update"):
            with run.autocast():
                loss = kd_div(run.student(images), teacher_logits, run.config.temperature)
            update_student(run, loss)
    return loss.detach()


def adversarial_step(run, step: int) -> dict:
    images, teacher_logits, losses = generator_step(run)
    losses["student"] = student_updates(run, replay_count=0)
    run.student_schedule.step()
    return losses


def replay_step(run, step: int) -> dict:
    """pre-dfkd and memory-bank: `run.replay` is a GenerativeReplay or a MemoryBank."""
    images, teacher_logits, losses = generator_step(run)
    with run.phase("replay update"):
        replay_loss = run.replay.update(images.float(), teacher_logits, run.teacher,
                                       run.replay_rng)
    if replay_loss is not None:
        losses["replay"] = replay_loss
    replay_count = run.config.replay_batch_size if step >= run.config.first_replay_step else 0
    losses["student"] = student_updates(run, replay_count)
    run.student_schedule.step()
    return losses


def unlabeled_step(run, step: int) -> dict:
    """Student updates on collection samples drawn by relatedness (`run.sampler`), `augmented`,
    part of each batch mixed; targets are the teacher's outputs on the resulting inputs."""
    config = run.config
    for _ in range(config.student_steps):
        with run.phase("student batches"):
            indices = run.sampler.draw(config.batch_size, run.cpu_rng)
            run.drawn_per_source += torch.bincount(run.collection.source_index[indices],
                                                   minlength=len(run.drawn_per_source))  # fmt: skip
            images = run.collection.batch(indices).to(run.device, non_blocking=True)
            images = augmented(images, config, run.rng)
            images = mix_batch(images, config.mixup_fraction, config.cutmix_fraction, run.rng)
            with torch.no_grad(), run.autocast():
                teacher_logits = run.teacher(images)
        with run.phase("student update"):
            with run.autocast():
                divergences = kd_div(run.student(images), teacher_logits, config.temperature,
                                     reduction="none")  # fmt: skip
                loss = divergences.mean()
            update_student(run, loss)
            run.sampler.record(indices, divergences.detach())
    if step % config.refresh_every == 0:
        with run.phase("sampler refresh"):
            run.sampler.refresh()
    run.student_schedule.step()
    return {"student": loss.detach()}


STEP_FUNCTIONS = {"adversarial": adversarial_step, "pre-dfkd": replay_step,
                  "memory-bank": replay_step, "unlabeled": unlabeled_step}  # fmt: skip
