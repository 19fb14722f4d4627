"""Every decomposition family alone, and all of them competing under one budget.

    python benchmarks/bench_families.py [--budgets 0.3 0.1] [--models mnist resnet18]

Models:

* ``mnist``: the real MNIST CNN of the demo (trained and cached by
  ``autorank.apps.zoo.train_mnist_cnn``), scored on 1,000 held-out real digits;
* ``resnet18``: torchvision ResNet-18, untrained (structure and costs only),
  input 1 x 3 x 224 x 224.

For each model and budget (fraction of parameters), the exact min-max solver runs
once per family on that family's candidates alone, and once on the union of all
families ("all").  Printed per row: whether the budget is reachable, the largest
layer error (the solver's objective: relative operator-norm error of each layer,
measured for every family but ALDS, whose k > 1 candidates carry the guaranteed
upper bound), the network bound prod(1 + eps) - 1, the measured parameter and MAC
fractions, which families the plan uses, the MNIST accuracy after compression
only, and the time.  The curves of each family are built once per model and reused
for every budget.

"all" can never be worse than the best single family (its candidate set is the
union, and the solver is exact); the script checks this and says where it is better.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from collections import Counter

import torch

import autorank
from autorank.pipeline import CompressStep

FAMILIES = ["alds", "spatial_svd", "tucker2", "cp", "tt", "sparse_lowrank"]


def models(names):
    if "mnist" in names:
        from autorank.apps.zoo import accuracy, load_mnist, train_mnist_cnn

        _, test = load_mnist()
        model = train_mnist_cnn()
        yield "mnist", model, test[:1][0], (lambda m: accuracy(m, test))
    if "resnet18" in names:
        import torchvision

        torch.manual_seed(0)
        yield "resnet18", torchvision.models.resnet18().eval(), torch.randn(1, 3, 224, 224), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--models", nargs="+", default=["mnist", "resnet18"])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--grid-points", type=int, default=12)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t_all = time.perf_counter()
    summary = []
    for mname, model, x, evaluate in models(args.models):
        base = evaluate(model) if evaluate else None
        print(f"\n== {mname}: {autorank.count_params(model):,} params"
              + (f", held-out accuracy {base:.2f}%" if base is not None else ""))
        head = (f"{'budget':>6}  {'families':<15} {'status':<10} {'max err':>8} {'net bound':>10} "
                f"{'params':>7} {'MACs':>7}  {'accuracy %':>10}  {'time s':>6}  used")
        print(head)
        print("-" * len(head))
        runs = [[f] for f in args.families] + [list(args.families)]
        prepared = {}
        for budget in args.budgets:
            best_single, all_err = None, None
            for fams in runs:
                label = "all" if len(fams) > 1 else fams[0]
                curves = autorank.CurveConfig(families=tuple(fams), grid_points=args.grid_points)
                step = CompressStep(x, autorank.Settings(compression=autorank.Compression(curves=curves)))
                t = time.perf_counter()
                work = copy.deepcopy(model)
                if label not in prepared:
                    prepared[label] = step.prepare(work)
                    prep_time = time.perf_counter() - t
                else:
                    prep_time = 0.0
                try:
                    res = step(work, budget, prepared=prepared[label])
                except ValueError as exc:
                    msg = str(exc)
                    print(f"{budget:>6.2f}  {label:<15} {'infeasible':<10} {'-':>8} {'-':>10} {'-':>7} {'-':>7}  "
                          f"{'-':>10}  {time.perf_counter() - t:>6.1f}  {msg[msg.find('smallest'):][:60]}")
                    continue
                tot = res.plan.totals
                used = Counter(lp.family for lp in res.plan.layers.values())
                acc = evaluate(res.model) if evaluate else None
                err = res.plan.max_error
                print(f"{budget:>6.2f}  {label:<15} {'ok':<10} {err:>8.4f} {res.plan.network_bound:>10.3g} "
                      f"{tot['params'] / tot['params_before']:>7.4f} {tot['flops'] / tot['flops_before']:>7.4f}  "
                      f"{acc if acc is not None else float('nan'):>10.2f}  {time.perf_counter() - t:>6.1f}  "
                      + ", ".join(f"{k}:{v}" for k, v in sorted(used.items())), flush=True)
                if prep_time:
                    logging.info("%s %s curves in %.1fs", mname, label, prep_time)
                if label == "all":
                    all_err = err
                elif best_single is None or err < best_single[1]:
                    best_single = (label, err)
            if all_err is not None and best_single is not None:
                verdict = ("better" if all_err < best_single[1] - 1e-12 else
                           "equal" if abs(all_err - best_single[1]) <= 1e-12 else "WORSE")
                summary.append(f"{mname} @ {budget}: all = {all_err:.4f}, best single = {best_single[0]} "
                               f"{best_single[1]:.4f} -> {verdict}")
    print()
    print("\n".join(summary))
    print(f"total time {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
