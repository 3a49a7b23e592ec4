"""One step of a preset's workload with the generator's and the VAE decoder's upsample-conv
layers as UpsampleConv2d (dfkd_fast.upsample_conv2d) against the same step with each of them
as nn.Upsample followed by nn.Conv2d, sharing the same parameters: the two layouts take turns in
blocks within one process, on one run (randomly initialised networks, replay from the first
step), so that the machine's drift affects both alike. Run:

    python benchmarks/step_upsample_conv.py --preset mnist --set cpu_amp=false \
        --json benchmarks/results/step-upsample-conv-mnist-cpu.json
"""

from __future__ import annotations

import argparse

from dfkd_fast.models.layers import separate_upsampling
from harness import (
    add_step_comparison_arguments,
    compare_step_variants,
    parse_step_comparison,
    preset_run,
    report_step_comparison,
)

LAYOUTS = ("UpsampleConv2d", "nn.Upsample + nn.Conv2d")


def measure(preset: str, overrides: dict, device: str, blocks: int, steps_per_block: int) -> dict:
    run = preset_run(preset, device=device, **{"method": "pre-dfkd", **overrides})
    places = [(run.generator, "body")]
    if getattr(run, "replay", None) is not None and hasattr(run.replay, "vae"):
        places.append((run.replay.vae, "decoder"))
    layouts = {  # the second shares the first's parameters, so the optimisers update both
        LAYOUTS[0]: [getattr(module, name) for module, name in places],
        LAYOUTS[1]: [separate_upsampling(getattr(module, name)) for module, name in places],
    }

    def switch_to(layout: str):
        def switch():
            for (module, name), sequential in zip(places, layouts[layout]):
                setattr(module, name, sequential)

        return switch

    switches = {layout: switch_to(layout) for layout in LAYOUTS}
    return {"preset": preset, "overrides": overrides,
            **compare_step_variants(run, switches, blocks, steps_per_block)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_comparison_arguments(parser)
    arguments, overrides = parse_step_comparison(parser)
    result = measure(arguments.preset, overrides, arguments.device, arguments.blocks,
                     arguments.steps_per_block)  # fmt: skip
    report_step_comparison(arguments, result)


if __name__ == "__main__":
    main()
