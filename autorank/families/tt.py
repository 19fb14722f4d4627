r"""Tensor-Train matrix layers (Novikov et al., 2015) for Linear-like layers.

**Format.**  Factor the input and output sizes, ``n = n_1 ... n_d`` and
``f = m_1 ... m_d`` (``d = 2 .. 4`` cores, the most balanced factorisation of each
size into ``d`` factors ``>= 2``, see :func:`balanced_factors`).  With row index
``i = (i_1 .. i_d)`` and column index ``j = (j_1 .. j_d)`` (row-major, ``i_1`` the
slowest), the weight is

    W[i, j] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :],

with cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` and ``r_0 = r_d = 1``.

**Ranks.**  The hyperparameter ``rank = r`` caps every internal rank:
``r_k = min(r, R_k)`` where ``R_k = min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i)`` is
the largest rank the bond ``k`` can have.  ``r >= max_k R_k`` is exact.

**Fit.**  TT-SVD (:func:`tt_svd`): permute ``W`` to the tensor of shape
``(m_1 n_1, ..., m_d n_d)`` and split off one core at a time by a truncated SVD of
the current unfolding.  It is quasi-optimal in the Frobenius norm; autorank does
not trust that and *measures* the error of the reconstructed ``W_hat`` (relative
operator norm, or with a calibration moment the data-aware
``||(W - W_hat) X||_F / ||W X||_F``; the fit itself is weight-only, as the TT
structure on the input side does not survive whitening).

**Cost.**  Parameters ``sum_k r_{k-1} m_k n_k r_k`` (+ ``f`` bias).  The forward
pass (:func:`tt_forward`) never forms ``W``: it contracts the cores left to right,
core ``k`` as one matrix product of ``(rows * M_{<k} * N_{>k}) x (r_{k-1} n_k)`` by
``(r_{k-1} n_k) x (m_k r_k)``, so the multiply-accumulates per input row are

    sum_k  M_{<k} * N_{>k} * r_{k-1} * n_k * m_k * r_k,
    M_{<k} = prod_{i<k} m_i,   N_{>k} = prod_{i>k} n_i,

times the layer's output positions (rows) over the example batch; reshapes,
permutations and the bias add are free (what :func:`autorank.count_flops` measures).

Candidates: ``d`` in ``2 .. max_cores`` (where both sizes factor) and ``rank`` on
:func:`autorank.measures.rank_grid` up to ``max_k R_k``; candidates more expensive
than dense in both parameters and MACs are not computed.

Options (``CurveConfig(options={"tt": {...}})``): ``max_cores`` (int, default 4,
in ``2 .. 6``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import CurveConfig
from ..graph import LayerInfo
from ..layers import LINEAR_KINDS, get_layer_handler
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from .base import CandidateColumns, Family, family_options, register_family

__all__ = ["balanced_factors", "tt_bond_limits", "tt_ranks", "tt_svd", "tt_matrix_svd", "tt_matrix_full",
           "tt_forward", "tt_cost", "TTLinear"]

DEFAULTS: dict[str, Any] = {"max_cores": 4}
MAX_CORES = 6


def balanced_factors(size: int, d: int) -> tuple[int, ...] | None:
    """The most balanced factorisation of ``size`` into ``d`` factors ``>= 2`` (ascending), or None.

    "Most balanced": the smallest largest factor, ties broken by the largest
    smallest factor.  None when ``size`` has fewer than ``d`` prime factors.
    """
    if d < 1 or size < 1:
        raise ValueError(f"balanced_factors needs size >= 1 and d >= 1, got size={size}, d={d}")
    best: tuple[int, ...] | None = None

    def search(rest: int, k: int, low: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            if rest >= low:
                cand = tuple(acc + [rest])
                if best is None or (cand[-1], -cand[0]) < (best[-1], -best[0]):
                    best = cand
            return
        a = low
        while a ** k <= rest:
            if rest % a == 0:
                search(rest // a, k - 1, a, acc + [a])
            a += 1

    search(size, d, 2, [])
    return best


def tt_bond_limits(out_modes: Sequence[int], in_modes: Sequence[int]) -> list[int]:
    """``R_k = min(prod_{i<=k} m_i n_i, prod_{i>k} m_i n_i)`` for the ``d - 1`` internal bonds."""
    p = [m * n for m, n in zip(out_modes, in_modes)]
    return [min(math.prod(p[: k + 1]), math.prod(p[k + 1:])) for k in range(len(p) - 1)]


def tt_ranks(out_modes: Sequence[int], in_modes: Sequence[int], rank: int) -> list[int]:
    """All ranks ``[r_0 = 1, r_1 .. r_{d-1}, r_d = 1]`` for the maximal internal rank ``rank``."""
    return [1, *(min(rank, lim) for lim in tt_bond_limits(out_modes, in_modes)), 1]


def tt_cost(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> tuple[int, int]:
    """``(weights, MACs per input row)`` of a TT-matrix with ``ranks = [1, r_1, .., 1]`` (no bias).

    weights ``= sum_k r_{k-1} m_k n_k r_k``; MACs per row
    ``= sum_k M_{<k} N_{>k} r_{k-1} n_k m_k r_k`` (the contraction order of :func:`tt_forward`).
    """
    d = len(out_modes)
    weights = sum(ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1] for k in range(d))
    macs = sum(math.prod(out_modes[:k]) * math.prod(in_modes[k + 1:])
               * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1] for k in range(d))
    return int(weights), int(macs)


@torch.no_grad()
def tt_svd(tensor: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD of a ``d``-way tensor (shape ``(p_1 .. p_d)``) with internal ranks ``ranks`` (``d - 1`` ints).

    Returns cores of shape ``(r_{k-1}, p_k, r_k)`` (float64).  Core ``k`` holds the
    top ``r_k`` left singular vectors of the current unfolding
    ``(r_{k-1} p_k) x (p_{k+1} ... p_d)``; the rest ``S V^T`` carries on.  Each rank must
    be at most the size of its unfolding (true for :func:`tt_ranks`).
    """
    shape = tuple(tensor.shape)
    d = len(shape)
    if len(ranks) != d - 1:
        raise ValueError(f"tt_svd: a {d}-way tensor needs {d - 1} internal ranks, got {list(ranks)}")
    rest = tensor.detach().to(torch.float64)
    cores = []
    r_prev = 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * shape[k], -1)
        r = int(ranks[k])
        if not 1 <= r <= min(mat.shape):
            raise ValueError(f"tt_svd: rank {r} at bond {k + 1} must be in [1, {min(mat.shape)}]")
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, shape[-1], 1))
    return cores


def _check_modes(f: int, n: int, out_modes: Sequence[int], in_modes: Sequence[int]) -> None:
    if len(out_modes) != len(in_modes) or math.prod(out_modes) != f or math.prod(in_modes) != n:
        raise ValueError(f"TT modes {tuple(out_modes)} x {tuple(in_modes)} do not factor a {f}x{n} matrix")


@torch.no_grad()
def tt_matrix_svd(weight: torch.Tensor, out_modes: Sequence[int], in_modes: Sequence[int],
                  rank: int) -> list[torch.Tensor]:
    """TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)`` of ``weight`` (``f x n``) by TT-SVD at maximal rank ``rank``."""
    f, n = weight.shape
    _check_modes(f, n, out_modes, in_modes)
    d = len(out_modes)
    t = weight.detach().to(torch.float64).reshape(*out_modes, *in_modes)
    t = t.permute(*[i for k in range(d) for i in (k, d + k)])  # (m_1, n_1, ..., m_d, n_d)
    t = t.reshape(*[m * q for m, q in zip(out_modes, in_modes)])
    ranks = tt_ranks(out_modes, in_modes, rank)
    cores = tt_svd(t, ranks[1:-1])
    return [c.reshape(ranks[k], out_modes[k], in_modes[k], ranks[k + 1]) for k, c in enumerate(cores)]


def tt_matrix_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full ``f x n`` matrix of TT-matrix cores (for errors and ``to_dense``; the layer never calls it)."""
    d = len(cores)
    out_modes = [c.shape[1] for c in cores]
    in_modes = [c.shape[2] for c in cores]
    full = cores[0]  # (1, m_1, n_1, r_1)
    for c in cores[1:]:
        full = torch.tensordot(full, c, dims=([full.dim() - 1], [0]))
    full = full.reshape(*[s for c in cores for s in c.shape[1:3]])  # (m_1, n_1, ..., m_d, n_d)
    full = full.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))
    return full.reshape(math.prod(out_modes), math.prod(in_modes))


def tt_forward(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ W^T`` for ``x`` of shape ``(..., n)``, contracting the cores left to right (``W`` is never formed).

    State before core ``k``: ``(rows, M_{<k}, r_{k-1}, n_k, N_{>k})``; core ``k`` is one
    matrix product over ``(r_{k-1}, n_k)`` (see the module docstring for its cost).
    """
    lead = x.shape[:-1]
    rows = int(math.prod(lead))
    m_done, r_prev = 1, 1
    n_rest = x.shape[-1]
    state = x.reshape(rows, 1, 1, n_rest)  # (rows, M_<k, r_{k-1}, N_>=k)
    for core in cores:
        r0, m, nk, r1 = core.shape
        n_rest //= nk
        s = state.reshape(rows * m_done, r_prev, nk, n_rest).permute(0, 3, 1, 2)
        s = s.reshape(rows * m_done * n_rest, r_prev * nk)
        out = s @ core.permute(0, 2, 1, 3).reshape(r0 * nk, m * r1)  # (rows M N, m r1)
        out = out.reshape(rows, m_done, n_rest, m, r1).permute(0, 1, 3, 4, 2)
        m_done *= m
        r_prev = r1
        state = out.reshape(rows, m_done, r_prev, n_rest)
    return state.reshape(*lead, m_done)


class TTLinear(Factorized, nn.Module):
    """A Linear layer in Tensor-Train matrix format: ``y = TT(x) + bias`` on inputs ``(..., n)``.

    Cores are the parameters ``cores[k]`` of shape ``(r_{k-1}, m_k, n_k, r_k)``.
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(in_modes) != len(out_modes) or len(in_modes) < 2:
            raise ValueError(f"TTLinear needs >= 2 input and output modes of equal number, got {in_modes}, {out_modes}")
        self.in_modes, self.out_modes = tuple(int(v) for v in in_modes), tuple(int(v) for v in out_modes)
        self.in_features, self.out_features = math.prod(self.in_modes), math.prod(self.out_modes)
        self.rank = int(rank)
        self.ranks = tt_ranks(self.out_modes, self.in_modes, self.rank)
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList([
            nn.Parameter(torch.empty(self.ranks[k], m, q, self.ranks[k + 1], **kw))
            for k, (m, q) in enumerate(zip(self.out_modes, self.in_modes))
        ])
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        with torch.no_grad():  # variance-preserving random init (the weights are usually overwritten)
            scale = (1.0 / self.in_features) ** (0.5 / len(self.cores))
            for k, c in enumerate(self.cores):
                c.normal_(0.0, scale / math.sqrt(self.ranks[k]))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tt_forward(x, list(self.cores))
        return y + self.bias if self.bias is not None else y

    @classmethod
    def from_dense(cls, layer: nn.Module, d: int, rank: int) -> "TTLinear":
        """TT-SVD of a Linear-like ``layer`` with ``d`` cores at maximal rank ``rank``."""
        w = get_layer_handler(layer).weight_matrix(layer)
        f, n = w.shape
        out_modes, in_modes = _modes(f, n, d)
        bias = getattr(layer, "bias", None)
        new = cls(in_modes, out_modes, rank, bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for p, c in zip(new.cores, tt_matrix_svd(w, out_modes, in_modes, rank)):
                p.copy_(c.to(w.dtype))
            if bias is not None:
                new.bias.copy_(bias.detach().reshape(-1))
        return new

    def weight_matrix(self) -> torch.Tensor:
        """The full ``f x n`` matrix (only for ``to_dense`` and checks)."""
        return tt_matrix_full(list(self.cores))

    def to_dense(self) -> nn.Linear:
        """The exactly equivalent ``nn.Linear``."""
        p = self.cores[0]
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=p.device, dtype=p.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, in_modes={self.in_modes}, "
                f"out_modes={self.out_modes}, ranks={self.ranks}")


def _modes(f: int, n: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out_modes, in_modes = balanced_factors(f, d), balanced_factors(n, d)
    if out_modes is None or in_modes is None:
        bad = f if out_modes is None else n
        raise ValueError(f"tt: d={d} cores need both sizes to factor into {d} factors >= 2; {bad} does not")
    return out_modes, in_modes


def core_choices(f: int, n: int, max_cores: int) -> list[int]:
    """Numbers of cores ``d`` in ``2 .. max_cores`` for which both ``f`` and ``n`` factor."""
    return [d for d in range(2, max_cores + 1)
            if balanced_factors(f, d) is not None and balanced_factors(n, d) is not None]


def _options(config: CurveConfig) -> dict[str, Any]:
    opts = family_options(config, "tt", DEFAULTS)
    if not 2 <= opts["max_cores"] <= MAX_CORES:
        raise ValueError(f"CurveConfig.options['tt']['max_cores'] must be in [2, {MAX_CORES}], "
                         f"got {opts['max_cores']!r}")
    return opts


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    opts = _options(config)
    w = get_layer_handler(module).weight_matrix(module).detach()
    f, n = w.shape
    bias = f if info.has_bias else 0
    ds, rs, approx, params, flops = [], [], [], [], []
    for d in core_choices(f, n, opts["max_cores"]):
        out_modes, in_modes = _modes(f, n, d)
        for r in rank_grid(max(tt_bond_limits(out_modes, in_modes)), config.grid_points):
            weights, macs = tt_cost(out_modes, in_modes, tt_ranks(out_modes, in_modes, int(r)))
            p, fl = weights + bias, macs * info.positions
            if p >= info.dense_params and fl >= info.dense_flops:
                continue  # dearer than dense in both measures: never a candidate
            ds.append(d)
            rs.append(int(r))
            approx.append(tt_matrix_full(tt_matrix_svd(w, out_modes, in_modes, int(r))))
            params.append(p)
            flops.append(fl)
    error = relative_errors(w, approx, moment) if approx else np.zeros(0)
    return CandidateColumns(hyper={"d": np.asarray(ds, np.int64), "rank": np.asarray(rs, np.int64)},
                            error=error, error_lower=error.copy(), params=np.asarray(params, np.int64),
                            flops=np.asarray(flops, np.int64))


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> TTLinear:
    """The :class:`TTLinear` for ``module`` at ``hyper = {"d": cores, "rank": r}`` (``moment`` is not used for the fit)."""
    h = check_hyper("tt", hyper, ("d", "rank"))
    handler = get_layer_handler(module)
    if handler is None or handler.kind not in LINEAR_KINDS:
        raise TypeError(f"tt cannot factorise a {type(module).__name__}")
    d = h["d"]
    if not 2 <= d <= MAX_CORES:
        raise ValueError(f"tt: hyperparameter d={d} must be in [2, {MAX_CORES}]")
    f, n, _ = handler.geometry(module)
    if init:
        return TTLinear.from_dense(module, d, h["rank"])
    out_modes, in_modes = _modes(f, n, d)
    w = handler.weight_matrix(module)
    return TTLinear(in_modes, out_modes, h["rank"], getattr(module, "bias", None) is not None,
                    device=w.device, dtype=w.dtype)


def _supports(module: nn.Module, info: LayerInfo) -> bool:
    handler = get_layer_handler(module)
    if handler is None or handler.kind not in LINEAR_KINDS:
        return False
    f, n, _ = handler.geometry(module)
    return bool(core_choices(f, n, 2))  # d factors >= 2 need d prime factors: d = 2 is the weakest


TT = register_family(
    Family.from_build(
        "tt", _supports, _candidates, build,
        description="Tensor-Train matrix layer (Novikov et al. 2015) initialised by TT-SVD",
    )
)
