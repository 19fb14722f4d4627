"""ALDS grouped low-rank SVD (Liebenwein et al., 2021); ``groups = 1`` is plain truncated SVD.

Candidates: every ``k`` in the configured group set and every rank
``j = 1 .. min(f, c*K/k)``; error from :func:`autorank.curves.grouped_error_curves`,
cost ``j * (c*K + k*f)`` (+ bias) parameters and the same times the number of
output positions in MACs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn

from ..config import CurveConfig
from ..curves import CandidateColumns, alds_cost, divisors_upto, group_singular_values, grouped_error_curves
from ..graph import LayerInfo
from ..layers import get_layer_handler
from ..modules import GroupedLowRankConv, GroupedLowRankLinear
from . import Family, register_family


def group_choices(info: LayerInfo, config: CurveConfig) -> list[int]:
    """Candidate numbers of input-channel groups for one layer."""
    c = info.in_channels
    if config.groups is None:
        return divisors_upto(c, config.max_groups)
    return sorted({1} | {g for g in config.groups if g <= c and c % g == 0})


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig) -> CandidateColumns:
    w = get_layer_handler(module).weight_matrix(module)
    f, c, taps = info.out_features, info.in_channels, info.taps
    bias = f if info.has_bias else 0
    ks, js, ups, lows = [], [], [], []
    sigma1 = None
    for k in sorted(group_choices(info, config)):
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
    error = upper if config.error_bound == "upper" else lower
    return CandidateColumns(
        hyper={"groups": k, "rank": j},
        error=error,
        error_lower=lower,
        params=weights + bias,
        flops=weights * info.positions,
    )


def _build(module: nn.Module, hyper: dict[str, Any], init: bool) -> nn.Module:
    k, j = int(hyper["groups"]), int(hyper["rank"])
    if isinstance(module, nn.Linear):
        if init:
            return GroupedLowRankLinear.from_dense(module, j, k)
        w = module.weight
        return GroupedLowRankLinear(module.in_features, module.out_features, j, k,
                                    module.bias is not None, device=w.device, dtype=w.dtype)
    if init:
        return GroupedLowRankConv.from_dense(module, j, k)
    w = module.weight
    return GroupedLowRankConv(w.dim() - 2, module.in_channels, module.out_channels, module.kernel_size,
                              j, k, module.stride, module.padding, module.dilation,
                              module.bias is not None, module.padding_mode, device=w.device, dtype=w.dtype)


ALDS = register_family(
    Family(
        name="alds",
        supports=lambda module, info: isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)),
        candidates=_candidates,
        realize=lambda module, hyper: _build(module, hyper, init=True),
        skeleton=lambda module, hyper: _build(module, hyper, init=False),
    )
)
