"""Peak memory and time of one tall layer's data-aware curves and refit (an LM head, 32000 x 2048).

    python benchmarks/bench_tall_layer.py [--rows 32000] [--cols 2048]

A random ``nn.Linear(cols, rows)`` with a moment from 1024 Gaussian rows: the ALDS curves
(``build_layer_curves``, groups up to 8) and one refit (``refit_layer`` at the middle candidate).
The resident set size is sampled every 10 ms; printed: the time and the peak growth of each,
against the bytes of the weight in float64.  Tall layers (``rows > cols / k``) are computed in
input space from ``W^T W`` (docs/data_aware.md section 4).
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from torch import nn

from autorank.config import CurveConfig
from autorank.curves import build_layer_curves
from autorank.graph import analyze
from autorank.sequential import CrossMoments, refit_layer


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=2048)
    args = ap.parse_args()
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    f, n = args.rows, args.cols
    lin = nn.Linear(n, f, bias=False)
    x = torch.randn(1024, n, dtype=torch.float64)
    moment = x.T @ x / 1024
    info = analyze(nn.Sequential(lin), torch.randn(1, n)).layers["0"]
    w64 = f * n * 8 / 2 ** 20

    def measured(label: str, fn):
        time.sleep(0.1)
        base = rss()
        peak[0] = base
        t = time.perf_counter()
        out = fn()
        print(f"{label}: {time.perf_counter() - t:.1f}s, peak RSS growth {(peak[0] - base) / 2 ** 20:.0f} MiB "
              f"(the weight in float64: {w64:.0f} MiB)", flush=True)
        return out

    curves = measured("curves", lambda: build_layer_curves(lin, info, CurveConfig(max_groups=8), "params", moment))
    cross = CrossMoments(n)
    cross.update(x.float(), x.float() + 0.01 * torch.randn(x.shape))
    cand = curves.candidate(len(curves.family) // 2)
    measured(f"refit at {cand['hyper']}", lambda: refit_layer(lin, None, cand["family"], cand["hyper"], cross))


if __name__ == "__main__":
    main()
