"""Speed of the whole ``autorank.optimize`` (no fine-tuning) against a bare svdvals pass.

    python benchmarks/bench_optimize_speed.py [--model resnet50] [--budget 0.3] [--repeats 3]

Both are timed in the same run on the same machine, so the ratio is meaningful on
a noisy shared machine.  The reference pass calls ``torch.linalg.svdvals`` (float32,
the weights' dtype) on exactly the candidate blocks autorank examines: for every
compressible layer and every candidate number of groups ``k``, the ``k`` column
blocks of the layer's weight matrix, batched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import autorank
from autorank.families.alds import group_choices


def svdvals_pass(model, graph, config) -> float:
    modules = dict(model.named_modules())
    t = time.perf_counter()
    for name, info in graph.layers.items():
        w = modules[name].weight.detach().reshape(info.out_features, -1)
        f, n = w.shape
        for k in group_choices(info, config):
            torch.linalg.svdvals(w.reshape(f, k, n // k).transpose(0, 1))
    return time.perf_counter() - t


def main() -> None:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--metric", default="params", choices=["params", "flops"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    config = autorank.CurveConfig()
    graph = autorank.analyze(model, x)
    print(f"model={args.model} budget={args.budget} metric={args.metric} threads={torch.get_num_threads()} "
          f"layers={len(graph.layers)} candidate blocks: "
          f"{sum(len(group_choices(i, config)) for i in graph.layers.values())} (layer, k) pairs")

    opt_times, ref_times = [], []
    result = None
    for r in range(args.repeats):
        ref_times.append(svdvals_pass(model, graph, config))
        t = time.perf_counter()
        result = autorank.optimize(model, args.budget, x, metric=args.metric, progress=False)
        opt_times.append(time.perf_counter() - t)
        print(f"  repeat {r}: optimize {opt_times[-1]:.2f}s   bare svdvals pass {ref_times[-1]:.2f}s")
    opt, ref = statistics.median(opt_times), statistics.median(ref_times)
    plan = result.plan
    print("stages of the last optimize (s): " + ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()))
    print(f"median optimize {opt:.2f}s, median bare svdvals pass {ref:.2f}s, ratio optimize/svdvals = {opt / ref:.2f}")
    t = plan.totals
    print(f"measured params {t['params']:,}/{t['params_before']:,} = {t['params'] / t['params_before']:.4f}, "
          f"MACs {t['flops']:,}/{t['flops_before']:,} = {t['flops'] / t['flops_before']:.4f}")
    lower = max(lp.error_lower for lp in plan.layers.values())
    print(f"largest layer error: {plan.max_error:.4f} (upper bound, autorank's objective); "
          f"reference-style max_i sigma_(j+1)(W_i)/sigma_1 of the same allocation: {lower:.4f}")
    ks = {}
    for lp in plan.layers.values():
        k = lp.hyper.get("groups", 0)
        ks[k] = ks.get(k, 0) + 1
    print("layers per chosen k (0 = dense):", dict(sorted(ks.items())))
    ref_style = autorank.optimize(model, args.budget, x, metric=args.metric, progress=False,
                                  compression=autorank.Compression(curves=autorank.CurveConfig(error_bound="max")))
    print(f"with the reference's error (CurveConfig(error_bound='max')): largest layer error "
          f"{ref_style.plan.max_error:.4f}")


if __name__ == "__main__":
    main()
