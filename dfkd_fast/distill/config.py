"""The configuration of a distillation run: one frozen dataclass, validated on construction, and
the presets that make its defaults sound for the shipped examples."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dfkd_fast.backend import cpu_has_bfloat16_instructions
from dfkd_fast.devices import check_device_name
from dfkd_fast.unlabeled.sampling import POLICIES
from dfkd_fast.unlabeled.scores import SCORES

DATA_FREE_METHODS = ("adversarial", "pre-dfkd", "memory-bank")
METHODS = (*DATA_FREE_METHODS, "unlabeled")

# Fields that change what a run computes are compared on --resume; these do not.
RESUMABLE_CHANGES = frozenset({"eval_every", "checkpoint_every"})


@dataclass(frozen=True)
class DistillConfig:
    """Every weight, rate and ratio of a data-free distillation run.

    One *step* is one generator update followed by ``student_steps`` student updates (and, for
    the replay methods, one update of the replay memory); for the unlabeled method, it is
    ``student_steps`` student updates on batches drawn from the collection. What each field does
    is in :data:`FIELD_HELP`."""

    method: str = "pre-dfkd"
    steps: int = 800
    student_steps: int = 5
    batch_size: int = 256
    seed: int = 0
    # generator: DAFL/DCGAN-style, Adam
    latent_dim: int = 100
    generator_width: int = 16
    generator_lr: float = 1e-3
    generator_warmup: int = 0
    # student: SGD with momentum 0.9, cosine decay to 0 over the run
    student_lr: float = 0.1
    student_weight_decay: float = 5e-4
    student_grad_clip: float = 0.0
    student_ema: float = 0.0
    max_shift: int = 0
    horizontal_flip: bool = False
    temperature: float = 1.0
    disagreement_temperature: float = 0.0
    # generator loss: bn * BN-statistic matching + confidence * CE(teacher, argmax teacher)
    #   + balance * (negative entropy of the mean teacher prediction) - adversarial * JS(student, teacher)
    #   - activation * mean |teacher's penultimate features| (DAFL)
    bn_weight: float = 1.0
    first_bn_multiplier: float = 10.0
    bn_momentum: float = 0.0
    confidence_weight: float = 1.0
    balance_weight: float = 5.0
    adversarial_weight: float = 1.0
    activation_weight: float = 0.0
    # replay (pre-dfkd, memory-bank)
    replay_fraction: float = 0.5
    replay_start: float = 0.1
    # pre-dfkd's VAE: loss = pixel MSE + vae_output_weight * KD(teacher(recon), teacher(x))
    #   + vae_kl_weight * KL / pixels, on vae_batch_size of each step's synthetic images, plus
    #   the rehearsal of its own samples (vae_self_replay of that many), or of a frozen copy's
    #   once vae_snapshot_every > 0
    vae_batch_size: int = 128
    vae_latent_dim: int = 64
    vae_width: int = 16
    vae_lr: float = 1e-3
    vae_output_weight: float = 1.0
    vae_kl_weight: float = 0.1
    vae_self_replay: float = 0.5
    vae_snapshot_every: int = 0
    vae_fitted_prior: bool = True
    vae_prior_decay: float = 0.99
    memory_bank_size: int = 10240
    # unlabeled: relatedness score and sampling policy over the collection (dfkd_fast.unlabeled)
    score: str = "energy"
    policy: str = "proportional"
    policy_temperature: float = 1.0
    top_fraction: float = 0.1
    class_balance: bool = True
    disagreement_weight: float = 1.0
    uniform_share: float = 0.0
    refresh_every: int = 50
    mixup_fraction: float = 0.25
    cutmix_fraction: float = 0.25
    # engine
    eval_every: int = 50
    checkpoint_every: int = 100
    device: str = "cpu"
    amp: bool = True
    cpu_amp: bool = False
    channels_last: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{field.name} must be an int, got {value!r}")
            if field.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{field.name} must be a number, got {value!r}")
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"{field.name} must be finite and >= 0, got {value!r}")
        check_device_name(self.device)
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("class_balance", "amp", "cpu_amp", "channels_last", "vae_fitted_prior",
                     "horizontal_flip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        positive = ("steps", "student_steps", "batch_size", "latent_dim", "generator_width",
                    "vae_batch_size", "vae_latent_dim", "vae_width", "memory_bank_size", "eval_every",
                    "checkpoint_every", "refresh_every")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("generator_lr", "student_lr", "temperature", "vae_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("replay_fraction", "replay_start", "vae_self_replay", "bn_momentum",
                     "student_ema", "vae_prior_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.uniform_share > 1:
            raise ValueError(f"uniform_share must be in [0, 1], got {self.uniform_share}")
        if not 0 < self.top_fraction <= 1 or self.policy_temperature <= 0:
            raise ValueError("top_fraction must be in (0, 1] and policy_temperature > 0")
        if self.mixup_fraction + self.cutmix_fraction > 1:
            raise ValueError("mixup_fraction + cutmix_fraction must be at most 1")
        for name in ("generator_warmup", "max_shift", "seed", "vae_snapshot_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics), got {self.batch_size}")
        if self.uses_replay and self.replay_batch_size >= self.batch_size:
            raise ValueError(
                f"replay_fraction={self.replay_fraction} replays all {self.batch_size} images of "
                "a student batch: at least one must be a fresh generator sample"
            )

    @property
    def data_free(self) -> bool:
        return self.method in DATA_FREE_METHODS

    @property
    def uses_replay(self) -> bool:
        return self.method in ("pre-dfkd", "memory-bank")

    @property
    def replay_batch_size(self) -> int:
        return round(self.batch_size * self.replay_fraction) if self.uses_replay else 0

    @property
    def first_replay_step(self) -> int:
        return max(1, math.ceil(self.replay_start * self.steps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DistillConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**values)

    def resume_mismatches(self, saved: dict) -> list[str]:
        """The fields in which `saved` (a to_dict of the checkpointed run) differs from this
        config, apart from those a resumed run may change."""
        return sorted(
            name
            for name, value in self.to_dict().items()
            if name not in RESUMABLE_CHANGES and saved.get(name, value) != value
        )


# What each field does, for `dfkd-fast distill --help` and readers of the dataclass.
FIELD_HELP = {
    "method": "adversarial, pre-dfkd (VAE replay), memory-bank (stored replay) or unlabeled",
    "steps": "steps of the run; each is one generator update and student_steps student updates "
             "(unlabeled: the student updates only)",
    "student_steps": "student updates per step",
    "batch_size": "images per generator and student batch",
    "seed": "seeds everything random in the run, the student's initial weights included",
    "latent_dim": "size of the generator's input noise",
    "generator_width": "channel width of the generator",
    "generator_lr": "the generator's Adam learning rate",
    "generator_warmup": "data-free methods: generator updates before the first step, so that "
                        "the student starts on images the teacher classifies confidently, not "
                        "on the untrained generator's noise",
    "student_lr": "the student's SGD learning rate at the start (cosine decay to 0)",
    "student_weight_decay": "the student's SGD weight decay",
    "student_grad_clip": "largest gradient norm of a student update (0: no clipping)",
    "student_ema": "decay of the moving average of the student's weights, evaluated and kept "
                   "instead of the last weights (0: the last weights)",
    "max_shift": "every image of a student batch shifted by up to this many pixels before the "
                 "teacher labels it",
    "horizontal_flip": "every image of a student batch mirrored left-right with probability "
                       "1/2 before the teacher labels it (natural images, not digits)",
    "temperature": "temperature of the student's KD divergence",
    "disagreement_temperature": "temperature of the generator's disagreement term (0: the same "
                                "as temperature)",
    "bn_weight": "weight of BatchNorm-statistic matching in the generator's loss",
    "first_bn_multiplier": "extra weight of the teacher's first BatchNorm layer",
    "bn_momentum": "Fast-DFKD's moving-average blending of the batch statistics (0: off)",
    "confidence_weight": "weight of the teacher's confidence (cross-entropy with its argmax)",
    "balance_weight": "weight of the class balance (entropy of the mean teacher prediction)",
    "adversarial_weight": "weight of the student/teacher disagreement the generator seeks",
    "activation_weight": "weight of DAFL's activation term (teacher's penultimate features)",
    "replay_fraction": "pre-dfkd, memory-bank: fraction of each student batch replayed",
    "replay_start": "pre-dfkd, memory-bank: fraction of the run after which replay starts",
    "vae_batch_size": "pre-dfkd: synthetic images of each step that the VAE learns",
    "vae_latent_dim": "pre-dfkd: the VAE's latent size",
    "vae_width": "pre-dfkd: channel width of the VAE",
    "vae_lr": "pre-dfkd: the VAE's Adam learning rate",
    "vae_output_weight": "pre-dfkd: weight of the VAE's reconstruction in teacher-output space",
    "vae_kl_weight": "pre-dfkd: weight of the VAE's KL term (per pixel)",
    "vae_self_replay": "pre-dfkd: the VAE's rehearsal of its own samples, as a fraction of "
                       "vae_batch_size",
    "vae_snapshot_every": "pre-dfkd: every that many updates, the VAE rehearses a frozen copy of "
                          "itself instead of its own samples, k/(k+1) of its batch after k "
                          "copies, so that each part of the run keeps an equal share (deep "
                          "generative replay; 0: off)",
    "vae_fitted_prior": "pre-dfkd: replay decodes draws of a Gaussian fitted to the VAE's "
                        "posteriors (no: of N(0, I), as in the paper)",
    "vae_prior_decay": "pre-dfkd: per-update decay of the fitted Gaussian's moving average",
    "memory_bank_size": "memory-bank: past synthetic images kept",
    "score": "unlabeled: relatedness score, " + " | ".join(SCORES),
    "policy": "unlabeled: sampling policy, " + " | ".join(POLICIES),
    "policy_temperature": "unlabeled: temperature of proportional sampling on the standardised "
                          "score (lower: sharper)",
    "top_fraction": "unlabeled, top-k: fraction of the collection kept",
    "class_balance": "unlabeled: sample evenly over the teacher's predicted classes",
    "disagreement_weight": "unlabeled: how much the refreshed weights favour samples where "
                           "student and teacher still disagree",
    "uniform_share": "unlabeled: share of the sampling probability spread uniformly",
    "refresh_every": "unlabeled: steps between refreshes of the sampling weights",
    "mixup_fraction": "unlabeled: fraction of each batch mixed by mixup",
    "cutmix_fraction": "unlabeled: fraction of each batch mixed by cutmix",
    "eval_every": "steps between evaluations on the test data (reporting only)",
    "checkpoint_every": "steps between checkpoints",
    "device": "cpu, cuda or cuda:N",
    "amp": "bfloat16 autocast on CUDA",
    "cpu_amp": "bfloat16 autocast on the CPU: faster where the CPU has bfloat16 instructions "
               "(AVX512-BF16, AMX, Arm BF16), much slower where it has not",
    "channels_last": "channels-last memory format for the networks and images",
}  # fmt: skip


# Defaults that suit each shipped example; any field given explicitly wins over these.
PRESETS: dict[str, dict] = {
    # scikit-learn's 8x8 digits, small BatchNorm CNNs: a few minutes on 2 CPU cores
    "digits": dict(steps=300, student_steps=2, batch_size=128, latent_dim=64,
                   generator_width=32, student_lr=0.05, temperature=4.0, confidence_weight=0.5,
                   adversarial_weight=0.5, vae_latent_dim=16, vae_width=16,
                   memory_bank_size=4096, eval_every=25, checkpoint_every=50),
    # MNIST, LeNet-5 -> LeNet-5-half (no BatchNorm in the teacher: DAFL's losses only); 2400
    # steps fit the 15-minute budget on 2 CPU cores without bfloat16 instructions, in float32
    # (3200 took 18 min there, no more accurate: docs/results.md); channels_last, and bfloat16
    # autocast where the CPU has it (each about halves the generator's time); a VAE that learns
    # 64 of each step's synthetic images (a step 1.09x faster than with 128, as accurate); soft
    # student targets (T = 2) with the disagreement kept sharp (T = 1), student batches shifted
    # by up to 2 pixels, clipped updates at half the default rate (higher from step 300 on,
    # 0.3-0.7 points over the run), and the weight average, which smooths the student's mid-run
    # accuracy; twice the default weight on the student/teacher disagreement (docs/results.md: six
    # teacher/seed pairs, 0.40 points more over the run on average, the worst pair 1.6 points
    # more); the generator's Adam at 3x the default rate (the same six pairs: 0.33 points more
    # over the run, 0.19 at the end, every pair above both targets); no generator warm-up
    # (docs/results.md: with one teacher 0.5 points more over the run, with another both targets
    # missed)
    "mnist": dict(steps=2400, channels_last=True, cpu_amp=True, student_ema=0.995, max_shift=2,
                  temperature=2.0, disagreement_temperature=1.0, student_grad_clip=2.0,
                  student_lr=0.05, vae_batch_size=64, adversarial_weight=2.0, generator_lr=3e-3),
    # unlabeled collections: one student step per step, soft targets at T = 4; MNIST digits
    # shifted by up to 2 pixels, as the teacher was trained; half of the draws sharply
    # energy-weighted, half uniform (diversity), with clipped, averaged student updates
    "mnist-unlabeled": dict(steps=10000, student_steps=1, temperature=4.0, score="energy",
                            policy_temperature=0.5, uniform_share=0.5, student_grad_clip=2.0,
                            student_ema=0.995, mixup_fraction=0.5, cutmix_fraction=0.5,
                            max_shift=2, eval_every=100, checkpoint_every=500),
    # CIFAR-10 teacher: energy plus BN typicality, the score that best singles out the CIFAR-10
    # images of the benchmark's collection, at T = 1 for half of the draws, the other half
    # uniform (docs/results.md: 70.0% against 65.5% with BN typicality alone, three seeds);
    # student batches shifted by up to 2 pixels and mirrored, as in the data-free preset
    # (docs/results.md: 2800 CPU steps, two seeds, 3.8 and 2.6 points above the same runs without)
    "cifar10-unlabeled": dict(steps=3000, student_steps=1, temperature=4.0, batch_size=128,
                              score="energy+bn-typicality", policy_temperature=1.0,
                              uniform_share=0.5, mixup_fraction=0.5, cutmix_fraction=0.5,
                              max_shift=2, horizontal_flip=True, eval_every=100,
                              checkpoint_every=500),
    # CIFAR-10 ResNets: DeepInversion-weighted BatchNorm matching, wider generator; student
    # batches shifted by up to 2 pixels and mirrored (docs/results.md: 3000 CPU steps, two seeds,
    # 11.5 and 15.0 points above the same runs without)
    "cifar10": dict(batch_size=256, latent_dim=256, generator_width=64, generator_lr=1e-3,
                    student_steps=5, confidence_weight=0.5, balance_weight=5.0,
                    adversarial_weight=1.0, temperature=4.0, vae_width=64,
                    vae_latent_dim=128, max_shift=2, horizontal_flip=True),
}  # fmt: skip


def preset_config(preset: str | None, **overrides) -> DistillConfig:
    """The preset's fields (its '-unlabeled' variant for that method), then `overrides`.

    A preset's `cpu_amp` is dropped on a CPU known to lack bfloat16 instructions, where the
    emulated autocast makes a step several times slower (docs/benchmarks.md); given in
    `overrides`, it is kept."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if overrides.get("method") == "unlabeled" and f"{preset}-unlabeled" in PRESETS:
        preset = f"{preset}-unlabeled"
    fields = dict(PRESETS.get(preset, {}))
    if fields.get("cpu_amp") and cpu_has_bfloat16_instructions() is False:
        fields["cpu_amp"] = False
    return DistillConfig(**{**fields, **overrides})
