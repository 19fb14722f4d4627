"""ALDS grouped low-rank SVD (Liebenwein et al., 2021); ``groups = 1`` is plain truncated SVD.

Candidates: every ``k`` in the configured group set and every rank
``j = 1 .. min(f, c*K/k)``; cost ``j * (c*K + k*f)`` (+ bias) parameters and the
same times the number of output positions in MACs.

Errors:

* weight-only: :func:`autorank.curves.grouped_error_curves` (the guaranteed upper
  bound, exact for ``k = 1``, or the reference's lower bound);
* data-aware (a calibration moment is given): the exact
  ``||(W - W_hat) X||_F / ||W X||_F`` of the per-group whitened truncation, and the
  realised factors are the whitened ones (:mod:`autorank.calibration`);
* output-weighted (an output moment ``G`` is given too): the same after the left
  factor ``S = G^{1/2}``, ``||S (W - W_hat) X||_F / ||S W X||_F``, of the two-sided
  truncation.

Layers: ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d`` and, when the
analyser is asked to, ``nn.Embedding`` (``k = 1`` only; the lookup is free, so a
factorised table costs ``j * dim`` MACs per token against 0 for the dense one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..calibration import output_roots, whitened_error_curve, whitened_factors
from ..config import CurveConfig
from ..curves import CandidateColumns, alds_cost, divisors_upto, group_singular_values, grouped_error_curves
from ..errors import check_hyper
from ..graph import LayerInfo
from ..layers import LINEAR_KINDS, get_layer_handler
from ..modules import GroupedLowRankConv, GroupedLowRankLinear, LowRankEmbedding, grouped_low_rank_factors
from . import Family, register_family

SUPPORTED_KINDS = (*LINEAR_KINDS, "conv1d", "conv2d", "embedding")


def group_choices(info: LayerInfo, config: CurveConfig) -> list[int]:
    """Candidate numbers of input-channel groups for one layer."""
    c = info.in_channels
    if info.kind == "embedding":
        return [1]
    if config.groups is None:
        return divisors_upto(c, config.max_groups)
    return sorted({1} | {g for g in config.groups if g <= c and c % g == 0})


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None, output: torch.Tensor | None = None) -> CandidateColumns:
    w = get_layer_handler(module).weight_matrix(module)
    if moment is not None and output is not None:  # S W once for every k (S costs an f x f eigh)
        w = output_roots(output)[0] @ w.detach().to(torch.float64)
    f, c, taps = info.out_features, info.in_channels, info.taps
    bias = f if info.has_bias else 0
    ks, js, ups, lows = [], [], [], []
    sigma1 = None
    for k in sorted(group_choices(info, config)):
        if moment is not None:
            err, _ = whitened_error_curve(w, moment, k)
            upper = lower = err
            m = len(err)
        else:
            s = group_singular_values(w, k).numpy()
            if sigma1 is None:  # k = 1 comes first: its top singular value is ||W||_2
                sigma1 = float(s[0, 0]) if k == 1 else float(group_singular_values(w, 1)[0, 0])
            upper, lower = grouped_error_curves(s, sigma1)
            m = s.shape[1]
        ks.append(np.full(m, k))
        js.append(np.arange(1, m + 1))
        ups.append(upper)
        lows.append(lower)
    k = np.concatenate(ks)
    j = np.concatenate(js)
    upper, lower = np.concatenate(ups), np.concatenate(lows)
    weights = alds_cost(j, f, c, taps, k).astype(np.int64)
    if info.kind == "embedding":
        flops = j.astype(np.int64) * f * info.positions  # table lookup is free; the projection is not
    else:
        flops = weights * info.positions
    error = upper if config.error_bound == "upper" else lower
    return CandidateColumns(hyper={"groups": k, "rank": j}, error=error, error_lower=lower,
                            params=weights + bias, flops=flops)


def _factors(w: torch.Tensor, k: int, j: int, moment: torch.Tensor | None, output: torch.Tensor | None = None):
    if moment is None:
        return grouped_low_rank_factors(w, k, j)
    return whitened_factors(w, moment, k, j, output=output)


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True, output: torch.Tensor | None = None) -> nn.Module:
    """The ALDS module for ``module`` at ``hyper = {"groups": k, "rank": j}``.

    With ``init=False`` only the structure is built; with ``moment`` the factors
    are the data-aware (whitened) ones, and with ``output`` too the two-sided ones.
    """
    h = check_hyper("alds", hyper, ("groups", "rank"))
    k, j = h["groups"], h["rank"]
    handler = get_layer_handler(module)
    kind = handler.kind if handler else type(module).__name__
    if kind not in SUPPORTED_KINDS:
        raise TypeError(f"alds cannot factorise a {type(module).__name__}")
    f, c, kernel = handler.geometry(module)
    n = c * int(np.prod(kernel)) if kernel else c
    if c % k:
        raise ValueError(f"alds: groups={k} does not divide the {c} input channels of {type(module).__name__}")
    if j > min(f, n // k):
        raise ValueError(f"alds: rank={j} exceeds the largest rank {min(f, n // k)} of a {f}x{n // k} group")
    w = handler.weight_matrix(module)
    if kind == "embedding":
        if k != 1:
            raise ValueError(f"alds: an embedding is factorised with groups=1 only, got groups={k}")
        if not init:
            return LowRankEmbedding(module.num_embeddings, module.embedding_dim, j, module.padding_idx,
                                    device=w.device, dtype=w.dtype)
        a, b = _factors(w, 1, j, moment, output)
        return LowRankEmbedding.from_factors(module, a[0], b[0])
    if kind in LINEAR_KINDS:
        bias = getattr(module, "bias", None)
        if not init:
            return GroupedLowRankLinear(n, f, j, k, bias is not None, device=w.device, dtype=w.dtype)
        a, b = _factors(w, k, j, moment, output)
        return GroupedLowRankLinear.from_factors(a, b, bias, like=w)
    if init:
        return GroupedLowRankConv.from_dense(module, j, k, factors=_factors(w, k, j, moment, output))
    return GroupedLowRankConv(module.weight.dim() - 2, module.in_channels, module.out_channels,
                              module.kernel_size, j, k, module.stride, module.padding, module.dilation,
                              module.bias is not None, module.padding_mode, device=w.device, dtype=w.dtype)


def _supports(module: nn.Module, info: LayerInfo) -> bool:
    handler = get_layer_handler(module)
    return handler is not None and handler.kind in SUPPORTED_KINDS


ALDS = register_family(
    Family(
        name="alds",
        supports=_supports,
        candidates=_candidates,
        realize=lambda module, hyper, moment=None, output=None: build(module, hyper, moment, True, output),
        skeleton=lambda module, hyper: build(module, hyper, init=False),
        description="grouped low-rank SVD (ALDS); groups=1 is plain truncated SVD",
        fits_data=True,
        fits_output=True,
    )
)
