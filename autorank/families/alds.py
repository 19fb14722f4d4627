r"""ALDS grouped low-rank SVD (Liebenwein et al., 2021); ``groups = 1`` is plain truncated SVD.

**Factorisation.**  A layer's weight is the matrix ``W`` (``f`` outputs, ``c`` input
channels, kernel of ``K = prod(kernel)`` taps, seen as an ``f x (c*K)`` matrix).  The
``c`` input channels are split into ``k`` contiguous groups; group ``i`` owns the
columns ``W_i`` (``f x (c/k)*K``), and keeps rank ``j`` of its SVD::

    W_i ~= U_i S_i V_i^T  =  (U_i S_i^{1/2}) (S_i^{1/2} V_i^T)  =  B_i A_i

(:func:`autorank.linalg.grouped_low_rank_factors`).  The layer becomes two layers:

* ``first``: a ``groups=k`` layer ``c -> k*j`` with the original kernel, stride,
  padding and dilation and no bias; its weights are the rows of ``A_i``;
* ``second``: a pointwise layer ``k*j -> f`` whose weight is ``[B_1 ... B_k]``
  and which carries the original bias.

Parameters (and multiply-accumulates per output position), :func:`alds_cost`::

    j * (c*K + k*f)        (+ f for the bias)

At full rank (``j = min(f, c*K/k)``) the product is exactly ``W``.  Modules:
:class:`GroupedLowRankLinear` (``nn.Linear`` and Hugging Face ``Conv1D``),
:class:`GroupedLowRankConv` (``nn.Conv1d`` / ``nn.Conv2d``), :class:`LowRankEmbedding`.

**Weight-only error.**  Keeping rank ``j`` of each block leaves the residual
``R = [R_1 ... R_k]`` with ``||R_i||_2 = sigma_{j+1}(W_i)``.  Because
``R R^T = sum_i R_i R_i^T``,

    max_i ||R_i||_2  <=  ||R||_2  <=  sqrt(sum_i ||R_i||_2^2)  <=  sqrt(k) max_i ||R_i||_2,

so autorank's default error (:func:`grouped_error_curves`)

    eps(j, k) = sqrt(sum_i sigma_{j+1}(W_i)^2) / sigma_1(W)

is a guaranteed upper bound on the relative operator-norm error
``||W - W_hat||_2 / ||W||_2`` of the realised layer, and equals it for ``k = 1``.
The reference implementation's ``max_i sigma_{j+1}(W_i) / sigma_1(W)`` is the
lower end of the same bracket; it is kept as ``error_lower`` (and used when
``CurveConfig(error_bound="max")``).  All ranks of one ``(layer, k)`` come from one
set of singular values (:func:`group_singular_values`), obtained as the square
roots of the eigenvalues of the smaller Gram matrix of each block in float64
(cheaper than an SVD of a wide block, and accurate to ``~1e-8 sigma_1``).

**Data-aware error** (a calibration moment ``M`` is given): the exact
``||(W - W_hat) X||_F / ||W X||_F`` of the per-group whitened truncation, and the
realised factors are the whitened ones (:func:`autorank.linalg.whitened_factors`;
the maths is in :mod:`autorank.linalg`).  Each input group ``i`` is whitened with its
own block ``M_ii``: ``W_hat_i = P_i W_i``, ``P_i = U_ij U_ij^T``.  The error of the
whole layer includes the cross-group terms,

    ||R X||^2 / N = sum_{i,i'} tr(R_i M_ii' R_i'^T),      R_i = (I - P_i) W_i,

which :func:`whitened_error_curve` computes exactly for all ranks at once: with the
full eigenvector matrices ``U_i``,

    C = sum_{i,i'} (U_i^T U_i') * (U_i^T W_i M_ii' W_i'^T U_i')      (elementwise *),
    ||R(j) X||^2 / N = sum_{l > j, l' > j} C[l, l'],

a suffix sum over the bottom-right block of ``C``.

**Output-weighted error** (an output moment ``G`` is given too): the same after the
left factor ``S = G^{1/2}``, ``||S (W - W_hat) X||_F / ||S W X||_F``, of the two-sided
truncation.

**Candidates.**  Every ``k`` in the configured group set and every rank
``j = 1 .. min(f, c*K/k)``; cost ``j * (c*K + k*f)`` (+ bias) parameters and the
same times the number of output positions in MACs.  Layers: ``nn.Linear``, Hugging
Face ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d`` and, when the analyser is asked to,
``nn.Embedding`` (``k = 1`` only; the lookup is free, so a factorised table costs
``j * dim`` MACs per token against 0 for the dense one).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CurveConfig
from ..graph import LayerInfo
from ..layers import LINEAR_KINDS, get_layer_handler
from ..linalg import (OUTPUT_DAMPING, block_eigen, check_blocks, column_gram, grouped_low_rank_factors, is_tall, moment_blocks,
                      output_roots, output_weighted, singular_values, split_columns, tall_whitened_eigen,
                      whitened_basis, whitened_factors)
from ..measures import check_hyper
from ..modules import Factorized
from .base import CandidateColumns, Family, register_family, supports_kinds

__all__ = ["divisors_upto", "group_singular_values", "grouped_error_curves", "alds_cost", "whitened_error_curve",
           "GroupedLowRankLinear", "GroupedLowRankConv", "LowRankEmbedding", "dense_from_factors",
           "group_choices", "build", "shared_bases", "ALDS"]


# ---- maths ----------------------------------------------------------------------------------


def divisors_upto(c: int, limit: int) -> list[int]:
    """Divisors of ``c`` that are ``<= limit`` (always includes 1)."""
    return [d for d in range(1, min(c, limit) + 1) if c % d == 0]


@torch.no_grad()
def group_singular_values(weight_matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """Singular values (descending) of the ``groups`` contiguous column blocks of ``weight_matrix``.

    ``sigma(W_i)`` from the eigenvalues of the smaller Gram matrix of each block
    (:func:`autorank.linalg.singular_values`).  Returns a float64 tensor of shape
    ``(groups, min(f, n/groups))``.
    """
    return singular_values(split_columns(weight_matrix, groups))


def grouped_error_curves(svals: np.ndarray, sigma1: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower relative-error bounds for ranks ``j = 1 .. m`` from per-group singular values.

    ``svals``: ``(k, m)`` descending singular values of each group.  Returns
    ``(upper, lower)``, each of length ``m``, where entry ``j-1`` is

        upper[j-1] = sqrt(sum_i sigma_{j+1}(W_i)^2) / sigma1,
        lower[j-1] = max_i sigma_{j+1}(W_i) / sigma1,

    with ``sigma_{m+1} = 0`` (full rank is exact).
    """
    k, m = svals.shape
    tail = np.zeros((k, m))
    tail[:, : m - 1] = svals[:, 1:]
    if sigma1 <= 0:
        return np.zeros(m), np.zeros(m)
    upper = np.sqrt((tail**2).sum(axis=0)) / sigma1
    lower = tail.max(axis=0) / sigma1
    return upper, lower


def alds_cost(rank: np.ndarray | int, f: int, c: int, taps: int, groups: int) -> np.ndarray | int:
    """Weights of a grouped low-rank layer: ``j * (c*K + k*f)`` (also its MACs per output position)."""
    return rank * (c * taps + groups * f)


@torch.no_grad()
def whitened_error_curve(weight: torch.Tensor, moment: torch.Tensor, groups: int = 1,
                         output: torch.Tensor | None = None,
                         output_damping: float = OUTPUT_DAMPING,
                         gram: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware errors ``eps(j)`` for ranks ``j = 1 .. min(f, n/groups)`` of the per-group whitened truncation.

    Returns ``(errors, spectrum)``: ``errors[j-1] = ||(W - W_hat_j) X||_F / ||W X||_F``
    exactly (cross-group terms included, see the module docstring) and ``spectrum``,
    the singular values of ``W_0 L_0`` (square roots of the eigenvalues of
    ``W_0 M_00 W_0^T``; for ``groups = 1`` those of ``W L``).  With an output moment
    ``output = G`` (``f x f``) everything is measured after ``S`` (module docstring):
    ``errors[j-1] = ||S (W - W_hat_j) X||_F / ||S W X||_F`` of the two-sided truncation.

    Cost per group: one ``min(f, n/k)``-sized eigendecomposition; the cross terms
    work on ``r x r`` matrices, ``r = min(f, n/k)``.  A tall layer (``f > n/k``, no
    output moment) is computed in input space from ``gram = W^T W`` (given, or
    :func:`autorank.linalg.column_gram`), with no ``f x n`` float64 copy
    (:mod:`autorank.linalg`, tall layers).
    """
    if is_tall(weight, moment, groups, output):
        return _tall_error_curve(weight, moment, groups, gram)
    weight = output_weighted(weight, output, output_damping)[0]
    w, m = moment_blocks(weight, moment, groups)
    k, f, nk = w.shape
    rank_max = min(f, nk)
    w_full = w.transpose(0, 1).reshape(f, k * nk) if m.dim() == 2 else w[0]  # a view of the float64 copy
    total = float((w_full * w_full * m).sum()) if m.dim() == 1 else float(((w_full @ m) * w_full).sum())
    eig = block_eigen(w, m)
    spectrum = eig[0][0][:rank_max].sqrt().numpy()
    if total <= 0.0:
        return np.zeros(rank_max), spectrum

    def cross() -> torch.Tensor:
        us = [u[:, :rank_max] for _, u in eig]  # (f, r) each
        zs = [us[i].T @ w[i] for i in range(k)]  # Z_i = U_i^T W_i  (r, nk)
        c = torch.zeros(rank_max, rank_max, dtype=torch.float64)
        for i in range(k):
            zm = zs[i] @ m[i * nk:(i + 1) * nk]  # Z_i [M_i1 ... M_ik]  (r, n)
            for i2 in range(k):
                h = zm[:, i2 * nk:(i2 + 1) * nk] @ zs[i2].T  # U_i^T W_i M_ii' W_i'^T U_i'
                c += (us[i].T @ us[i2]) * h
        return c

    return _error_from_cross(eig[0][0], k, nk, rank_max, total, cross), spectrum


def _error_from_cross(lam0: torch.Tensor, k: int, nk: int, rank_max: int, total: float,
                      cross: Any) -> np.ndarray:
    """``eps(j)`` for ``j = 1 .. rank_max`` from the eigenvalues of group 0 (``k = 1``) or the
    ``r x r`` cross-term matrix ``C`` (``cross()``, ``k > 1``): the last step of both forms."""
    if k == 1:
        lam = lam0[:rank_max]
        tail = lam.flip(0).cumsum(0).flip(0)  # tail[l] = sum_{l' >= l} lambda
        err2 = torch.cat([tail[1:], tail.new_zeros(1)])
    else:
        c = cross()
        suffix = c.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)  # suffix[a, b] = sum_{l>=a, l'>=b} C
        j = torch.arange(1, rank_max + 1)
        err2 = torch.where(j < rank_max, suffix[j.clamp_max(rank_max - 1), j.clamp_max(rank_max - 1)],
                           torch.zeros(()))
    # at j >= n/k every group keeps its whole row space (the data error is then 0 up to rounding)
    err2 = torch.where(torch.arange(1, rank_max + 1) >= nk, torch.zeros(()), err2)
    return (err2.clamp_min(0) / total).sqrt().numpy()


def _tall_error_curve(weight: torch.Tensor, moment: torch.Tensor, groups: int,
                      gram: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`whitened_error_curve` of a tall layer from ``P = W^T W`` (``U_i = W_i T_i``, :mod:`autorank.linalg`)."""
    check_blocks(weight, moment, groups)
    f, n = weight.shape
    p = column_gram(weight) if gram is None else gram
    m = moment.to(torch.float64)
    k, nk = groups, n // groups
    rank_max = nk  # = min(f, n/k) for a tall layer
    blocks = [slice(i * nk, (i + 1) * nk) for i in range(k)]
    total = float((p * (0.5 * (m + m.T))).sum())  # tr(P M) = ||W X||_F^2 / N  (M symmetric)
    eig = [tall_whitened_eigen(p[b, b], m[b, b]) for b in blocks]
    spectrum = eig[0][0][:rank_max].sqrt().numpy()
    if total <= 0.0:
        return np.zeros(rank_max), spectrum

    def cross() -> torch.Tensor:
        ts = [t for _, t in eig]  # U_i = W_i T_i
        zs = [ts[i].T @ p[blocks[i], blocks[i]] for i in range(k)]  # Z_i = U_i^T W_i = T_i^T P_ii  (r, nk)
        c = torch.zeros(rank_max, rank_max, dtype=torch.float64)
        for i in range(k):
            zm = zs[i] @ m[blocks[i]]  # Z_i [M_i1 ... M_ik]  (r, n)
            for i2 in range(k):
                h = zm[:, blocks[i2]] @ zs[i2].T
                c += (ts[i].T @ p[blocks[i], blocks[i2]] @ ts[i2]) * h  # (U_i^T U_i') * h
        return c

    return _error_from_cross(eig[0][0], k, nk, rank_max, total, cross), spectrum


# ---- modules ----------------------------------------------------------------------------------


class GroupedLowRankLinear(Factorized, nn.Module):
    """``y = [B_1 ... B_k] [A_1 x_1; ...; A_k x_k] + bias``, the ALDS form of ``nn.Linear``.

    ``x_i`` is the ``i``-th contiguous slice of ``in_features/groups`` input features.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.groups = rank, groups
        kw = {"device": device, "dtype": dtype}
        # first: (groups, rank, in/groups); second: an ordinary Linear k*rank -> out
        self.first = nn.Parameter(torch.empty(groups, rank, in_features // groups, **kw))
        self.second = nn.Linear(groups * rank, out_features, bias=bias, **kw)
        nn.init.kaiming_uniform_(self.first, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            h = F.linear(x, self.first[0])
        else:
            # one batched matmul over the groups: (k, N, n/k) @ (k, n/k, j) -> (k, N, j).  Measured on
            # the CPU (1 thread) against the einsum it replaces and a grouped conv1d, it was the fastest
            # on every shape tried: 1.01-1.46x the einsum, conv1d 0.42-0.95x (docs/latency.md)
            lead = x.shape[:-1]
            xs = x.reshape(-1, self.groups, self.in_features // self.groups).transpose(0, 1)
            h = torch.bmm(xs, self.first.transpose(1, 2)).transpose(0, 1).reshape(*lead, self.groups * self.rank)
        return self.second(h)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int, groups: int = 1) -> "GroupedLowRankLinear":
        """Factorise ``layer`` by the truncated SVD of each input group."""
        a, b = grouped_low_rank_factors(layer.weight, groups, rank)
        return cls.from_factors(a, b, layer.bias, like=layer.weight)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     like: torch.Tensor) -> "GroupedLowRankLinear":
        """The layer with ``A`` = ``a`` ``(k, j, n/k)``, ``B`` = ``b`` ``(k, f, j)`` and ``bias``.

        ``like`` gives the dtype and device.
        """
        k, j, nk = a.shape
        f = b.shape[1]
        new = cls(k * nk, f, j, k, bias is not None, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            new.first.copy_(a.to(like.dtype))
            new.second.weight.copy_(b.transpose(0, 1).reshape(f, k * j).to(like.dtype))
            if bias is not None:
                new.second.bias.copy_(bias.detach().reshape(-1))
        return new

    def output_bias(self) -> torch.Tensor | None:
        return self.second.bias

    def to_dense(self) -> nn.Linear:
        """The ``nn.Linear`` with weight ``[B_1 A_1 ... B_k A_k]``."""
        p = self.first
        out = nn.Linear(self.in_features, self.out_features, bias=self.second.bias is not None,
                        device=p.device, dtype=p.dtype)
        with torch.no_grad():
            out.weight.copy_(dense_from_factors(self.first, self.second.weight, self.groups))
            if self.second.bias is not None:
                out.bias.copy_(self.second.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, groups={self.groups}"


def dense_from_factors(first: torch.Tensor, second_weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B_1 A_1, ..., B_k A_k]`` from ``A`` = ``first`` ``(k, j, n/k)`` and ``[B_1..B_k]`` ``(f, k*j)``."""
    k, j, nk = first.shape
    f = second_weight.shape[0]
    b = second_weight.reshape(f, k, j).transpose(0, 1)  # (k, f, j)
    return torch.bmm(b, first).transpose(0, 1).reshape(f, k * nk)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


class GroupedLowRankConv(Factorized, nn.Sequential):
    """The ALDS form of ``nn.Conv1d`` / ``nn.Conv2d``: a ``groups=k`` conv, then a 1x1 conv.

    ``first``: ``c -> k*j`` with the original kernel/stride/padding/dilation, no bias;
    ``second``: ``k*j -> f``, kernel 1, with the original bias.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        rank: int,
        groups: int = 1,
        stride: Sequence[int] | int = 1,
        padding: Sequence[int] | int | str = 0,
        dilation: Sequence[int] | int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if dims not in _CONV:
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        if in_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        conv = _CONV[dims]
        kw = {"device": device, "dtype": dtype}
        first = conv(in_channels, groups * rank, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode, **kw)
        second = conv(groups * rank, out_channels, 1, bias=bias, **kw)
        super().__init__()
        self.add_module("first", first)
        self.add_module("second", second)
        self.dims, self.rank, self.groups = dims, rank, groups

    @classmethod
    def from_dense(cls, layer: nn.Conv1d | nn.Conv2d, rank: int, groups: int = 1,
                   factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> "GroupedLowRankConv":
        """Factorise ``layer`` by the truncated SVD of each input-channel group.

        ``factors``: precomputed ``(A, B)`` in the layout of :func:`autorank.linalg.grouped_low_rank_factors`
        (e.g. the data-aware ones of :func:`autorank.linalg.whitened_factors`).
        """
        if layer.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be factorised, got groups={layer.groups}")
        w = layer.weight
        dims = w.dim() - 2
        new = cls(dims, layer.in_channels, layer.out_channels, layer.kernel_size, rank, groups,
                  layer.stride, layer.padding, layer.dilation, layer.bias is not None,
                  layer.padding_mode, device=w.device, dtype=w.dtype)
        f = layer.out_channels
        a, b = factors if factors is not None else grouped_low_rank_factors(w.reshape(f, -1), groups, rank)
        with torch.no_grad():
            new.first.weight.copy_(a.reshape(new.first.weight.shape).to(w.dtype))
            new.second.weight.copy_(
                b.transpose(0, 1).reshape(new.second.weight.shape).to(w.dtype))
            if layer.bias is not None:
                new.second.bias.copy_(layer.bias)
        return new

    def output_bias(self) -> torch.Tensor | None:
        return self.second.bias

    def to_dense(self) -> nn.Module:
        """The dense conv with weight ``[B_1 A_1, ..., B_k A_k]`` (same geometry as the original)."""
        fst, snd = self.first, self.second
        f, kj = snd.out_channels, snd.in_channels
        a = fst.weight.reshape(self.groups, self.rank, -1)
        w = dense_from_factors(a, snd.weight.reshape(f, kj), self.groups)
        out = _CONV[self.dims](fst.in_channels, f, fst.kernel_size, stride=fst.stride,
                               padding=fst.padding, dilation=fst.dilation,
                               bias=snd.bias is not None, padding_mode=fst.padding_mode,
                               device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w.reshape(out.weight.shape))
            if snd.bias is not None:
                out.bias.copy_(snd.bias)
        return out


class LowRankEmbedding(Factorized, nn.Module):
    """``E ~= T P^T``: an ``nn.Embedding(num, rank)`` lookup followed by ``P`` (``rank -> dim``, no bias).

    In autorank's matrix view an embedding is the ``dim x num`` matrix ``W = E^T``
    applied to one-hot inputs; a rank-``j`` factorisation ``W ~= B A`` is stored
    as the table ``T = A^T`` (``num x j``) and the projection ``P = B`` (``dim x j``).
    Parameters: ``j * (num + dim)``; multiply-accumulates per token: ``j * dim``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.table = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, **kw)
        self.proj = nn.Linear(rank, embedding_dim, bias=False, **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))

    @classmethod
    def from_factors(cls, layer: nn.Embedding, a: torch.Tensor, b: torch.Tensor) -> "LowRankEmbedding":
        """From ``A`` (``j x num``) and ``B`` (``dim x j``) of ``W = E^T ~= B A``."""
        w = layer.weight
        new = cls(layer.num_embeddings, layer.embedding_dim, a.shape[0], layer.padding_idx,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.table.weight.copy_(a.T.to(w.dtype))
            new.proj.weight.copy_(b.to(w.dtype))
        return new

    def to_dense(self) -> nn.Embedding:
        w = self.table.weight
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w @ self.proj.weight.T)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} x {self.embedding_dim}, rank={self.rank}"


# ---- family ---------------------------------------------------------------------------------


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
    gram = None
    for k in sorted(group_choices(info, config)):
        if moment is not None:
            tall = is_tall(w, moment, k)  # (w is already S W under an output moment)
            if tall and gram is None:
                gram = column_gram(w)  # W^T W serves every k of a tall layer
            err, _ = whitened_error_curve(w, moment, k, gram=gram if tall else None)
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


_SHARED_BASES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("autorank_alds_bases", default=None)


@contextlib.contextmanager
def shared_bases() -> Iterator[None]:
    """Inside, the data-aware builds of one weight under one pair of moment tensors share one
    eigendecomposition (:func:`autorank.linalg.whitened_basis`) across ranks.

    For callers that build several ranks of the same layer in a row (the allocator probes); open
    it around one layer, so that at most one layer's basis is held.  Entries are keyed by the
    storage of the weight and of the moment tensors (kept alive by the entry), so pass the same
    moment tensor objects to every build inside.
    """
    token = _SHARED_BASES.set({})
    try:
        yield
    finally:
        _SHARED_BASES.reset(token)


def _factors(w: torch.Tensor, k: int, j: int, moment: torch.Tensor | None, output: torch.Tensor | None = None):
    if moment is None:
        return grouped_low_rank_factors(w, k, j)
    cache = _SHARED_BASES.get()
    if cache is None or is_tall(w, moment, k, output):
        return whitened_factors(w, moment, k, j, output=output)
    key = (w.data_ptr(), tuple(w.shape), w.dtype, w._version, k, moment.data_ptr(), moment._version,
           None if output is None else (output.data_ptr(), output._version))
    if key not in cache:
        cache[key] = (w, moment, output, whitened_basis(w.detach(), moment, k, output))
    return whitened_factors(w, moment, k, j, output=output, basis=cache[key][3])


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


ALDS = register_family(
    Family.from_build(
        "alds", supports_kinds(SUPPORTED_KINDS), _candidates, build,
        description="grouped low-rank SVD (ALDS); groups=1 is plain truncated SVD",
        fits_data=True,
        fits_output=True,
    )
)
