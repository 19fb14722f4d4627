r"""Calibration data: streamed input second moments and the data-aware (whitened) SVD.

**Moments.**  For every compressible layer, the rows ``x`` of its input (one per
token for a Linear, one im2col patch per output position for a convolution,
with the columns ordered like the weight matrix) are accumulated as

    S = sum_x x x^T        (n x n, float64),     N = number of rows,

batch by batch, so memory is ``O(n^2)`` per layer whatever the number of
samples; ``M = S / N`` is the second moment.  When a batch is a dict with an
``attention_mask`` of shape ``(B, T)``, rows of ``(B, T, n)`` inputs at padded
positions are left out.

**Data-aware error and the whitened truncation.**  The error of ``W_hat`` on the
calibration inputs ``X`` is

    ||(W - W_hat) X||_F^2 = tr(R M R^T) N,     R = W - W_hat.

With a square-root ``M = L L^T`` (e.g. Cholesky), this is ``||R L||_F^2``, so the
best rank-``j`` ``W_hat`` truncates the SVD of ``W L`` (Eckart-Young) and maps
back: ``W_hat = [W L]_j L^{-1}`` (SVD-LLM).  Since ``[W L]_j = U_j U_j^T W L``
with ``U_j`` the top-``j`` left singular vectors of ``W L`` -- the top
eigenvectors of ``W M W^T`` --

    W_hat = U_j U_j^T W ,

the same optimum without forming ``L^{-1}``: it needs no damping and is exact for a
rank-deficient ``M`` too (directions the data never excites are not inverted, so
nothing blows up there).  autorank realises this projection form;
:func:`whitened_factors_cholesky` computes the SVD-LLM form with a damped Cholesky
factor ``L = chol(M + delta * mean(diag M) * I)`` and agrees with it to within the
damping on full-rank data (tested), which is the check that both are the same
optimum.  The errors of all
ranks come from the eigenvalues ``lambda_l`` of ``W M W^T``:

    eps(j)^2 = sum_{l > j} lambda_l / sum_l lambda_l .

**Grouped (ALDS, k > 1).**  Each input group ``i`` is whitened with its own block
``M_ii``: ``W_hat_i = P_i W_i``, ``P_i = U_ij U_ij^T``.  The error of the whole
layer includes the cross-group terms,

    ||R X||^2 / N = sum_{i,i'} tr(R_i M_ii' R_i'^T),      R_i = (I - P_i) W_i,

which is computed exactly for all ranks at once: with the full eigenvector
matrices ``U_i``,

    C = sum_{i,i'} (U_i^T U_i') * (U_i^T W_i M_ii' W_i'^T U_i')      (elementwise *),
    ||R(j) X||^2 / N = sum_{l > j, l' > j} C[l, l'],

a suffix sum over the bottom-right block of ``C``.

**Output weighting (two-sided whitening).**  A layer's output error ``d = R x`` does
not reach the model's output equally in every direction: to first order the model's
output moves by ``J d``, ``J`` the Jacobian of the output with respect to the layer's
output at that position.  Its expected square, with the inputs and the Jacobians
taken as independent (the Kronecker factorisation of K-FAC), is

    E ||J R x||^2  ~=  tr(R M R^T G),        G = E[J^T J]      (f x f),

the Gauss-Newton matrix of ``E ||output - output_hat||^2`` at the layer's output.
``G`` is estimated without forming ``J``: for a random probe ``r ~ N(0, I)`` of the
output's shape, ``g = J^T r`` is one backward pass of ``r . output``, and
``E_r[g g^T] = J^T J``; :func:`collect_output_moments` accumulates ``g g^T`` over the
positions of the calibration batches (one probe per batch).  With ``G = S^2``
(symmetric root) the objective is ``||S R L||_F^2``, so the best rank-``j`` ``W_hat`` is

    W_hat = S^{-1} [S W L]_j L^{-1} :

every formula above applied to ``W' = S W``, with the left factor mapped back by
``S^{-1}`` (the groups of ALDS split the input columns, so one ``S`` serves them all).
``G`` is damped, ``G + delta * mean(eig G) * I`` (``delta`` = :data:`OUTPUT_DAMPING`),
which bounds ``S^{-1}`` and moves towards the input-only whitening as ``delta`` grows;
a layer the output does not depend on (``G = 0``) gets ``S = I``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import progress_bar, single_thread
from .layers import LINEAR_KINDS

__all__ = [
    "OUTPUT_DAMPING",
    "Moments",
    "collect_moments",
    "collect_output_moments",
    "layer_inputs",
    "layer_rows",
    "output_roots",
    "primary_output",
    "whitened_error_curve",
    "whitened_factors",
    "whitened_factors_cholesky",
]

log = logging.getLogger(__name__)

#: default relative damping ``delta`` of the output moment: ``G + delta * mean(eig G) * I``
OUTPUT_DAMPING = 0.1


@dataclass
class Moments:
    """Streamed input second moment of one layer: ``sum`` = ``sum_x x x^T`` over ``count`` rows.

    ``output``, when set (:func:`collect_output_moments`), is the layer's output-side
    moment ``G = E[g g^T]`` in the same form (``f x f``).
    """

    sum: torch.Tensor  # (n, n) float64, or (n,) when x x^T is diagonal (one-hot inputs of an embedding)
    count: int = 0
    output: "Moments | None" = None

    @property
    def output_matrix(self) -> torch.Tensor | None:
        """``G`` (``f x f`` float64) when output moments were collected, else None."""
        return None if self.output is None else self.output.matrix

    @property
    def matrix(self) -> torch.Tensor:
        """``M = E[x x^T]`` (``n x n`` float64, or its diagonal ``(n,)`` for an embedding)."""
        return self.sum / max(self.count, 1)

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows`` (``N x n``)."""
        r = rows.detach().to(torch.float64)
        self.sum.addmm_(r.T, r)
        self.count += r.shape[0]


def layer_inputs(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The rows ``x`` the layer's weight matrix multiplies (``N x n``), from its input tensor.

    Linear-like layers: the last axis.  Convolutions: im2col patches in the
    weight's ``(c, kh, kw)`` column order, with the layer's padding (any
    ``padding_mode``), stride and dilation.
    """
    if kind in ("conv1d", "conv2d"):
        dims = 1 if kind == "conv1d" else 2
        if dims == 1:
            x = x.unsqueeze(-2)
        k = (1, *module.kernel_size) if dims == 1 else tuple(module.kernel_size)
        st = (1, *module.stride) if dims == 1 else tuple(module.stride)
        dl = (1, *module.dilation) if dims == 1 else tuple(module.dilation)
        pad = module.padding
        if isinstance(pad, str):  # "same" / "valid"
            if pad == "valid":
                pad = (0,) * dims
            else:
                total = [d * (kk - 1) for d, kk in zip(module.dilation, module.kernel_size)]
                lo = [t // 2 for t in total]
                hi = [t - l for t, l in zip(total, lo)]
                spec = [v for pair in zip(reversed(lo), reversed(hi)) for v in pair]
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, spec + ([0, 0] if dims == 1 else []), mode=mode)
                pad = (0,) * dims
        pad = tuple(pad)
        if module.padding_mode != "zeros" and any(pad):
            spec = [v for p in reversed(pad) for v in (p, p)]
            x = F.pad(x, spec + ([0, 0] if dims == 1 else []), mode=module.padding_mode)
            pad = (0,) * dims
        pd = (0, *pad) if dims == 1 else pad
        cols = F.unfold(x, k, dilation=dl, padding=pd, stride=st)  # (B, c*K, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if kind == "embedding":
        raise ValueError("embedding inputs are token ids; their moments are collected as counts")
    return x.reshape(-1, x.shape[-1])


def _mask_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Keep the rows of a ``(B, T, n)`` input where ``mask`` (``B x T``) is non-zero."""
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x.reshape(-1, x.shape[-1])
    return x[mask.to(torch.bool)]


def layer_rows(module: nn.Module, x: torch.Tensor, kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of one call's input that enter the layer's moment: :func:`layer_inputs`, with the rows
    of padded positions (``mask == 0``, ``mask`` of shape ``(B, T)``) left out for Linear-like layers."""
    if kind in LINEAR_KINDS:
        return _mask_rows(x, mask)
    return layer_inputs(module, x, kind)


def _forward(model: nn.Module, batch: Any, index: int) -> Any:
    """``model`` on calibration batch ``index``; a failing batch is named in a RuntimeError."""
    from .graph import run_model

    try:
        return run_model(model, batch)
    except Exception as exc:  # a bad batch: say which one, plainly
        raise RuntimeError(f"the forward pass of {type(model).__name__} on calibration batch {index} "
                           f"failed: {type(exc).__name__}: {exc}") from exc


def _stream(model: nn.Module, batches: Iterable[Any], hooks: Iterable[Callable[[], Any]], state: dict[str, Any],
            step: Callable[[Any, int], None], desc: str, progress: bool | None, mask_key: str) -> None:
    """Run ``step(batch, index)`` on every batch in eval mode with the ``hooks`` registered.

    ``hooks`` are callables that register one hook each and return its handle;
    ``state["mask"]`` is the batch's ``mask_key`` entry (or None) during its step.  The
    hooks are removed and every module's mode restored afterwards; no batch at all is
    a ValueError.
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    handles = []
    n_batches = 0
    try:
        handles = [register() for register in hooks]
        for batch in progress_bar(batches, desc, progress):
            state["mask"] = batch.get(mask_key) if isinstance(batch, Mapping) else None
            step(batch, n_batches)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.training = mode
    if n_batches == 0:
        raise ValueError("calibration is empty: it must yield at least one batch of inputs")


@torch.no_grad()
def collect_moments(
    model: nn.Module,
    layers: Mapping[str, Any],
    batches: Iterable[Any],
    progress: bool | None = None,
    mask_key: str = "attention_mask",
) -> dict[str, Moments]:
    """Stream the calibration ``batches`` through ``model`` and accumulate every layer's input moments.

    Args:
        model: the model (run in eval mode; its mode is restored).
        layers: ``{qualified name: LayerInfo}`` of the layers to collect.
        batches: an iterable of inputs in the form of ``example_inputs`` (tensor, tuple
            or dict); a ``(inputs, target)`` pair from a labelled loader is not split,
            so pass inputs only.
        mask_key: in dict batches, the ``(B, T)`` mask whose zero positions are left out.

    Returns ``{name: Moments}``.  Embedding layers get the diagonal of the moment of
    their one-hot inputs (the token counts) as a 1-D tensor; every function here that
    takes a moment accepts that diagonal form.
    """
    modules = dict(model.named_modules())
    acc: dict[str, Moments] = {}
    state: dict[str, Any] = {"mask": None}

    def hook(name: str, kind: str):
        def fn(mod, args):
            x = args[0]
            if kind == "embedding":
                ids = x
                mask = state["mask"]
                if mask is not None and ids.dim() == mask.dim():
                    try:  # position ids come as (1, T): broadcast them to the (B, T) mask
                        ids = ids.expand(mask.shape)[mask.to(torch.bool)]
                    except RuntimeError:
                        pass
                counts = torch.bincount(ids.reshape(-1), minlength=mod.num_embeddings).to(torch.float64)
                mom = acc.setdefault(name, Moments(torch.zeros(mod.num_embeddings, dtype=torch.float64)))
                mom.sum.add_(counts)  # one-hot rows: x x^T is diagonal, so only the diagonal is kept
                mom.count += int(counts.sum())
                return
            rows = layer_rows(mod, x, kind, state["mask"])
            mom = acc.setdefault(name, Moments(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)))
            mom.update(rows)

        return fn

    hooks = [lambda n=name, k=info.kind: modules[n].register_forward_pre_hook(hook(n, k))
             for name, info in layers.items()]
    _stream(model, batches, hooks, state, lambda batch, i: _forward(model, batch, i), "calibration", progress,
            mask_key)
    missing = [n for n in layers if n not in acc]
    if missing:
        log.warning("no calibration inputs reached %d layer(s): %s", len(missing), ", ".join(missing[:5]))
    return acc


def primary_output(out: Any) -> torch.Tensor:
    """The tensor of a model's output whose change output weighting measures.

    A tensor is itself; a mapping (a ``transformers`` ``ModelOutput`` too) gives its
    first tensor value (``last_hidden_state`` or ``logits``), a tuple or list its first
    tensor.
    """
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError(f"cannot find a floating-point output tensor in a {type(out).__name__}; "
                    "pass output_weighting=fn with fn(model_output) -> Tensor")


def collect_output_moments(
    model: nn.Module,
    layers: Mapping[str, Any],
    batches: Iterable[Any],
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: bool | None = None,
    mask_key: str = "attention_mask",
    seed: int = 0,
) -> dict[str, Moments]:
    """Stream ``batches`` through ``model`` and accumulate every layer's output-side moment ``G``.

    For each batch a probe ``r ~ N(0, I)`` (generator seeded with ``seed``) of the
    shape of ``output_fn(model(batch))`` (default :func:`primary_output`) is drawn --
    zero at padded positions when the output is ``(B, T, ...)`` and the batch carries
    a ``(B, T)`` ``mask_key`` -- and ``r . output`` is back-propagated; the gradient
    ``g`` at each layer's output, one row per output position (per token for a
    Linear, per pixel for a convolution; padded tokens left out), is accumulated as
    ``sum g g^T``.  ``E[g g^T] = E[J^T J]`` (module docstring).  Embedding layers are
    skipped.  No parameter gradient is kept: the model's parameters are left as they
    were, ``requires_grad`` flags and ``.grad`` included; it runs in eval mode (mode restored).

    Returns ``{name: Moments}`` with ``f x f`` sums.
    """
    modules = dict(model.named_modules())
    acc: dict[str, Moments] = {}
    state: dict[str, Any] = {"mask": None}

    def hook(name: str, kind: str):
        def fn(mod, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:  # nothing upstream needs a gradient: start the graph here, with a
                # non-leaf (the model may modify the output in place, which a leaf would refuse)
                out = out + torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)

            def grab(grad: torch.Tensor) -> None:
                if kind in LINEAR_KINDS:
                    rows = _mask_rows(grad, state["mask"])
                else:  # (B, C, *spatial): one row per output position
                    rows = grad.movedim(1, -1).reshape(-1, grad.shape[1])
                mom = acc.setdefault(name, Moments(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)))
                mom.update(rows)

            out.register_hook(grab)
            return out

        return fn

    extract = output_fn or primary_output
    gen = torch.Generator().manual_seed(seed)

    def step(batch: Any, index: int) -> None:
        mask = state["mask"]
        with torch.enable_grad():
            out = extract(_forward(model, batch, index))
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"output_weighting's function returned a {type(out).__name__}, not a Tensor")
            if not out.requires_grad:
                return  # no weighted layer reaches this output
            probe = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
            if mask is not None and out.dim() >= 2 and tuple(out.shape[:2]) == tuple(mask.shape):
                probe = probe * mask.reshape(*mask.shape, *([1] * (out.dim() - 2))).to(out.dtype)
            (out * probe).sum().backward()

    hooks = [lambda n=name, k=info.kind: modules[n].register_forward_hook(hook(n, k))
             for name, info in layers.items() if info.kind != "embedding"]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        _stream(model, batches, hooks, state, step, "output moments", progress, mask_key)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return acc


@torch.no_grad()
def output_roots(g: torch.Tensor, damping: float = OUTPUT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^{-1})`` with ``S = (G + delta * mean(eig G) * I)^{1/2}`` symmetric, float64.

    ``G = 0`` (the output does not depend on the layer) gives ``(I, I)``.
    """
    if damping <= 0 or not math.isfinite(damping):
        raise ValueError(f"output damping must be a positive number, got {damping!r}")
    g = g.detach().to(torch.float64)
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"an output moment must be a square matrix, got shape {tuple(g.shape)}")
    with single_thread(g.shape[0]):
        lam, q = torch.linalg.eigh(0.5 * (g + g.T))
    lam = lam.clamp_min(0)
    mean = float(lam.mean())
    if mean <= 0:
        eye = torch.eye(g.shape[0], dtype=torch.float64)
        return eye, eye.clone()
    root = (lam + damping * mean).sqrt()
    return (q * root) @ q.T, (q / root) @ q.T


def _eigh_desc(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with single_thread(mat.shape[-1]):
        evals, evecs = torch.linalg.eigh(mat)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def _weighted_gram(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W M W^T`` for a full ``M`` (``n x n``) or a diagonal one (``(n,)``)."""
    return (w * m) @ w.T if m.dim() == 1 else w @ m @ w.T


def _left_weighted(weight: torch.Tensor, output: torch.Tensor | None,
                   damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(S W, S^{-1})`` for an output moment ``G``, or ``(W, None)`` without one."""
    if output is None:
        return weight, None
    f = weight.shape[0]
    if tuple(output.shape) != (f, f):
        raise ValueError(f"output moment of shape {tuple(output.shape)} does not match a weight with {f} rows")
    root, inv = output_roots(output, damping)
    return root @ weight.detach().to(torch.float64), inv


def _blocks(weight: torch.Tensor, moment: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    f, n = weight.shape
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} input columns")
    if moment.dim() == 1 and moment.shape[0] == n:
        if groups != 1:
            raise ValueError("a diagonal moment (embedding) supports groups=1 only")
        return weight.detach().to(torch.float64).unsqueeze(0), moment.to(torch.float64)
    if moment.shape != (n, n):
        raise ValueError(f"moment of shape {tuple(moment.shape)} does not match a weight with {n} columns")
    w = weight.detach().to(torch.float64).reshape(f, groups, n // groups).transpose(0, 1)  # (k, f, n/k)
    return w, moment.to(torch.float64)


def _output_eigen(w: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``r = min(f, n)`` eigenpairs of ``W M W^T`` for one block ``W`` (``f x n``), descending.

    With ``f <= n`` the ``f x f`` matrix is decomposed directly.  Otherwise the
    ``n x n`` side is used: ``M = S S^T`` (``S = Q Lambda^{1/2}``), the eigenvectors of
    ``(W S)^T (W S)`` give ``u_l = W S v_l / sigma_l``; directions with
    ``sigma_l <= 1e-7 sigma_1`` carry ``lambda_l <= 1e-14 lambda_1`` and are set to zero
    (the data never excites them, so they add nothing to any error).
    """
    f, n = w.shape
    if f <= n:
        g = _weighted_gram(w, m)
        evals, u = _eigh_desc(0.5 * (g + g.T))
        return evals, u
    if m.dim() == 1:
        ws = w * m.clamp_min(0).sqrt()
    else:
        lam, q = _eigh_desc(0.5 * (m + m.T))
        ws = w @ (q * lam.sqrt())
    evals, v = _eigh_desc(ws.T @ ws)
    sig = evals.sqrt()
    keep = sig > 1e-7 * sig[0] if sig[0] > 0 else torch.zeros_like(sig, dtype=torch.bool)
    u = (ws @ v) / torch.where(keep, sig, torch.ones_like(sig))
    u[:, ~keep] = 0.0
    return torch.where(keep, evals, torch.zeros_like(evals)), u


@torch.no_grad()
def whitened_error_curve(weight: torch.Tensor, moment: torch.Tensor, groups: int = 1,
                         output: torch.Tensor | None = None,
                         output_damping: float = OUTPUT_DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware errors ``eps(j)`` for ranks ``j = 1 .. min(f, n/groups)`` of the per-group whitened truncation.

    Returns ``(errors, spectrum)``: ``errors[j-1] = ||(W - W_hat_j) X||_F / ||W X||_F``
    exactly (cross-group terms included, see the module docstring) and ``spectrum``,
    the singular values of ``W_0 L_0`` (square roots of the eigenvalues of
    ``W_0 M_00 W_0^T``; for ``groups = 1`` those of ``W L``).  With an output moment
    ``output = G`` (``f x f``) everything is measured after ``S`` (module docstring):
    ``errors[j-1] = ||S (W - W_hat_j) X||_F / ||S W X||_F`` of the two-sided truncation.

    Cost per group: one ``min(f, n/k)``-sized eigendecomposition; the cross terms
    work on ``r x r`` matrices, ``r = min(f, n/k)``.
    """
    weight = _left_weighted(weight, output, output_damping)[0]
    w, m = _blocks(weight, moment, groups)
    k, f, nk = w.shape
    rank_max = min(f, nk)
    w_full = weight.detach().to(torch.float64)
    total = float((w_full * w_full * m).sum()) if m.dim() == 1 else float(((w_full @ m) * w_full).sum())
    if m.dim() == 1:
        eig = [_output_eigen(w[0], m)]
    else:
        idx = torch.arange(nk)
        eig = [_output_eigen(w[i], m[i * nk + idx][:, i * nk + idx]) for i in range(k)]
    spectrum = eig[0][0][:rank_max].sqrt().numpy()
    if total <= 0.0:
        return np.zeros(rank_max), spectrum
    if k == 1:
        lam = eig[0][0][:rank_max]
        tail = lam.flip(0).cumsum(0).flip(0)  # tail[l] = sum_{l' >= l} lambda
        err2 = torch.cat([tail[1:], tail.new_zeros(1)])
    else:
        us = [u[:, :rank_max] for _, u in eig]  # (f, r) each
        zs = [us[i].T @ w[i] for i in range(k)]  # Z_i = U_i^T W_i  (r, nk)
        c = torch.zeros(rank_max, rank_max, dtype=torch.float64)
        for i in range(k):
            zm = zs[i] @ m[i * nk:(i + 1) * nk]  # Z_i [M_i1 ... M_ik]  (r, n)
            for i2 in range(k):
                h = zm[:, i2 * nk:(i2 + 1) * nk] @ zs[i2].T  # U_i^T W_i M_ii' W_i'^T U_i'
                c += (us[i].T @ us[i2]) * h
        suffix = c.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)  # suffix[a, b] = sum_{l>=a, l'>=b} C
        j = torch.arange(1, rank_max + 1)
        err2 = torch.where(j < rank_max, suffix[j.clamp_max(rank_max - 1), j.clamp_max(rank_max - 1)],
                           torch.zeros(()))
    # at j >= n/k every group keeps its whole row space (the data error is then 0 up to rounding)
    err2 = torch.where(torch.arange(1, rank_max + 1) >= nk, torch.zeros(()), err2)
    err = (err2.clamp_min(0) / total).sqrt().numpy()
    return err, spectrum


@torch.no_grad()
def whitened_factors(
    weight: torch.Tensor, moment: torch.Tensor, groups: int, rank: int,
    output: torch.Tensor | None = None, output_damping: float = OUTPUT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the per-group whitened truncation ``W_hat_i = U_ij U_ij^T W_i = B_i A_i``.

    Same layout as :func:`autorank.modules.grouped_low_rank_factors`: ``A`` is
    ``(groups, rank, n/groups)`` and ``B`` is ``(groups, f, rank)``, float64.  The
    scale of each rank-one term is balanced between ``A`` and ``B``
    (``||a_l|| = ||b_l||``), which leaves the product unchanged.  With an output
    moment ``output = G``: the factors of ``S W`` under ``M``, then ``B <- S^{-1} B``
    (the two-sided truncation, module docstring).
    """
    weight, inv = _left_weighted(weight, output, output_damping)
    w, m = _blocks(weight, moment, groups)
    k, f, nk = w.shape
    if not 1 <= rank <= min(f, nk):
        raise ValueError(f"rank must be in [1, {min(f, nk)}] for a {f}x{nk} block, got {rank}")
    if m.dim() == 1:
        bs = [_output_eigen(w[0], m)[1][:, :rank]]
    else:
        idx = torch.arange(nk)
        bs = [_output_eigen(w[i], m[i * nk + idx][:, i * nk + idx])[1][:, :rank] for i in range(k)]
    b = torch.stack(bs)  # (k, f, rank), orthonormal (or zero) columns
    a = b.transpose(1, 2) @ w  # (k, rank, nk)
    if inv is not None:
        b = inv @ b
    scale = (a.norm(dim=2) / b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(
        torch.finfo(torch.float64).tiny).sqrt()  # (k, rank)
    return a / scale.unsqueeze(2), b * scale.unsqueeze(1)


@torch.no_grad()
def whitened_factors_cholesky(
    weight: torch.Tensor, moment: torch.Tensor, rank: int, damping: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM form of the whitened truncation (one group): ``W_hat = [W L]_j L^{-1}``.

    ``L = chol(M + delta * mean(diag M) * I)``; ``delta`` is raised tenfold until the
    factorisation succeeds.  Returns ``(A, B)`` with ``A = S^{1/2} V^T L^{-1}``
    (``rank x n``) and ``B = U S^{1/2}`` (``f x rank``).  The product equals
    :func:`whitened_factors` to rounding when ``M`` is well conditioned.
    """
    w = weight.detach().to(torch.float64)
    m = moment.to(torch.float64)
    n = m.shape[0]
    scale = float(m.diagonal().mean()) or 1.0
    delta = damping
    for _ in range(12):
        lower, info = torch.linalg.cholesky_ex(m + delta * scale * torch.eye(n, dtype=torch.float64))
        if int(info) == 0:
            break
        delta *= 10
    else:  # pragma: no cover - M is symmetric PSD, so some damping always works
        raise RuntimeError("Cholesky factorisation of the input moment failed even with heavy damping")
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    # A = S^{1/2} V^T L^{-1}:  solve A L = S^{1/2} V^T  <=>  L^T A^T = (S^{1/2} V^T)^T
    a = torch.linalg.solve_triangular(lower.T, (root.unsqueeze(1) * vh[:rank]).T, upper=True).T
    return a, b
