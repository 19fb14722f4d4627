"""Cost of the slow families against ALDS alone, and the error of the plans they give.

    python benchmarks/bench_family_speed.py [--repeats 2] [--budgets 0.3 0.1] [--sets alds alds+spatial_svd+tucker2 ...]

On torchvision ResNet-18 (untrained, ``torch.manual_seed(0)``; input 1 x 3 x 224 x 224),
weight-only, for each family set: the time of the local step (``CompressStep.prepare``:
every candidate of every family with its error) and of choose + build at each budget,
then, per budget, the plan's largest layer error (``plan.max_error``, the solver's
objective) and the *built* one: the relative operator-norm error
``||W - W_hat||_2 / ||W||_2`` of every realised layer's ``to_dense()`` kernel against the
original weight (for ALDS k > 1 the plan carries the guaranteed upper bound, so the
built error can be lower).

The sets run interleaved (set A, set B, ..., then again), so a busy shared machine
slows them alike; the printed ratios (set time / ALDS time, per repeat and the median)
are what to read, not the absolute seconds.  Targets of issue 17: ``alds+spatial_svd+tucker2``
at most 3x ALDS alone, ``+cp`` at most 6x.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections import Counter

import torch

import autorank
from autorank.measures import relative_spectral_error
from autorank.pipeline import CompressStep

SETS = ["alds", "alds+spatial_svd+tucker2", "alds+spatial_svd+tucker2+cp"]


def built_error(original: torch.nn.Module, compressed: torch.nn.Module, plan) -> dict[str, float]:
    """``||W - W_hat||_2 / ||W||_2`` of every factorised layer of ``compressed`` (its ``to_dense()``)."""
    orig, new = dict(original.named_modules()), dict(compressed.named_modules())
    out = {}
    for name, lp in plan.layers.items():
        if lp.family == "dense":
            continue
        w = orig[name].weight.detach()
        w_hat = new[name].to_dense().weight.detach()
        f = w.shape[0]
        out[name] = relative_spectral_error(w.reshape(f, -1), w_hat.reshape(f, -1))
    return out


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--sets", nargs="+", default=SETS, help="family sets, '+'-joined")
    ap.add_argument("--no-built", action="store_true", help="skip measuring the built layers' errors")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    print(f"resnet18 (untrained, seed 0): {autorank.count_params(model):,} params, "
          f"threads={torch.get_num_threads()}, budgets={args.budgets}, repeats={args.repeats}", flush=True)
    times: dict[str, list[float]] = {s: [] for s in args.sets}
    for rep in range(args.repeats):
        for label in args.sets:
            fams = tuple(label.split("+"))
            step = CompressStep(x, autorank.Settings(compression=autorank.Compression(
                curves=autorank.CurveConfig(families=fams))))
            t0 = time.perf_counter()
            prep = step.prepare(copy.deepcopy(model))
            t_prep = time.perf_counter() - t0
            rows, t_steps = [], 0.0
            for budget in args.budgets:
                t1 = time.perf_counter()
                res = step(copy.deepcopy(model), budget, prepared=prep)
                t_step = time.perf_counter() - t1
                t_steps += t_step
                used = Counter(lp.family for lp in res.plan.layers.values() if lp.family != "dense")
                built = {} if args.no_built else built_error(model, res.model, res.plan)  # not timed
                rows.append((budget, res.plan.max_error, max(built.values(), default=float("nan")),
                             res.plan.totals["params"] / res.plan.totals["params_before"], t_step, used))
            total = t_prep + t_steps
            times[label].append(total)
            print(f"[rep {rep}] {label:<30} curves {t_prep:7.1f}s  total {total:7.1f}s", flush=True)
            for budget, perr, berr, pfrac, t_step, used in rows:
                print(f"      budget {budget:.2f}: plan max err {perr:.4f}  built max err {berr:.4f}  "
                      f"params {pfrac:.4f}  step {t_step:5.1f}s  "
                      + ", ".join(f"{k}:{v}" for k, v in sorted(used.items())), flush=True)
    base = args.sets[0]
    print(f"\ntime / time of '{base}' (per repeat; median):")
    for label in args.sets:
        ratios = [t / b for t, b in zip(times[label], times[base])]
        print(f"  {label:<30} " + "  ".join(f"{r:5.2f}" for r in ratios)
              + f"   median {statistics.median(ratios):5.2f}   (seconds: "
              + ", ".join(f"{t:.1f}" for t in times[label]) + ")")


if __name__ == "__main__":
    main()
