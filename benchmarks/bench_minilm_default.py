"""The data-aware recipe on all-MiniLM-L6-v2, part by part: how the default was chosen.

    python benchmarks/bench_minilm_default.py [variant ...]

Calibration: 256 standard-library docstring paragraphs (the calibration half of
``autorank.apps.text.split_texts``).  Budget: keep 0.58 of the Linear parameters.  Printed per
variant: the mean cosine of the pooled embeddings to the original's on 128 *other* paragraphs of
the calibration half (``select``: what the default was chosen on) and on 256 paragraphs of
torch's docstrings (``torch``: another source, for the record), the wall time of the call
(all variants run in one process, one after the other), and the allocator that ran.  The default
calibrates and builds block by block (``autorank.stream``); ``"default, whole model"`` is the same
recipe with ``DataAware(streaming=False)``.
"""
import functools
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import autorank  # noqa: E402
from autorank.allocators.alds import alds_output_allocation  # noqa: E402
from autorank.apps.text import (  # noqa: E402
    docstring_paragraphs, embedding_agreement, encode, load_minilm, split_texts, stdlib_paragraphs, tokenize_batches)
model, tok = load_minilm()
cal_half, _ = split_texts(stdlib_paragraphs(members=True), seed=0)
cal_texts, sel_texts = cal_half[:256], cal_half[256:384]
torch_eval = random.Random(0).sample([t for t in docstring_paragraphs(["torch"]) if t not in set(cal_texts)], 256)
calib = tokenize_batches(tok, cal_texts, 32, by_length=True)
example = calib[len(calib) // 2]
graph = autorank.analyze(model, example)
linear = sum(i.dense_params for i in graph.layers.values()); total = graph.total_params
budget = (total - 0.42 * linear) / total
refs = {"select": encode(model, tok, sel_texts), "torch": encode(model, tok, torch_eval)}
texts = {"select": sel_texts, "torch": torch_eval}
D = autorank.DataAware
gauss_newton = autorank.Compression(allocator=functools.partial(alds_output_allocation, gains="gauss_newton"))
variants = {
    "input-only": {"data": D(output_weighting=False, output_allocation=False, sequential=False)},
    "ow+seq (alds)": {"data": D(output_allocation=False)},
    "ow+seq+gn": {"compression": gauss_newton},
    "default (ow+seq+probes)": {},
    "default, whole model": {"data": D(streaming=False)},
    "seq+alds_output (1-sided)": {"data": D(output_weighting=False)},
}
only = sys.argv[1:] or list(variants)
for name in only:
    t = time.perf_counter()
    res = autorank.optimize(model, budget, example, calibration=calib, **variants[name])
    sec = time.perf_counter() - t
    out = [f"{src} {embedding_agreement(refs[src], encode(res.model, tok, texts[src]))['mean_cosine']:.4f}"
           for src in ("select", "torch")]
    print(f"{name:<26} {' | '.join(out)} | {sec:.1f}s | {res.plan.config['allocator']}", flush=True)
