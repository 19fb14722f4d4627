r"""Evaluation-driven allocators: rules that score the model with one layer compressed at a time.

* ``"sensitivity"`` (AIMET-style greedy selection) -- a score per layer and rank ratio,
  each layer compressed alone (:func:`sensitivity_table`); one score threshold ``t``,
  every layer takes its cheapest ratio scoring ``>= t`` (dense if none); ``t`` is the
  largest threshold that fits.

:func:`output_gains` measures, with the same table, how much each layer's error moves
the model's output (used by ``"alds_output"``, :mod:`autorank.allocators.alds`).  The
table's on-disk cache and its fingerprint are in :mod:`autorank.allocators.cache`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..families import get_family, output_kwargs
from ..families.alds import shared_bases
from ..graph import replace_module
from ..nested import flat_output, run_model, tensors
from ..progress import track
from .base import AllocationContext, register_allocator
from .cache import (SENSITIVITY_VERSION, check_cache_path, load_table, model_fingerprint,
                    save_table, tensor_digest)
from .ranks import RankTable, bisect_sorted, check_floor, picked_indices, rank_tables, total_cost

__all__ = ["DEFAULT_RATIOS", "SENSITIVITY_CACHE_KEY", "check_ratios", "ratio_rank", "fidelity_score",
           "sensitivity_table", "sensitivity_allocation", "output_gains"]

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: where :func:`sensitivity_table` keeps its tables in ``ctx.cache``
SENSITIVITY_CACHE_KEY = "autorank.baselines.sensitivity"  # the value predates the move to autorank.allocators


def check_ratios(ratios: Any) -> tuple[float, ...]:
    """``ratios`` as sorted distinct floats in ``(0, 1]``; ``TypeError``/``ValueError`` naming a bad one."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"sensitivity: ratios must be a sequence of floats in (0, 1], got {ratios!r}")
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)):
            raise TypeError(f"sensitivity: every ratio must be a number, got {r!r}")
        if not (0.0 < float(r) <= 1.0):
            raise ValueError(f"sensitivity: every ratio must be in (0, 1], got {r!r}")
        out.append(float(r))
    if not out:
        raise ValueError("sensitivity: ratios must hold at least one rank ratio")
    return tuple(sorted(set(out)))


def ratio_rank(ratio: float, full: int) -> int:
    """``clip(floor(ratio * full), 1, full)``: the rank at ``ratio`` of the full rank."""
    return max(1, min(full, int(math.floor(ratio * full + 1e-9))))


@torch.no_grad()
def fidelity_score(model: nn.Module, example_inputs: Any, reference: torch.Tensor) -> float:
    """``1 - ||y_hat - y|| / ||y||``: how well ``model``'s output on ``example_inputs`` matches ``reference``.

    ``y`` is the dense model's output (all floating tensors of it, flattened); 1 is a
    perfect match, and the score falls as the output drifts.
    """
    y_hat = flat_output(run_model(model, example_inputs))
    if y_hat.shape != reference.shape:
        raise ValueError(f"output of {y_hat.numel()} values does not match the reference's {reference.numel()}")
    scale = float(reference.norm())
    return 1.0 - float((y_hat - reference).norm()) / (scale if scale > 0 else 1.0)


def _scorer_key(ctx: AllocationContext) -> list[str]:
    """What identifies the scorer in the fingerprint: the ``evaluate`` name, or a digest of the inputs."""
    if ctx.evaluate is not None:
        return ["evaluate", getattr(ctx.evaluate, "__qualname__", type(ctx.evaluate).__name__)]
    h = hashlib.blake2b(digest_size=16)
    for t in tensors(ctx.example_inputs, sort_keys=True):
        tensor_digest(t, h)
    return ["fidelity", h.hexdigest()]


def _moment_digests(ctx: AllocationContext, names: Sequence[str]) -> dict[str, Any]:
    """Digests of the layers' calibration moments (output moments under ``"<output>"``)."""
    moments = {n: tensor_digest(m).hexdigest() for n in names if (m := ctx.input_moment(n)) is not None}
    outputs = {n: tensor_digest(g).hexdigest() for n in names if (g := ctx.output_moment(n)) is not None}
    if outputs:
        moments["<output>"] = outputs
    return moments


def _scorer(ctx: AllocationContext, work: nn.Module) -> Callable[[nn.Module], float]:
    """``ctx.evaluate``, or :func:`fidelity_score` against ``work``'s output now (``work`` put in eval mode)."""
    if ctx.evaluate is not None:
        return ctx.evaluate
    work.eval()
    with torch.no_grad():
        reference = flat_output(run_model(work, ctx.example_inputs))

    def score(m: nn.Module) -> float:
        return fidelity_score(m, ctx.example_inputs, reference)

    return score


def _score_layers(ctx: AllocationContext, tables: Mapping[str, RankTable],
                  ratios: Sequence[float]) -> dict[str, list[list[float]]]:
    """``{layer: [[rank, score], ...]}``: one deep copy of the model scored with one layer at a time truncated."""
    work = copy.deepcopy(ctx.dense_model())
    # the fidelity score runs the example inputs: the blocks before the changed layer can replay
    # (the reference run too goes through ``replay``, so that both run with the same settings)
    skip = ctx.replay if ctx.evaluate is None and ctx.replay is not None else (lambda m, n: contextlib.nullcontext())
    with skip(work, None):
        score = _scorer(ctx, work)
    alds = get_family("alds")
    scores: dict[str, list[list[float]]] = {}
    for name, t in track(tables.items(), "allocator probes", total=len(tables), unit="layer",
                         note=lambda item: item[0]):
        old = work.get_submodule(name)
        wanted = sorted({1} | {ratio_rank(r, t.full) for r in ratios})
        rows = []
        moment, extra = ctx.input_moment(name), output_kwargs(alds, ctx.output_moment(name))
        with shared_bases():  # the ranks of this layer share one whitened eigendecomposition
            for j in wanted:
                if not t.index[j]:
                    continue  # not cheaper than dense: taken as dense
                new = alds.realize(old, {"groups": 1, "rank": int(j)}, moment, **extra)
                new.train(old.training)
                replace_module(work, name, new)
                try:
                    with skip(work, name):
                        q = float(score(work))
                finally:
                    replace_module(work, name, old)
                rows.append([int(j), q if math.isfinite(q) else -math.inf])  # NaN scores count as the worst
        scores[name] = rows
    return scores


def sensitivity_table(
    ctx: AllocationContext,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    cache_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score every (layer, rank ratio), each layer compressed alone; cached.

    For each layer with plain-SVD candidates and each distinct rank
    ``j = max(1, floor(ratio * m))`` (rank 1 is always scored too, so every budget that
    all-rank-1 meets stays reachable) whose candidate exists, that one layer of ONE deep
    copy of the model is swapped for its truncated SVD (whitened with the layer's
    calibration moment when there is one, as ``optimize`` realises it), the copy is
    scored, and the dense layer is swapped back.  The score is ``ctx.evaluate(model)``
    (higher is better) or, without it, :func:`fidelity_score` on ``ctx.example_inputs``
    (the copy in eval mode); a NaN or infinite score counts as the worst, ``-inf``.

    The table is kept in ``ctx.cache`` and, with ``cache_path``, in a JSON file, both
    under a fingerprint of the model's weights, the layers, the ratios, the calibration
    moments and the scorer (a different ``evaluate`` function of the same name is not
    detected: delete the file).  A file with another fingerprint is recomputed and
    overwritten.  Returns ``{"version", "fingerprint", "ratios", "scores": {layer:
    [[rank, score], ...]}}`` (ranks ascending).
    """
    ratios = check_ratios(ratios)
    path = check_cache_path(cache_path)
    model = ctx.dense_model()
    tables, _ = rank_tables(ctx)
    if ctx.evaluate is None and ctx.example_inputs is None:
        raise ValueError("allocator 'sensitivity' needs evaluate=... or example inputs to score the model")
    fingerprint = model_fingerprint(model, "sensitivity", SENSITIVITY_VERSION, list(ratios), sorted(tables),
                                    _moment_digests(ctx, sorted(tables)), _scorer_key(ctx))
    store = ctx.cache.setdefault(SENSITIVITY_CACHE_KEY, {})
    if fingerprint in store:
        return store[fingerprint]
    table = load_table(path, fingerprint) if path is not None else None
    if table is None:
        table = {"version": SENSITIVITY_VERSION, "fingerprint": fingerprint, "ratios": list(ratios),
                 "scores": _score_layers(ctx, tables, ratios)}
        if path is not None:
            save_table(path, table)
    store[fingerprint] = table
    return table


def sensitivity_allocation(ctx: AllocationContext, *, ratios: Sequence[float] = DEFAULT_RATIOS,
                           cache_path: str | os.PathLike | None = None) -> dict[str, int]:
    r"""Greedy per-layer sensitivity (AIMET style): one common score threshold.

    With the table of :func:`sensitivity_table` (score ``q_l(j)`` of the model with only
    layer ``l`` at rank ``j``), a threshold ``t`` gives every layer its cheapest scored rank
    with ``q_l(j) >= t``, or dense if none; total cost does not decrease with ``t``, and the
    largest ``t`` that fits is found exactly by bisection over the scores.

    Options (pass them with ``functools.partial``): ``ratios`` -- rank fractions of each
    layer's full rank to score (default 0.1 .. 0.9); ``cache_path`` -- a JSON file that keeps
    the table between runs (validated by the model's fingerprint).
    """
    ratios = check_ratios(ratios)
    check_cache_path(cache_path)
    tables, dense = rank_tables(ctx)
    check_floor(ctx, tables, dense)
    table = sensitivity_table(ctx, ratios, cache_path)
    rows = {n: (np.array([r[0] for r in table["scores"].get(n, [])], np.int64),
                np.array([r[1] for r in table["scores"].get(n, [])], np.float64)) for n in tables}

    def ranks(th: float) -> dict[str, int]:
        out = {}
        for n, (js, qs) in rows.items():
            ok = np.nonzero(qs >= th)[0]
            out[n] = int(js[ok[0]]) if len(ok) else 0  # ranks ascending: the first is the cheapest
        return out

    values = np.concatenate([[-np.inf], *(qs for _, qs in rows.values())])
    th = bisect_sorted(lambda th: total_cost(tables, ranks(th), dense), ctx.room, values, increasing=True)
    return picked_indices(ctx, tables, ranks(th))


def output_gains(ctx: AllocationContext, probes: Sequence[float] = (0.25, 0.5),
                 cache_path: str | os.PathLike | None = None) -> dict[str, float]:
    r"""Measured output gain ``g_l`` of every layer: output error per unit of layer error.

    For each layer, at the plain-SVD ranks ``j = floor(p * m)`` of ``probes``, the model
    with only that layer compressed is scored (the :func:`sensitivity_table` machinery,
    so it is cached the same way), and

        g_l = median_j  (q_0 - q_l(j)) / eps_l(j),

    where ``q`` is ``ctx.evaluate`` (``q_0`` of the dense model) or the output fidelity
    ``1 - ||y_hat - y|| / ||y||`` (``q_0 = 1``), and ``eps_l(j)`` is the layer's own error
    from its curves.  A layer whose probes change nothing gets ``g_l = 0``.
    """
    table = sensitivity_table(ctx, probes, cache_path)
    if ctx.evaluate is not None:
        base = float(ctx.evaluate(ctx.dense_model()))
    else:
        base = 1.0
    gains = {}
    for name, lc in ctx.curves.items():
        ratios = []
        for j, q in table["scores"].get(name, []):
            idx = lc.find("alds", groups=1, rank=int(j))
            eps = float(lc.error[idx]) if idx is not None else 0.0
            if eps > 1e-12 and math.isfinite(q):
                ratios.append(max(base - q, 0.0) / eps)
        gains[name] = float(np.median(ratios)) if ratios else 0.0
    return gains


register_allocator("sensitivity", sensitivity_allocation)
