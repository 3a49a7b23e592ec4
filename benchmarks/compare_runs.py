"""Side-by-side summary of finished distillation runs: one JSON, one Markdown table, one plot.

    python3 benchmarks/compare_runs.py runs/mnist-adversarial runs/mnist-pre-dfkd \
        runs/mnist-memory-bank --json benchmarks/results/distill-mnist-cpu.json \
        --plot docs/img/mnist-accuracy.png --title "MNIST, LeNet-5 -> LeNet-5-half"

The same as ``dfkd-fast compare`` with the same arguments; kept for the commands in docs/.
"""

from __future__ import annotations

import sys

from dfkd_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
