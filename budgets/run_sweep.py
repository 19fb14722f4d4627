"""Run a budget-sweep config and plot it (a thin wrapper around autorank.apps.sweep / autorank.apps.plots).

    python budgets/run_sweep.py budgets/mnist_cnn.toml            # -> budgets/out/mnist_cnn/
    python budgets/run_sweep.py CONFIG --out DIR --no-resume

Same as ``autorank sweep CONFIG`` followed by ``autorank plot DIR``.
"""

from __future__ import annotations

import sys

from autorank.apps.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    rc = main(["sweep", *args, "--plot"])
    sys.exit(rc)
