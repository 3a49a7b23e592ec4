"""End-to-end step throughput: one pre-dfkd step (generator update with BN-statistic matching and
the JS disagreement, VAE update, student steps on fresh + replayed samples with the KD
divergence, VAE sampling through reparameterize) with dfkd_fast's fused ops against the same step
on the pure-PyTorch reference ops (``use_backend("reference")``), in float32 and under bfloat16
autocast (``amp`` on CUDA, ``cpu_amp`` on the CPU); and the VAE update alone by precision and
memory format. Run:

    python -m pytest benchmarks/bench_distill_step.py --benchmark-json=out.json
    python benchmarks/report.py out.json --op distill_step
"""

from __future__ import annotations

import pytest
import torch

import dfkd_fast
from dfkd_fast.distill import preset_config
from harness import describe, preset_run, random_networks_run, synchronize

# name -> (preset, batch size on CPU, on CUDA)
WORKLOADS = {"mnist-lenet5": ("mnist", 256, 256), "cifar10-resnet56": ("cifar10", 32, 256)}


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", ["reference", "dfkd_fast"])
def test_pre_dfkd_step(benchmark, device, implementation, precision, workload):
    preset, cpu_batch, cuda_batch = WORKLOADS[workload]
    batch_size = cpu_batch if device == "cpu" else cuda_batch
    mixed = precision == "bfloat16"
    run = preset_run(preset, method="pre-dfkd", batch_size=batch_size, student_steps=2,
                     device=device, amp=mixed, cpu_amp=mixed)  # fmt: skip
    config = run.config
    backend = "reference" if implementation == "reference" else "auto"

    def step():
        with dfkd_fast.use_backend(backend):
            run.step_function(run, config.steps)
        synchronize(device)

    step()  # warm-up: replay memory filled, kernels loaded
    benchmark.pedantic(step, rounds=12 if device == "cpu" else 20, iterations=1, warmup_rounds=3)
    images = config.batch_size * (1 + config.student_steps)
    describe(benchmark, device, op="distill_step", implementation=implementation,
             dtype="bf16 autocast" if run.use_amp else "float32", shape=workload, numel=0,
             bytes=0, images_per_step=images, batch_size=batch_size)  # fmt: skip


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_vae_update(benchmark, device, precision, memory_format):
    """pre-dfkd's VAE update alone (the `mnist` preset's VAE and batch, half of it rehearsed), by
    precision and memory format: the part of the step that the autocast and channels_last reach
    since the VAE runs under them."""
    mixed = precision == "bfloat16"
    config = preset_config("mnist", method="pre-dfkd", device=device, amp=mixed, cpu_amp=mixed,
                           channels_last=memory_format == "channels_last")  # fmt: skip
    run = random_networks_run(config)
    images = torch.randn(config.batch_size, 1, 32, 32, device=device, generator=run.rng)
    with torch.no_grad():
        teacher_logits = run.teacher(images)

    def update():
        run.replay.update(images, teacher_logits, run.teacher, run.rng)
        synchronize(device)

    update()  # the first update rehearses nothing
    benchmark.pedantic(update, rounds=20, iterations=1, warmup_rounds=3)
    describe(benchmark, device, op="vae_update", implementation="dfkd_fast",
             dtype="bf16 autocast" if run.use_amp else "float32", shape=memory_format, numel=0,
             bytes=0, batch_size=config.vae_batch_size)  # fmt: skip
