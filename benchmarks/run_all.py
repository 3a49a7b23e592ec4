"""Runs every benchmark suite on this machine, saves pytest-benchmark JSON per op under
benchmarks/results/, and prints the markdown tables for docs/benchmarks.md.

    python benchmarks/run_all.py                      # every op, every available device
    python benchmarks/run_all.py --ops kd_div --device cuda
    python benchmarks/run_all.py --benchmark-args="--benchmark-max-time=0.25"   # quicker rounds

On a GPU machine this is the one command to refresh the GPU numbers (copy bandwidth included).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

from report import load_cases, step_table, table

HERE = Path(__file__).resolve().parent
# bench file -> the report tables it feeds
SUITES = {
    "reparameterize": ["reparameterize"],
    "kd_div": ["kd_div"],
    "bn_stats": ["bn_stat_loss", "teacher_bn_loss", "batchnorm_forward", "batchnorm_forward_backward"],
    "distill_step": ["distill_step"],
    "layers": ["max_pool_2x2", "max_pool_2x2_forward_backward", "random_translate"],
    "upsample_conv": ["upsample_conv2d"],
    "few_channel_conv": ["few_channel_conv2d"],
}


def machine_slug(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="only this device (default: every available one)")
    parser.add_argument("--benchmark-args", default="",
                        help="extra pytest-benchmark options, one string (split on spaces)")
    arguments = parser.parse_args()
    failed = []
    devices = [arguments.device] if arguments.device else (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for device in devices:
        for op in arguments.ops:
            output = HERE / "results" / f"{op}-{machine_slug(device)}.json"
            command = [
                sys.executable, "-m", "pytest", "-q", str(HERE / "bench_memory.py"),
                str(HERE / f"bench_{op}.py"), "-k", device, f"--benchmark-json={output}",
                *arguments.benchmark_args.split(),
            ]
            print("+", " ".join(command), flush=True)
            if subprocess.run(command, cwd=HERE).returncode != 0:
                failed.append(f"{op} on {device}")
                continue
            cases, _ = load_cases(str(output))
            for table_op in SUITES[op]:
                text = step_table(cases) if table_op == "distill_step" else table(cases, table_op)
                print(f"\n### {table_op} on {device}\n\n{text}\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
