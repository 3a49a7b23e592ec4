"""Markdown tables from pytest-benchmark JSON: time per call, ratios against eager PyTorch and
torch.compile measured in the same run, achieved GB/s and its fraction of the measured copy
bandwidth, and for compute-bound ops (cases that record `flops`, the eager computation's count)
the GFLOP/s that count comes to at dfkd_fast's time.

    python benchmarks/report.py out.json [--op reparameterize]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_cases(path: str) -> list[dict]:
    with open(path) as handle:
        data = json.load(handle)
    cases = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        cases.append({**info, "median_s": bench["stats"]["median"]})
    return cases, data.get("machine_info", {})


def _size_label(case: dict) -> str:
    return case.get("shape") or f"2^{case['numel'].bit_length() - 1}"


def _megabytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def table(cases: list[dict], op: str) -> str:
    """One row per size; a time and a ratio column per baseline measured in the same run."""
    copy = {c["device"]: c["bytes"] / c["median_s"] for c in cases if c["op"] == "copy"}
    by_size = defaultdict(dict)
    for case in cases:
        if case["op"] == op:
            key = (case["device"], case["dtype"], case["numel"], _size_label(case))
            by_size[key][case["implementation"]] = case
    preferred = ["eager", "torch.compile"]
    found = {name for impls in by_size.values() for name in impls} - {"dfkd_fast"}
    baselines = [n for n in preferred if n in found] + sorted(found - set(preferred))
    with_memory = any(c.get("peak_memory") is not None for c in cases if c["op"] == op)
    header = "| device | dtype | size | dfkd_fast | " + " | ".join(baselines)
    header += " | " + " | ".join(f"vs {name}" for name in baselines) + " | GB/s | of copy BW |"
    with_flops = any(c.get("flops") is not None for c in cases if c["op"] == op)
    if with_flops:
        header += " GFLOP/s (eager's count) |"
    if with_memory:
        header += " peak memory (ours / eager) |"
    columns = 6 + 2 * len(baselines) + (1 if with_memory else 0) + (1 if with_flops else 0)
    lines = [header, "|---|---|" + "---:|" * (columns - 2)]
    for (device, dtype, _numel, label), impls in sorted(by_size.items()):
        ours = impls.get("dfkd_fast")
        if ours is None:
            continue

        def ms(name):
            return f"{impls[name]['median_s'] * 1e3:.3f} ms" if name in impls else "-"

        def ratio(name):
            return f"{impls[name]['median_s'] / ours['median_s']:.2f}x" if name in impls else "-"

        bandwidth = ours["bytes"] / ours["median_s"]
        fraction = f"{bandwidth / copy[device]:.0%}" if device in copy else "-"
        row = [device, dtype, label, ms("dfkd_fast"), *map(ms, baselines),
               *map(ratio, baselines), f"{bandwidth / 1e9:.1f}", fraction]  # fmt: skip
        if with_flops:
            row.append(f"{ours['flops'] / ours['median_s'] / 1e9:.0f}")
        if with_memory:
            eager_memory = impls.get("eager", {}).get("peak_memory")
            row.append(f"{_megabytes(ours.get('peak_memory'))} / {_megabytes(eager_memory)}")
        lines.append("| " + " | ".join(row) + " |")
    devices = sorted({(c["device"], c["device_name"], c["torch"]) for c in cases})
    header_lines = "\n".join(f"- {d}: {name}, torch {version}" for d, name, version in devices)
    copy_lines = "\n".join(
        f"- measured copy bandwidth ({d}): {bw / 1e9:.1f} GB/s" for d, bw in copy.items()
    )
    return f"{header_lines}\n{copy_lines}\n\n" + "\n".join(lines)


def step_table(cases: list[dict]) -> str:
    """End-to-end steps: time per step and images per second, ours against the reference ops."""
    rows = defaultdict(dict)
    for case in cases:
        if case["op"] == "distill_step":
            rows[(case["device"], case["shape"], case["batch_size"], case["dtype"])][
                case["implementation"]] = case  # fmt: skip
    lines = ["| device | workload | batch | dtype | dfkd_fast step | reference step | speed-up "
             "| dfkd_fast img/s | reference img/s |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for (device, workload, batch, dtype), impls in sorted(rows.items()):
        if {"dfkd_fast", "reference"} - set(impls):
            continue
        ours, reference = impls["dfkd_fast"], impls["reference"]
        images = ours["images_per_step"]
        lines.append(
            f"| {device} | {workload} | {batch} | {dtype} | {ours['median_s'] * 1e3:.0f} ms | "
            f"{reference['median_s'] * 1e3:.0f} ms | "
            f"{reference['median_s'] / ours['median_s']:.2f}x | "
            f"{images / ours['median_s']:.0f} | {images / reference['median_s']:.0f} |"
        )
    devices = sorted({(c["device"], c["device_name"], c["torch"]) for c in cases})
    header_lines = "\n".join(f"- {d}: {name}, torch {version}" for d, name, version in devices)
    return f"{header_lines}\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_path")
    parser.add_argument("--op", default="reparameterize")
    arguments = parser.parse_args()
    cases, _ = load_cases(arguments.json_path)
    print(step_table(cases) if arguments.op == "distill_step" else table(cases, arguments.op))


if __name__ == "__main__":
    main()
