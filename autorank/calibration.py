r"""Calibration data: streamed input (and output-side) second moments of every layer.

**Moments.**  For every compressible layer, the rows ``x`` of its input (one per
token for a Linear, one im2col patch per output position for a convolution,
with the columns ordered like the weight matrix) are accumulated as

    S = sum_x x x^T        (n x n, float64),     N = number of rows,

batch by batch, so memory is ``O(n^2)`` per layer whatever the number of
samples; ``M = S / N`` is the second moment.  When a batch is a dict with an
``attention_mask`` of shape ``(B, T)``, rows of ``(B, T, n)`` inputs at padded
positions are left out.

**What the moments are for.**  The error of ``W_hat`` on the calibration inputs
``X`` is ``||(W - W_hat) X||_F^2 = tr(R M R^T) N`` (``R = W - W_hat``), so ``M`` is all
a family needs to measure and minimise it: the whitened truncation and its maths are
in :mod:`autorank.linalg` (:func:`autorank.linalg.whitened_factors`), the exact
grouped errors of ALDS in :mod:`autorank.families.alds`
(:func:`autorank.families.alds.whitened_error_curve`).

**Output moments.**  With output weighting the error becomes
``tr(R M R^T G)``, ``G = E[J^T J]`` (``f x f``) the Gauss-Newton matrix of the model's
output at the layer's output (:mod:`autorank.linalg`, "Output weighting").
``G`` is estimated without forming ``J``: for a random probe ``r ~ N(0, I)`` of the
output's shape, ``g = J^T r`` is one backward pass of ``r . output``, and
``E_r[g g^T] = J^T J``; :func:`collect_output_moments` accumulates ``g g^T`` over the
positions of the calibration batches (one probe per batch).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import moved_names, progress_bar
from .layers import LINEAR_KINDS
from .nested import entry, primary_tensor, run_model, tensors

__all__ = [
    "Moments",
    "StopForward",
    "collect_moments",
    "collect_output_moments",
    "layer_inputs",
    "layer_rows",
    "primary_output",
]

log = logging.getLogger(__name__)

# the whitened truncation moved to autorank.linalg, the ALDS error curve to autorank.families.alds (deprecated here)
__getattr__ = moved_names(__name__, {
    **dict.fromkeys(("OUTPUT_DAMPING", "output_roots", "whitened_factors", "whitened_factors_cholesky"),
                    "autorank.linalg"),
    "whitened_error_curve": "autorank.families.alds",
})


@dataclass
class Moments:
    """Streamed input second moment of one layer: ``sum`` = ``sum_x x x^T`` over ``count`` rows.

    ``output``, when set (:func:`collect_output_moments`), is the layer's output-side
    moment ``G = E[g g^T]`` in the same form (``f x f``).
    """

    sum: torch.Tensor  # (n, n) float64, or (n,) when x x^T is diagonal (one-hot inputs of an embedding)
    count: int = 0
    output: "Moments | None" = None
    _g: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def output_matrix(self) -> torch.Tensor | None:
        """``G`` (``f x f`` float64) when output moments were collected, else None.

        The same tensor object on every call while the output moment is unchanged, so that
        :func:`autorank.linalg.output_roots` decomposes it once for the curves, the
        realisation and the refit."""
        if self.output is None:
            return None
        key = (self.output.count, self.output.sum._version)
        if self._g is None or self._g[0] is not self.output or self._g[1] != key:
            self._g = (self.output, key, self.output.matrix)
        return self._g[2]

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


class StopForward(Exception):
    """Raised by a hook to end a calibration forward pass early (what is after it is not needed)."""


def check_finite_batch(batch: Any, index: int) -> None:
    """``ValueError`` naming calibration batch ``index`` when one of its floating-point tensors holds NaN or Inf."""
    for t in tensors(batch):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ValueError(f"calibration batch {index} holds {what} values (a tensor of shape {tuple(t.shape)}); "
                             "moments of non-finite inputs are meaningless: clean or drop that batch")


def _forward(model: nn.Module, batch: Any, index: int) -> Any:
    """``model`` on calibration batch ``index``; a failing batch is named in a RuntimeError."""
    check_finite_batch(batch, index)
    try:
        return run_model(model, batch)
    except StopForward:
        return None
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
            state["mask"] = entry(batch, mask_key)
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
    quiet_missing: bool = False,
) -> dict[str, Moments]:
    """Stream the calibration ``batches`` through ``model`` and accumulate every layer's input moments.

    Args:
        model: the model (run in eval mode; its mode is restored).
        layers: ``{qualified name: LayerInfo}`` of the layers to collect.
        batches: an iterable of inputs in the form of ``example_inputs`` (tensor, tuple
            or dict); a ``(inputs, target)`` pair from a labelled loader is not split,
            so pass inputs only.
        mask_key: in dict batches, the ``(B, T)`` mask whose zero positions are left out.
        quiet_missing: do not warn about layers that no batch reached (the caller reports them).

    Layers that read the very same input tensor in every pass (the query, key and value
    projections; gate and up) share one accumulated sum (and the work of accumulating it).

    Returns ``{name: Moments}``.  Embedding layers get the diagonal of the moment of
    their one-hot inputs (the token counts) as a 1-D tensor; every function here that
    takes a moment accepts that diagonal form.
    """
    modules = dict(model.named_modules())
    acc: dict[str, Moments] = {}
    alias: dict[str, str] = {}  # layer -> the layer whose moment it shares (it reads the same tensor)
    # per forward pass: the input tensors seen (id -> (tensor, first reader)) and the rows each layer added
    state: dict[str, Any] = {"mask": None, "seen": {}, "added": {}}

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
            if kind in LINEAR_KINDS:  # layers that read the same tensor (q/k/v, gate/up) share one moment
                hit = state["seen"].get(id(x))
                if hit is not None and hit[0]() is x and hit[1] != name:
                    if name not in acc:
                        alias[name] = hit[1]
                        acc[name] = acc[hit[1]]
                    if alias.get(name) == hit[1]:
                        return
                if name in alias:  # it read the owner's tensor until now, but not in this pass
                    owner = alias.pop(name)
                    own = acc[owner]
                    total, count = own.sum.clone(), own.count
                    for mine in state["added"].get(owner, ()):  # the owner's rows of this pass are not its
                        mine = mine.to(torch.float64)
                        total.addmm_(mine.T, mine, alpha=-1.0)
                        count -= mine.shape[0]
                    acc[name] = Moments(total, count)
            rows = layer_rows(mod, x, kind, state["mask"])
            mom = acc.setdefault(name, Moments(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)))
            mom.update(rows)
            if kind in LINEAR_KINDS:
                hit = state["seen"].get(id(x))
                if hit is None or hit[0]() is not x:  # first reader (an id of a freed tensor may be reused)
                    state["seen"][id(x)] = (weakref.ref(x), name)
                if name in alias.values():  # kept for one pass, in case a sharer stops sharing
                    state["added"].setdefault(name, []).append(rows)

        return fn

    hooks = [lambda n=name, k=info.kind: modules[n].register_forward_pre_hook(hook(n, k))
             for name, info in layers.items()]

    def step(batch: Any, index: int) -> None:
        state["seen"], state["added"] = {}, {}
        _forward(model, batch, index)

    try:
        _stream(model, batches, hooks, state, step, "calibration", progress, mask_key)
    finally:
        state["seen"], state["added"] = {}, {}
    for name, owner in alias.items():  # a moment of its own (its output moment differs), sharing the sum
        acc[name] = Moments(acc[owner].sum, acc[owner].count)
    missing = [n for n in layers if n not in acc]
    if missing and not quiet_missing:
        log.warning("no calibration inputs reached %d layer(s): %s", len(missing), ", ".join(missing[:5]))
    return acc


def primary_output(out: Any) -> torch.Tensor:
    """The tensor of a model's output whose change output weighting measures.

    A tensor is itself; a mapping (a ``transformers`` ``ModelOutput`` too) gives its
    first tensor value (``last_hidden_state`` or ``logits``), a tuple or list its first
    tensor.
    """
    return primary_tensor(out, hint="pass data=autorank.DataAware(output=fn) (the old output_weighting=fn) "
                               "with fn(model_output) -> Tensor")


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
