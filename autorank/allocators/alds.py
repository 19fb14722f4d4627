r"""ALDS allocators: the exact global step over every candidate of every enabled family.

* ``"alds"`` (default): :func:`autorank.allocators.solve_curves` on the curves as they are.
* ``"alds_output"``: the same step on output-weighted errors ``(g_l eps_l)^power``, with
  ``g_l`` each layer's output gain, measured by probe evaluations
  (:func:`autorank.allocators.output_gains`), or with ``gains="gauss_newton"`` taken from
  the Gauss-Newton output moments (:func:`gauss_newton_gain`, no extra pass).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ..config import SolverConfig
from ..layers import get_layer_handler
from .base import AllocationContext, register_allocator, solve_curves
from .evaluated import check_ratios, output_gains

__all__ = ["alds_allocation", "alds_output_allocation", "output_weighted_error", "gauss_newton_gain",
           "gauss_newton_gains", "GAIN_SOURCES"]

GAIN_SOURCES = ("auto", "gauss_newton", "probes")

log = logging.getLogger(__name__)


def alds_allocation(ctx: AllocationContext) -> dict[str, int]:
    """The exact ALDS global step over every candidate of every enabled family."""
    return solve_curves(ctx.curves, ctx.budget, ctx.metric, ctx.total, ctx.fixed, ctx.solver)


def output_weighted_error(error: np.ndarray, gain: float, power: float) -> np.ndarray:
    """``(g * eps)^power``: a layer's errors ``eps`` as the error they cause at the model's output."""
    return (gain * error) ** float(power)


@torch.no_grad()
def gauss_newton_gain(weight: torch.Tensor, moment: torch.Tensor, output_sum: torch.Tensor) -> float:
    r"""``g = sqrt(tr(W M W^T G))``: the output error a layer carries, to first order.

    ``W`` is the ``f x n`` weight matrix, ``M = E[x x^T]`` the input moment per row (``n x n``,
    or its diagonal ``(n,)``), and ``G = sum_p g_p g_p^T`` the *sum* over every output position
    ``p`` of the calibration data of the probed output gradients, so ``E_r[G] = sum_p J_p^T J_p``
    (:func:`autorank.calibration.collect_output_moments`).  A layer error ``R = W - W_hat``
    then moves the model's output by ``E ||sum_p J_p R x_p||^2 ~= tr(R M R^T G)`` (inputs and
    Jacobians independent, as in K-FAC), and a relative error ``eps = ||R||/||W||`` in the
    measure the curves use moves it by about ``eps^2 tr(W M W^T G) = (g eps)^2``.
    """
    w = weight.detach().to(torch.float64)
    m = moment.to(torch.float64)
    wm = w * m if m.dim() == 1 else w @ m
    return float(((output_sum.to(torch.float64) @ w) * wm).sum().clamp_min(0.0).sqrt())


def gauss_newton_gains(ctx: AllocationContext) -> dict[str, float] | None:
    """:func:`gauss_newton_gain` of every layer, or None when the context cannot give them all.

    A layer that has an input moment but no output moment, once the output moments were
    collected, is one the measured output does not depend on (BERT's pooler under
    ``last_hidden_state``): its gain is 0.  Embedding tables have no output moment
    (:func:`autorank.calibration.collect_output_moments` skips them), so a context with one
    gives None, as does a context without calibration moments.
    """
    moments, outputs = ctx.moments or {}, ctx.outputs
    if not ctx.curves or outputs is None or any(n not in moments for n in ctx.curves):
        return None
    if any(lc.info.kind == "embedding" for lc in ctx.curves.values()):
        return None
    model = ctx.dense_model()
    gains = {}
    for name in ctx.curves:
        if name not in outputs:
            gains[name] = 0.0
            continue
        module = model.get_submodule(name)
        gains[name] = gauss_newton_gain(get_layer_handler(module).weight_matrix(module), moments[name].matrix,
                                        outputs[name].sum)
    return gains


def alds_output_allocation(
    ctx: AllocationContext,
    *,
    probes: Sequence[float] = (0.25, 0.5),
    cache_path: str | os.PathLike | None = None,
    power: float = 2.0,
    gains: str = "auto",
) -> dict[str, int]:
    r"""ALDS on output-weighted errors: the exact global step over ``(g_l eps_l)^power``.

    Each layer's error curve (every candidate of every enabled family, weight-only or
    data-aware) is scaled by its output gain ``g_l``, so ``g_l eps_l`` predicts the error
    the layer causes at the model's output (to first order).  Errors from different layers
    add roughly in quadrature, so the solver minimises
    ``sum_l log(1 + (g_l eps_l)^2) ~= sum_l (g_l eps_l)^2`` (the sum objective) under the
    budget (``power=2``; ``power=1`` assumes the errors add coherently).

    ``gains``: ``"probes"`` measures ``g_l``, one evaluation per layer and probe
    (:func:`output_gains`, with ``ctx.evaluate`` if given, else the model's own output on
    the example inputs); ``"gauss_newton"`` takes it from the calibration moments
    (:func:`gauss_newton_gain`; free once the output moments are collected, but first-order:
    on all-MiniLM-L6-v2 it allocated far worse than the probes, see docs/data_aware.md);
    ``"auto"`` (default) is ``"probes"``.
    """
    probes = check_ratios(probes)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.25 <= float(power) <= 8:
        raise ValueError(f"alds_output: power must be a number in [0.25, 8], got {power!r}")
    if gains not in GAIN_SOURCES:
        raise ValueError(f"alds_output: gains must be one of {GAIN_SOURCES}, got {gains!r}")
    found = None
    if gains == "gauss_newton":
        found = gauss_newton_gains(ctx)
        if found is None:
            raise ValueError("alds_output: gains='gauss_newton' needs the input and output moments of every layer: "
                             "pass calibration=... with the output weighting on (the output moments are collected for it)")
    measured = found if found is not None else output_gains(ctx, probes, cache_path)
    scaled = {n: replace(lc, error=output_weighted_error(lc.error, measured[n], power))
              for n, lc in ctx.curves.items()}
    solver = SolverConfig(objective="sum", method=ctx.solver.method if ctx.solver.objective == "sum" else "auto",
                          dp_bins=ctx.solver.dp_bins)
    log.info("alds_output: %s gains %s", "Gauss-Newton" if found is not None else "measured",
             {n: round(g, 3) for n, g in measured.items()})
    return solve_curves(scaled, ctx.budget, ctx.metric, ctx.total, ctx.fixed, solver)


register_allocator("alds", alds_allocation)
register_allocator("alds_output", alds_output_allocation)
