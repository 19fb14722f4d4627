"""Wall-clock cost of each README one-liner, measured on a named model (the figures README.md quotes).

    python benchmarks/bench_readme_costs.py                       # the MNIST CNN (trained once, then cached)
    python benchmarks/bench_readme_costs.py --model resnet18 --only basic flops vbmf

Models: ``mnist_cnn`` (the demo's CNN, ~390k params, one 1x28x28 digit as example input,
512 training digits in 8 batches as calibration data, 256 held-out digits for Refine) or
``resnet18`` (torchvision, untrained weights, one 1x3x224x224 input, 8 random batches of 8
images as calibration).  Each line is timed once, end to end, with ``progress=False``, and
prints its wall time, the CPU time of the process (all threads; on an idle machine with
``n`` cores the wall time is between ``cpu / n`` and ``cpu``) and the 1-minute load average:
on a machine shared with other work the wall time grows with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

import autorank


def _mnist():
    from autorank.apps.zoo import accuracy, load_mnist, train_mnist_cnn

    train, test = load_mnist()
    model = train_mnist_cnn()
    x = train[:1][0]
    images = torch.stack([train[i][0] for i in range(512)])
    batches = list(images.split(64))
    held = [torch.stack([test[i][0] for i in range(256)])]
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    return model, x, batches, held, loader, (lambda m: accuracy(m, test)), train


def _resnet18():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    batches = [torch.randn(8, 3, 224, 224) for _ in range(8)]
    held = [torch.randn(8, 3, 224, 224)]
    return model, x, batches, held, None, None, None


def cases(model, x, batches, held, loader, evaluate, train):
    def noop(m, step):  # the user's own fine-tuning loop; its cost is the user's
        return None

    yield "basic", "optimize(model, 0.3, x)", lambda: autorank.optimize(model, 0.3, x, progress=False)
    yield "flops", 'optimize(model, 0.5, metric="flops", x)', \
        lambda: autorank.optimize(model, 0.5, x, metric="flops", progress=False)
    # without the README's exclude=["fc*"]: on the MNIST CNN fc1 holds 75 % of the weights, so 0.3 is unreachable
    yield "families", "Compression(families=[alds, tucker2, cp, spatial_svd, tt])", \
        lambda: autorank.optimize(model, 0.3, x, progress=False, compression=autorank.Compression(
            families=["alds", "tucker2", "cp", "spatial_svd", "tt"]))
    yield "vbmf", 'Compression(allocator="vbmf")', \
        lambda: autorank.optimize(model, 0.3, x, progress=False, compression=autorank.Compression(allocator="vbmf"))
    if loader is not None:
        yield "finetune", "Finetune(loader, epochs=2, distill=True), steps=3, geometric", \
            lambda: autorank.optimize(model, 0.3, x, finetune=autorank.Finetune(train, epochs=2, distill=True),
                                      steps=3, retrain=autorank.Retrain(schedule="geometric"), evaluate=evaluate,
                                      progress=False)
    yield "own_loop", "finetune=my_train_fn, steps=3 (a no-op loop)", \
        lambda: autorank.optimize(model, 0.3, x, finetune=noop, steps=3, progress=False)
    yield "calibration", "calibration=batches (the default recipe)", \
        lambda: autorank.optimize(model, 0.3, x, calibration=batches, progress=False)
    yield "no_sequential", "calibration=batches, DataAware(sequential=False)", \
        lambda: autorank.optimize(model, 0.3, x, calibration=batches, data=autorank.DataAware(sequential=False),
                                  progress=False)
    yield "refine", "calibration=batches, Refine(heldout=held, n_trials=20)", \
        lambda: autorank.optimize(model, 0.3, x, calibration=batches,
                                  refine=autorank.Refine(heldout=held, n_trials=20), progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mnist_cnn", "resnet18"), default="mnist_cnn")
    p.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = _mnist() if args.model == "mnist_cnn" else _resnet18()
    print(f"model {args.model}: {autorank.count_params(data[0]):,} params, {torch.get_num_threads()} threads")
    table = {name: (what, fn) for name, what, fn in cases(*data)}
    for name in args.only or list(table):  # in the order asked for
        if name not in table:
            print(f"{name:>14}  skipped: not a case for {args.model}")
            continue
        what, fn = table[name]
        t, c = time.perf_counter(), time.process_time()
        try:
            fn()
        except ValueError as exc:  # e.g. a budget the model cannot reach
            print(f"{name:>14}  failed: {exc}", flush=True)
            continue
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(f"{name:>14}  wall {wall:8.1f} s  cpu {cpu:8.1f} s  load {os.getloadavg()[0]:5.1f}  {what}", flush=True)


if __name__ == "__main__":
    main()
