r"""Adaptive mixture of low-rank factorisations, ALRF (Chen et al., ICLR 2019 submission).

**Layer.**  ``y = U (pi(h) * (V^T h)) + b`` with ``U`` (``f x d``), ``V`` (``n x d``) and
``d = K`` rank-one mixtures whose unnormalised mixing weights are

    pi(h) = sigmoid(P pool(h) + c)            (one weight per mixture, per input row).

Variants (hyperparameter ``variant``):

* ``0`` "all" (MIX-ALL-PJ): ``pool`` is the identity, ``P`` is ``d x n``;
* ``1`` "pool" (MIX-POOL-PJ): segment-mean pooling of ``h`` to ``pool`` segments
  (``adaptive_avg_pool1d``; 784 -> 28 on MNIST), ``P`` is ``d x pool``;
* ``2`` "rnd" (MIX-RND-PJ): a fixed random ``P`` (``d x n``, entries ``N(0, 1/n)``),
  regenerated from the hyperparameter ``seed`` into a non-persistent buffer (only the
  seed is stored), no ``c``, no trainable gate parameters.

For a 1x1 ``nn.Conv2d`` (stride 1, no padding, ``groups=1``), ``h`` is first averaged
over ``H x W`` (global average pooling), so the gate is per sample and mixture, and
``V^T``, ``U`` are 1x1 convolutions.

**Initialisation.**  ``U, V`` from the rank-``d`` truncated SVD ``W ~= B A`` (the
whitened one when a calibration moment is given, as for ALDS), ``V^T = A``,
``U = 2 B``, and ``P = 0, c = 0``: the gate is exactly ``1/2`` for every input, so
"all" and "pool" equal plain truncated SVD before fine-tuning (their error is that
of the SVD; ``needs_finetune``: they are worth their extra cost only after training).
"rnd" also uses ``U = 2 B`` (``1/2`` is the mean gate over the symmetric random ``P``),
but its gate varies with the input, so no weight-only or second-moment error
describes it: **"rnd" has no candidates**; it is built from explicit hyperparameters
(an edited plan, or :func:`build`), and its ``to_dense`` at init is the plain SVD.

**to_dense** (what the cascade scheduler densifies and re-factorises).  An
input-dependent gate has no exact dense equivalent.  The module keeps a running
mean ``mu`` of the gate input ``pool(h)`` (updated in training mode, momentum 0.1,
starting at 0) and ``to_dense`` is the linear layer with the gate frozen at its value
at that mean input, ``W = U diag(sigmoid(P mu + c)) V^T``.  Guarantee: exact whenever
``P = 0`` (any ``c``, ``U``, ``V``), so in particular at initialisation for "all" and
"pool"; after training it is a first-order approximation.

**Cost.**  Parameters ``d (n + f)`` (+ ``f`` bias) plus the gate: ``d n + d`` (all),
``d pool + d`` (pool), 0 (rnd).  MACs, as :func:`autorank.count_flops` measures them
(matrix products only; pooling, the sigmoid and the gating product are free):
``d (n + f)`` per row plus ``d n`` (all, rnd) or ``d pool`` (pool) per gate
evaluation, i.e. per row for a Linear and per sample for the convolution
(``samples = positions / (H W)`` of the analysed output).

Options (``CurveConfig(options={"alrf": {...}})``): ``variant`` (str, ``"pool"``;
``"all"`` or ``"pool"``), ``pool_size`` (int, 0 = ``round(sqrt(n))``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CurveConfig
from ..graph import LayerInfo
from ..layers import LINEAR_KINDS, get_layer_handler
from ..linalg import grouped_low_rank_factors, whitened_factors
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from .base import CandidateColumns, Family, family_options, register_family

__all__ = ["VARIANTS", "alrf_cost", "default_pool", "random_projection", "ALRFLinear", "ALRFConv2d", "build"]

VARIANTS = ("all", "pool", "rnd")  # hyperparameter "variant" is the index
DEFAULTS: dict[str, Any] = {"variant": "pool", "pool_size": 0}
MOMENTUM = 0.1


def default_pool(n: int) -> int:
    """``round(sqrt(n))`` segments (784 -> 28), at least 1."""
    return max(1, min(n, round(math.sqrt(n))))


def gate_params(variant: int, n: int, rank: int, pool: int) -> int:
    """Trainable gate parameters: ``d n + d`` (all), ``d pool + d`` (pool), 0 (rnd)."""
    return (rank * n + rank, rank * pool + rank, 0)[variant]


def gate_macs(variant: int, n: int, rank: int, pool: int) -> int:
    """MACs of one gate evaluation: ``d n`` (all, rnd) or ``d pool`` (pool)."""
    return rank * (pool if variant == 1 else n)


def alrf_cost(f: int, n: int, rank: int, variant: int, pool: int, samples_per_row: float = 1.0
              ) -> tuple[int, float]:
    """``(weights, MACs per row)`` without bias: ``d (n + f)`` + gate (see the module docstring).

    ``samples_per_row``: gate evaluations per output position (1 for a Linear, ``1 / (H W)`` for a conv).
    """
    return (rank * (n + f) + gate_params(variant, n, rank, pool),
            rank * (n + f) + gate_macs(variant, n, rank, pool) * samples_per_row)


def random_projection(seed: int, rank: int, n: int) -> torch.Tensor:
    """The fixed "rnd" projection: ``N(0, 1/n)`` entries (``rank x n``, float64) from ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(rank, n, generator=gen, dtype=torch.float64) / math.sqrt(n)


class _ALRF(Factorized, nn.Module):
    """Shared gate logic: ``gate_input``, ``gate``, the running mean and ``frozen_gate``."""

    def _init_gate(self, n: int, rank: int, variant: int, pool: int, seed: int, kw: dict) -> None:
        if variant not in (0, 1, 2):
            raise ValueError(f"alrf: variant={variant!r} must be 0 (all), 1 (pool) or 2 (rnd)")
        self.variant, self.pool, self.seed = variant, pool, seed
        width = pool if variant == 1 else n
        if variant == 2:
            self.gate = None
            self.register_buffer("projection", random_projection(seed, rank, n).to(**kw), persistent=False)
        else:
            self.gate = nn.Linear(width, rank, **kw)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.register_buffer("input_mean", torch.zeros(width, **kw))

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        if self.variant != 1:
            return h
        lead = h.shape[:-1]
        return F.adaptive_avg_pool1d(h.reshape(-1, 1, h.shape[-1]), self.pool).reshape(*lead, self.pool)

    def _logits(self, g: torch.Tensor) -> torch.Tensor:
        return F.linear(g, self.projection) if self.gate is None else self.gate(g)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        """``pi`` for gate inputs ``h`` (``(..., n)``); updates the running mean in training mode."""
        g = self._pool(h)
        if self.training:
            with torch.no_grad():
                self.input_mean.lerp_(g.detach().reshape(-1, g.shape[-1]).mean(0).to(self.input_mean.dtype),
                                      MOMENTUM)
        return torch.sigmoid(self._logits(g))

    def frozen_gate(self) -> torch.Tensor:
        """The gate at the running mean input, ``sigmoid(P mu + c)`` (used by ``to_dense``)."""
        with torch.no_grad():
            return torch.sigmoid(self._logits(self.input_mean))

    def extra_repr(self) -> str:
        extra = f", pool={self.pool}" if self.variant == 1 else f", seed={self.seed}" if self.variant == 2 else ""
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, variant={VARIANTS[self.variant]}{extra}"


class ALRFLinear(_ALRF):
    """ALRF for Linear-like layers on inputs ``(..., n)``: ``v`` (``n -> d``), the gate, ``u`` (``d -> f``, bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, variant: int = 1, pool: int = 0,
                 seed: int = 0, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False, **kw)
        self.u = nn.Linear(rank, out_features, bias=bias, **kw)
        self._init_gate(in_features, rank, variant, pool or default_pool(in_features), seed, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self._gate(x) * self.v(x))

    def to_dense(self) -> nn.Linear:
        """``nn.Linear`` with ``W = U diag(frozen_gate) V^T`` (exact while ``P = 0``; see the module docstring)."""
        w = self.u.weight * self.frozen_gate() @ self.v.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.u.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.u.bias is not None:
                out.bias.copy_(self.u.bias)
        return out


class ALRFConv2d(_ALRF):
    """ALRF for a 1x1 ``nn.Conv2d``: 1x1 convs ``v`` (``c -> d``) and ``u`` (``d -> f``), gate per sample."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, variant: int = 1, pool: int = 0,
                 seed: int = 0, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_channels, out_channels, rank
        self.v = nn.Conv2d(in_channels, rank, 1, bias=False, **kw)
        self.u = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)
        self._init_gate(in_channels, rank, variant, pool or default_pool(in_channels), seed, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self._gate(x.mean(dim=(-2, -1)))  # (B, d): global average pooling, then the gate
        return self.u(pi[..., None, None] * self.v(x))

    def to_dense(self) -> nn.Conv2d:
        """1x1 ``nn.Conv2d`` with ``W = U diag(frozen_gate) V^T`` (exact while ``P = 0``)."""
        f, d, c = self.out_features, self.rank, self.in_features
        w = self.u.weight.reshape(f, d) * self.frozen_gate() @ self.v.weight.reshape(d, c)
        out = nn.Conv2d(c, f, 1, bias=self.u.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.reshape(f, c, 1, 1))
            if self.u.bias is not None:
                out.bias.copy_(self.u.bias)
        return out


def _is_pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            and tuple(module.stride) == (1, 1) and module.padding in (0, (0, 0), "valid"))


def _kind(module: nn.Module) -> str | None:
    handler = get_layer_handler(module)
    if handler is None:
        return None
    if handler.kind in LINEAR_KINDS:
        return "linear"
    if handler.kind == "conv2d" and _is_pointwise(module):
        return "conv"
    return None


def _factors(w: torch.Tensor, rank: int, moment: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``, ``A`` ``rank x n`` and ``B`` ``f x rank`` (float64) with ``B A`` the (whitened) truncated SVD."""
    a, b = grouped_low_rank_factors(w, 1, rank) if moment is None else whitened_factors(w, moment, 1, rank)
    return a[0], b[0]


def _check(hyper: dict[str, Any], f: int, n: int) -> dict[str, int]:
    """Validated ``{"rank", "variant", "pool", "seed"}`` (``pool`` and ``seed`` default to auto and 0)."""
    h = check_hyper("alrf", hyper, ("rank",))
    full = {"variant": hyper.get("variant", 1), "pool": hyper.get("pool", 0), "seed": hyper.get("seed", 0)}
    h.update(check_hyper("alrf", full, ("variant", "pool", "seed"), low=0))
    unknown = sorted(set(hyper) - {"rank", "variant", "pool", "seed"})
    if unknown:
        raise ValueError(f"alrf: unknown hyperparameter(s) {unknown}; alrf takes rank, variant, pool, seed")
    if h["variant"] not in (0, 1, 2):
        raise ValueError(f"alrf: hyperparameter variant={h['variant']} must be 0 (all), 1 (pool) or 2 (rnd)")
    if h["rank"] > min(f, n):
        raise ValueError(f"alrf: rank={h['rank']} exceeds the largest rank {min(f, n)} of a {f}x{n} layer")
    if h["variant"] == 1:
        h["pool"] = h["pool"] or default_pool(n)
        if h["pool"] > n:
            raise ValueError(f"alrf: pool={h['pool']} exceeds the {n} inputs")
    else:
        h["pool"] = 0
    return h


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> _ALRF:
    """The ALRF module for ``module`` at ``hyper = {"rank": d, "variant": 0|1|2, "pool": p, "seed": s}``.

    ``variant`` (default 1, "pool"), ``pool`` (variant 1; default ``round(sqrt(n))``) and
    ``seed`` (variant 2; default 0) are optional; candidates always carry all four.  ``init=False`` builds the structure only; ``moment`` whitens the SVD.
    """
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"alrf cannot factorise a {type(module).__name__} (Linear-like layers and 1x1, stride-1, "
                        "unpadded, ungrouped Conv2d only)")
    handler = get_layer_handler(module)
    w = handler.weight_matrix(module)
    f, n = w.shape
    h = _check(hyper, f, n)
    bias = getattr(module, "bias", None)
    cls = ALRFLinear if kind == "linear" else ALRFConv2d
    new = cls(n, f, h["rank"], h["variant"], h["pool"], h["seed"], bias is not None,
              device=w.device, dtype=w.dtype)
    if not init:
        return new
    a, b = _factors(w, h["rank"], moment)
    with torch.no_grad():
        new.v.weight.copy_(a.reshape(new.v.weight.shape).to(w.dtype))
        new.u.weight.copy_((2.0 * b).reshape(new.u.weight.shape).to(w.dtype))
        if bias is not None:
            new.u.bias.copy_(bias.detach().reshape(-1))
    return new


def _options(config: CurveConfig) -> dict[str, Any]:
    opts = family_options(config, "alrf", DEFAULTS)
    if opts["variant"] == "rnd":
        raise ValueError("CurveConfig.options['alrf']['variant']='rnd' has no candidates: its input-dependent "
                         "gate has no weight-only or second-moment error; build it from explicit "
                         "hyperparameters ({'rank': d, 'variant': 2, 'seed': s}) instead")
    if opts["variant"] not in ("all", "pool"):
        raise ValueError(f"CurveConfig.options['alrf']['variant'] must be 'all' or 'pool', got {opts['variant']!r}")
    if opts["pool_size"] < 0:
        raise ValueError(f"CurveConfig.options['alrf']['pool_size'] must be >= 0 (0 = auto), got {opts['pool_size']!r}")
    return opts


def _samples_per_row(info: LayerInfo, kind: str) -> float:
    if kind == "linear":
        return 1.0
    spatial = math.prod(info.out_shape[2:]) if len(info.out_shape) > 2 else 1
    return 1.0 / max(spatial, 1)


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    opts = _options(config)
    kind = _kind(module)
    w = get_layer_handler(module).weight_matrix(module).detach()
    f, n = w.shape
    variant = VARIANTS.index(opts["variant"])
    pool = 0
    if variant == 1:
        pool = opts["pool_size"] or default_pool(n)
        if pool > n:
            raise ValueError(f"CurveConfig.options['alrf']['pool_size']={pool} exceeds the {n} inputs of {info.name!r}")
    ranks = rank_grid(min(f, n), config.grid_points)
    a, b = _factors(w, int(ranks[-1]), moment)  # nested: the top-j factors of rank max are those of rank j
    error = relative_errors(w, [b[:, :j] @ a[:j] for j in ranks], moment)
    bias = f if info.has_bias else 0
    per_row = _samples_per_row(info, kind)
    samples = round(info.positions * per_row)
    weights = np.array([alrf_cost(f, n, int(j), variant, pool)[0] for j in ranks], np.int64)
    flops = np.array([int(j) * (n + f) * info.positions + gate_macs(variant, n, int(j), pool) * samples
                      for j in ranks], np.int64)
    m = len(ranks)
    return CandidateColumns(hyper={"rank": ranks.astype(np.int64), "variant": np.full(m, variant, np.int64),
                                   "pool": np.full(m, pool, np.int64), "seed": np.zeros(m, np.int64)},
                            error=error, error_lower=error.copy(), params=weights + bias, flops=flops)


def _supports(module: nn.Module, info: LayerInfo) -> bool:
    return _kind(module) is not None


ALRF = register_family(
    Family.from_build(
        "alrf", _supports, _candidates, build,
        needs_finetune=True,
        description="adaptive mixture of low-rank factorisations (ALRF); equals truncated SVD until fine-tuned",
    )
)
