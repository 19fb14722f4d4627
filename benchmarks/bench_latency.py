"""Latency budgets against FLOP budgets, measured on the CPU (issue #14).

    python benchmarks/bench_latency.py [--models resnet50 resnet18 vgg11 mobilenet_v2 minilm]
                                       [--budgets 0.7 0.5 0.3] [--repeats 10] [--size 224]

Everything runs with ``torch.set_num_threads(1)``.  Models: torchvision ResNet-50 (batch 1),
ResNet-18 (batch 8), VGG-11 and MobileNetV2 (batch 1) with ``weights=None`` and a fixed seed
(no downloads), and the bundled all-MiniLM-L6-v2 (32 standard-library paragraphs, padded and
truncated to 64 tokens).  Compression is weight-only (no calibration data).

For each model and latency budget ``b`` it prints:

* ``lat ratio``: the measured latency of the ``metric="latency"`` plan over the original's,
  median of ``--repeats`` passes, original and compressed interleaved in one run, by the
  thread's CPU time (``--clock cpu``, the default: on a shared machine wall time counts the
  waits for a core that other processes hold; ``--clock wall`` for wall time) (target
  ``<= b + 0.05``), with the IQR of the per-round ratios;
* ``lat err``: the plan's largest layer error (MiniLM: the mean cosine of the pooled
  embeddings to the original's on the calibration batch);
* ``flop err``: the same for the FLOP-budget plan with the same measured latency: the most
  accurate of the FLOP plans at budgets ``--flop-grid`` (each measured the same way) that
  measures no slower than the latency plan (FLOP plans are not monotone in latency: a plan
  with fewer MACs can be slower, so no interpolation);
* ``better``: whether the latency plan is more accurate (lower error, higher cosine).

Then, under FLOP budgets (``--mac-budget``), speed-up / MAC reduction with and without the
rank multiple (``CurveConfig.rank_multiple=16``).  The first lines per model give the cost of
the error curves and of the latency table (with how many candidates were timed, read from the
cache and interpolated); the table cache is ``--cache`` (default: a fresh temporary folder, so
the cost is the cold one).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autorank import CompressStep, Settings  # noqa: E402
from autorank.config import Compression, CurveConfig, LatencyConfig  # noqa: E402
from autorank.latency import time_callables  # noqa: E402
from autorank.nested import run_model  # noqa: E402

CLOCK = "cpu"
BATCH = {"resnet50": 1, "resnet18": 8, "vgg11": 1, "mobilenet_v2": 1}


def load(name: str, size: int):
    torch.manual_seed(0)
    if name == "minilm":
        from autorank.apps.text import load_minilm, stdlib_paragraphs

        model, tok = load_minilm()
        texts = stdlib_paragraphs()[:32]
        batch = dict(tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))
        return model.eval(), batch
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    return model, torch.randn(BATCH[name], 3, size, size)


def pooled(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def interleaved_ratio(a, b, x, repeats: int) -> tuple[float, float]:
    """Median of b's times over median of a's (interleaved rounds), and the IQR of the per-round ratios."""
    t = time_callables([lambda: run_model(a, x), lambda: run_model(b, x)], repeats, 2, threads=1, clock=CLOCK)
    r = t[1] / t[0]
    q25, q75 = np.percentile(r, [25, 75])
    return float(np.median(t[1]) / np.median(t[0])), float(q75 - q25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "vgg11", "mobilenet_v2", "minilm"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--flop-grid", nargs="+", type=float, default=[0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.12])
    ap.add_argument("--mac-budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=224, help="image side for the CNNs")
    ap.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                    help="cpu: the thread's CPU time (not moved by other processes on a shared machine)")
    ap.add_argument("--cache", default=None, help="latency table cache (default: a fresh temporary folder)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(1)
    cache = args.cache or tempfile.mkdtemp(prefix="autorank-latency-")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, 1 thread, clock {args.clock}, "
          f"load average {os.getloadavg()[0]:.1f}; cache {cache}", flush=True)
    rows = []
    for name in args.models:
        model, x = load(name, args.size)
        ref = pooled(model, x) if name == "minilm" else None

        def quality(m, plan):
            if ref is None:
                return plan.max_error
            return float((pooled(m, x) * ref).sum(-1).mean())

        higher_better = ref is not None
        lat_cfg = LatencyConfig(cache=cache, clock=args.clock)
        lat_step = CompressStep(x, Settings("latency", Compression(latency=lat_cfg)), progress=False)
        flop_step = CompressStep(x, Settings("flops"), progress=False)
        t = time.perf_counter()
        prep_l = lat_step.prepare(copy.deepcopy(model))
        t_lat = time.perf_counter() - t
        t = time.perf_counter()
        prep_f = flop_step.prepare(copy.deepcopy(model))
        t_f = time.perf_counter() - t
        info = prep_l.latency
        print(f"\n{name}: curves {prep_f.timings['curves']:.1f}s (flops prepare {t_f:.1f}s); latency prepare "
              f"{t_lat:.1f}s of which latency table {prep_l.timings['latency']:.1f}s ({info['timed']} timed, "
              f"{info['cached']} cached, {info['interpolated']} interpolated); whole model "
              f"{info['whole_min_s'] * 1e3:.2f} ms (best), rest {info['rest_s'] * 1e3:.2f} ms + dense layers "
              f"{info['layers_s'] * 1e3:.2f} ms = {info['predicted_s'] * 1e3:.2f} ms", flush=True)
        def measured(step, budget, prepared, label):
            """The plan at ``budget``, its interleaved latency ratio and spread and its quality; None if infeasible."""
            try:
                res = step(copy.deepcopy(model), budget, prepared=prepared)
            except ValueError as exc:
                print(f"  {label} {budget}: {exc}")
                return None
            ratio, iqr = interleaved_ratio(model, res.model, x, args.repeats)
            return res, ratio, iqr, quality(res.model, res.plan)

        flop_pts = []
        for fb in args.flop_grid:
            got = measured(flop_step, fb, prep_f, "flops")
            if got is None:
                continue
            res, ratio, _, q = got
            flop_pts.append((ratio, q))
            print(f"  flops budget {fb:.2f}: MACs {res.plan.totals['flops'] / res.plan.totals['flops_before']:.3f}, "
                  f"measured latency {ratio:.3f}, {'cosine' if higher_better else 'max err'} {q:.4f}", flush=True)
        for b in args.budgets:
            got = measured(lat_step, b, prep_l, "latency")
            if got is None:
                continue
            res, ratio, iqr, q = got
            # the most accurate FLOP plan of the grid that measures no slower than the latency plan
            fast = [p[1] for p in flop_pts if p[0] <= ratio]
            if not fast:
                print(f"  latency budget {b:.2f}: lat ratio {ratio:.3f}; no FLOP plan of the grid is as fast")
                continue
            fq = max(fast) if higher_better else min(fast)
            better = q > fq if higher_better else q < fq
            same = abs(q - fq) <= 1e-9
            rows.append((name, b, ratio, iqr, q, fq, better, same))
            print(f"  latency budget {b:.2f}: lat ratio {ratio:.3f} (IQR {iqr:.3f}, target <= {b + 0.05:.2f}: "
                  f"{'met' if ratio <= b + 0.05 else 'NOT met'}), predicted "
                  f"{res.plan.totals['latency_predicted'] / res.plan.totals['latency_before']:.3f}"
                  + (f" after {res.plan.totals['latency_corrections']} re-plan(s) at "
                     f"{res.plan.totals['latency_target']:.3f}" if res.plan.totals.get("latency_corrections") else "")
                  + f", lat {'cos' if higher_better else 'err'} {q:.4f}, flop {'cos' if higher_better else 'err'} "
                  f"{fq:.4f} -> {'latency plan better' if better else 'equal' if same else 'FLOP plan better'}",
                  flush=True)
        if name in ("resnet50", "resnet18"):
            for m in (1, 16):
                step = CompressStep(x, Settings("flops", Compression(curves=CurveConfig(rank_multiple=m))),
                                    progress=False)
                res = step(copy.deepcopy(model), args.mac_budget)
                ratio, iqr = interleaved_ratio(model, res.model, x, args.repeats)
                mac_red = res.plan.totals["flops_before"] / res.plan.totals["flops"]
                print(f"  flops {args.mac_budget} rank_multiple={m}: MAC reduction {mac_red:.2f}x, speed-up "
                      f"{1 / ratio:.2f}x (IQR of ratio {iqr:.3f}), speed-up / MAC reduction "
                      f"{1 / ratio / mac_red:.2f} (target >= 0.8 with the multiple)", flush=True)
    if rows:
        n = len(rows)
        better = sum(r[6] for r in rows)
        worse = sum(not r[6] and not r[7] for r in rows)
        print(f"\nlatency plan more accurate on {better}/{n} rows, less accurate on {worse}/{n}; "
              f"latency target met on {sum(r[2] <= r[1] + 0.05 for r in rows)}/{n}")


if __name__ == "__main__":
    main()
