"""The CPU kernels of dfkd_fast::bn_stat_loss alone: the statistics forward and the backward to
x, called through torch.ops without autograd or the Python wrapper, on BatchNorm inputs of few
channels in channels_last (where a row of channels is shorter than a vector). Best of 9
repetitions of 50 calls each, freed host memory kept as the CLI does. Run:

    python benchmarks/bn_stats_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dfkd_fast
from harness import device_name

SHAPES = [(256, 8, 32, 32), (256, 16, 32, 32), (256, 24, 16, 16), (256, 32, 16, 16),
          (256, 64, 8, 8)]  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best_ms(call, calls: int = 50, repetitions: int = 9) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def measure(shape, dtype) -> dict:
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    operators = torch.ops.dfkd_fast
    _, mean, var, _, norms = operators.bn_stat_loss(x, running_mean, running_var, None, None,
                                                    0.0, None, None)  # fmt: skip
    grad_loss = torch.ones(())
    return {
        "forward_ms": best_ms(lambda: operators.bn_stat_loss(
            x, running_mean, running_var, None, None, 0.0, None, None)),
        "backward_ms": best_ms(lambda: operators.bn_stat_loss_backward(
            x, mean, var, norms, running_mean, running_var, None, None, 0.0, None, grad_loss,
            None, None, None)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if not dfkd_fast.extension_loaded():
        raise SystemExit("the compiled extension is not loaded: nothing to measure")
    dfkd_fast.retain_freed_host_memory()
    results = []
    for shape in SHAPES:
        for name, dtype in DTYPES.items():
            results.append({"shape": list(shape), "dtype": name, **measure(shape, dtype)})
            row = results[-1]
            print(f"{'x'.join(map(str, shape))} channels_last {name}: forward "
                  f"{row['forward_ms']:.3f} ms, backward {row['backward_ms']:.3f} ms")
    if arguments.json:
        report = {"device": device_name("cpu"), "torch": torch.__version__, "results": results}
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
