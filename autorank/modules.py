"""Factorised layers that replace dense ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``.

ALDS factorisation of a layer with weight matrix ``W`` (``f`` outputs, ``c`` input
channels, kernel of ``K = prod(kernel)`` taps, seen as an ``f x (c*K)`` matrix).
The ``c`` input channels are split into ``k`` contiguous groups; group ``i``
owns the columns ``W_i`` (``f x (c/k)*K``), and keeps rank ``j`` of its SVD::

    W_i ~= U_i S_i V_i^T  =  (U_i S_i^{1/2}) (S_i^{1/2} V_i^T)  =  B_i A_i

The layer becomes two layers:

* ``first``: a ``groups=k`` layer ``c -> k*j`` with the original kernel, stride,
  padding and dilation and no bias; its weights are the rows of ``A_i``;
* ``second``: a pointwise layer ``k*j -> f`` whose weight is ``[B_1 ... B_k]``
  and which carries the original bias.

Parameters (and multiply-accumulates per output position)::

    j * (c*K + k*f)        (+ f for the bias)

At full rank (``j = min(f, c*K/k)``) the product is exactly ``W``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import single_thread

__all__ = ["Factorized", "GroupedLowRankLinear", "GroupedLowRankConv", "LowRankEmbedding",
           "grouped_low_rank_factors"]


class Factorized:
    """Marker base of every factorised module autorank builds.

    Subclasses implement ``to_dense()``, returning the equivalent dense layer;
    the retraining scheduler uses it to re-factorise layers that are already
    factorised (cascade mode).
    """

    def to_dense(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def output_bias(self) -> torch.Tensor | None:
        """The bias parameter added last to the output, or None (no bias, or none that shifts the
        output alone).  The sequential refit moves it to re-centre the layer's outputs."""
        return None


def grouped_low_rank_factors(
    weight_matrix: torch.Tensor, groups: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of each of the ``groups`` column blocks of ``weight_matrix``.

    Returns ``A`` of shape ``(groups, rank, n/groups)`` and ``B`` of shape
    ``(groups, f, rank)`` such that ``W_i ~= B[i] @ A[i]`` is the truncated SVD
    of block ``i`` (Eckart-Young optimal in spectral and Frobenius norm), with
    the singular values split evenly, ``B = U S^{1/2}``, ``A = S^{1/2} V^T``.

    The factors are computed in float64 and returned in float64.
    """
    f, n = weight_matrix.shape
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} input columns")
    m = min(f, n // groups)
    if not 1 <= rank <= m:
        raise ValueError(f"rank must be in [1, {m}] for a {f}x{n // groups} block, got {rank}")
    w = weight_matrix.detach().to(torch.float64).reshape(f, groups, n // groups).transpose(0, 1)
    # The top singular subspace from the eigendecomposition of the smaller Gram matrix
    # (much cheaper than a full SVD of a wide block).  B @ A is the orthogonal
    # projection of W_i onto that subspace, i.e. its truncated SVD.
    left = f <= n // groups
    gram = w @ w.transpose(1, 2) if left else w.transpose(1, 2) @ w
    with single_thread(gram.shape[-1]):
        evals, evecs = torch.linalg.eigh(gram)
    top = evecs[:, :, -rank:].flip(-1)  # (k, m, rank), descending singular values
    s = evals[:, -rank:].flip(-1).clamp_min(0).sqrt()
    floor = torch.finfo(torch.float64).tiny ** 0.5
    root = s.clamp_min(floor).sqrt().unsqueeze(1)  # (k, 1, rank)
    if left:  # W_i ~= U_j U_j^T W_i;  B = U_j S^{1/2},  A = S^{-1/2} U_j^T W_i
        b = top * root
        a = (top / root).transpose(1, 2) @ w
    else:  # W_i ~= W_i V_j V_j^T;  A = S^{1/2} V_j^T,  B = W_i V_j S^{-1/2}
        a = (top * root).transpose(1, 2)
        b = (w @ top) / root
    return a, b


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
            xs = x.reshape(*x.shape[:-1], self.groups, self.in_features // self.groups)
            h = torch.einsum("...gc,grc->...gr", xs, self.first).flatten(-2)
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

        ``factors``: precomputed ``(A, B)`` in the layout of :func:`grouped_low_rank_factors`
        (e.g. the data-aware ones of :func:`autorank.calibration.whitened_factors`).
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
