r"""ASVD (Yuan et al., 2023) for the decoder-LM benchmark, from its formulas, on autorank's pieces.

Activation-aware SVD.  Per ``f x n`` weight ``W`` with calibration inputs ``x``:

.. math::

    S = \mathrm{diag}(\overline{|x|})^{\alpha}, \qquad \hat W = [W S]_r \, S^{-1}
      = \underbrace{U_r \Sigma_r^{1/2}}_{B} \; \underbrace{\Sigma_r^{1/2} V_r^\top S^{-1}}_{A},

``alpha = 0.5``, ``[.]_r`` the rank-``r`` truncated SVD and ``mean|x|`` the mean absolute input
per channel over the real (unpadded) tokens (:func:`input_abs_means`).  Unlike the whitened
truncation (SVD-LLM, autorank's data-aware curves) the diagonal scale is a heuristic: it does
not minimise ``||(W - W_hat) X||``.

Ranks: the sensitivity table (:func:`asvd_sensitivity`) holds a score -- the calibration
perplexity -- with each layer alone factorised at each parameter ratio ``rho`` of a grid (rank
:func:`autorank.allocators.llm.svd_llm_rank`); :func:`threshold_ranks` then does ASVD's one binary
search over the sorted table: for a threshold ``tau`` each layer takes its smallest ratio scoring
``<= tau`` (dense if none), and ``tau`` is the smallest table value whose ranks meet the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..allocators.llm import svd_llm_rank
from ..families.alds import GroupedLowRankLinear
from ..graph import replace_module
from ..nested import to_device

__all__ = ["ASVD_ALPHA", "ASVD_RATIOS", "input_abs_means", "asvd_factors", "asvd_linear", "asvd_sensitivity",
           "threshold_ranks", "asvd_compress"]

ASVD_ALPHA = 0.5
ASVD_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def input_abs_means(model: nn.Module, names: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """``{name: mean |x|}`` per input channel of each ``nn.Linear`` ``name``, over the real tokens (float64)."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            mask = state["mask"]
            rows = x[mask.to(x.device)] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            s = rows.abs().double().sum(0)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] += rows.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        model.eval()
        for b in batches:
            m = b.get("attention_mask")
            state["mask"] = None if m is None else m.bool()
            model(**to_device(dict(b), device))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}")
    return {n: sums[n] / counts[n] for n in names}


@torch.no_grad()
def asvd_factors(weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, alpha: float = ASVD_ALPHA
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``, ``A`` ``(rank, n)`` and ``B`` ``(f, rank)`` float64, with ``B A = [W S]_r S^{-1}``, ``S = diag(abs_mean)^alpha``.

    Channels whose mean is zero (never excited) get the smallest positive scale of the layer, so
    ``S`` is invertible.
    """
    w = weight.detach().to(torch.float64)
    f, n = w.shape
    if abs_mean.shape != (n,):
        raise ValueError(f"abs_mean of shape {tuple(abs_mean.shape)} does not match a weight with {n} columns")
    if not 1 <= rank <= min(f, n):
        raise ValueError(f"rank must be in [1, {min(f, n)}], got {rank}")
    s = abs_mean.to(torch.float64).clamp_min(0) ** alpha
    positive = s[s > 0]
    s = s.clamp_min(float(positive.min()) if positive.numel() else 1.0)
    u, sig, vh = torch.linalg.svd(w * s, full_matrices=False)
    root = sig[:rank].sqrt()
    return (root[:, None] * vh[:rank]) / s, u[:, :rank] * root


def asvd_linear(layer: nn.Linear, abs_mean: torch.Tensor, rank: int, alpha: float = ASVD_ALPHA) -> GroupedLowRankLinear:
    """``layer`` as a rank-``rank`` :class:`~autorank.families.alds.GroupedLowRankLinear` with :func:`asvd_factors`."""
    a, b = asvd_factors(layer.weight, abs_mean, rank, alpha)
    return GroupedLowRankLinear.from_factors(a[None], b[None], layer.bias, like=layer.weight)


def _rank_at(layer: nn.Linear, ratio: float) -> int | None:
    f, n = layer.weight.shape
    r = min(svd_llm_rank(ratio, f, n), f, n)
    return r if r * (f + n) < f * n else None  # not cheaper than dense: not a candidate


def asvd_sensitivity(model: nn.Module, names: Sequence[str], abs_means: Mapping[str, torch.Tensor],
                     score: Callable[[nn.Module], float], ratios: Sequence[float] = ASVD_RATIOS,
                     alpha: float = ASVD_ALPHA) -> dict[str, list[tuple[int, float]]]:
    """``{layer: [(rank, score), ...]}``: ``score(model)`` with that layer alone factorised by ASVD at each ratio.

    ``model`` is modified while scoring and restored before returning.  Lower scores are better
    (perplexity); a non-finite score counts as the worst.
    """
    table: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        old = model.get_submodule(name)
        rows = []
        for ratio in sorted(set(ratios)):
            r = _rank_at(old, ratio)
            if r is None or any(r == q for q, _ in rows):
                continue
            replace_module(model, name, asvd_linear(old, abs_means[name], r, alpha))
            try:
                q = float(score(model))
            finally:
                replace_module(model, name, old)
            rows.append((r, q if math.isfinite(q) else math.inf))
        table[name] = rows
    return table


def threshold_ranks(table: Mapping[str, Sequence[tuple[int, float]]], sizes: Mapping[str, tuple[int, int]],
                    room: float) -> dict[str, int | None]:
    """ASVD's binary search: ``{layer: rank, or None for dense}`` at the smallest threshold that fits ``room``.

    For a threshold ``tau`` a layer takes the smallest rank whose score is ``<= tau`` (dense if
    none); its cost is ``rank (f + n)``, dense ``f n`` (``sizes[layer] = (f, n)``).  The cost falls
    as ``tau`` grows, so one bisection over the sorted distinct scores finds the smallest ``tau``
    whose total cost is ``<= room``.  ``ValueError`` if even the largest does not fit.
    """
    def pick(tau: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name, rows in table.items():
            ok = [r for r, q in rows if q <= tau]
            out[name] = min(ok) if ok else None
        return out

    def cost(p: Mapping[str, int | None]) -> float:
        return sum(f * n if p[name] is None else p[name] * (f + n) for name, (f, n) in sizes.items())

    values = sorted({q for rows in table.values() for _, q in rows})
    if not values or cost(pick(values[-1])) > room:
        raise ValueError(f"ASVD: the cheapest ranks of the table cost more than the room {room:.0f}")
    lo, hi = 0, len(values) - 1  # the answer is values[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(pick(values[mid])) <= room:
            hi = mid
        else:
            lo = mid + 1
    return pick(values[hi])


def asvd_compress(model: nn.Module, ranks: Mapping[str, int | None], abs_means: Mapping[str, torch.Tensor],
                  alpha: float = ASVD_ALPHA) -> nn.Module:
    """``model`` (in place) with each layer of ``ranks`` that has a rank factorised by ASVD."""
    for name, r in ranks.items():
        if r is not None:
            replace_module(model, name, asvd_linear(model.get_submodule(name), abs_means[name], r, alpha))
    return model
