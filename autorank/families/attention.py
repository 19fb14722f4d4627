r"""``nn.MultiheadAttention`` as four linear layers: q, k, v and the output projection.

``nn.MultiheadAttention`` keeps its input projection as one bare ``(3E, E)`` Parameter
(``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from ``E``)
and calls ``out_proj`` functionally (``F.multi_head_attention_forward`` reads
``out_proj.weight``), so no projection of it is a module that autorank can see called
or replace.  :class:`UnfusedMultiheadAttention` is the same attention with the four
projections as ``nn.Linear`` children::

    q = q_proj(query)   (E -> E)     k = k_proj(key)   (kdim -> E)     v = v_proj(value)   (vdim -> E)
    out = out_proj(concat_h softmax(q_h k_h^T / sqrt(d) + mask) v_h)                       (E -> E)

with ``W_q, W_k, W_v`` the three row blocks of ``in_proj_weight`` (and ``b_q, b_k, b_v``
of ``in_proj_bias``).  Everything between the projections (``bias_k``/``bias_v``,
``add_zero_attn``, the masks, dropout, ``is_causal``, ``need_weights`` and
``average_attn_weights``, unbatched inputs, ``batch_first``) is
``F.multi_head_attention_forward``'s own code, so with dense projections the module
computes what ``nn.MultiheadAttention`` computes (up to floating-point rounding of
three products in place of one stacked product).

The compression pipeline replaces each supported ``nn.MultiheadAttention`` of the
model it compresses by this module (:func:`unfuse_attention`) before the analysis, so
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` are four ordinary Linear layers:
each gets every family's candidates and its own rank in the global step, its own
calibration moment (q, k and v of a self-attention read the same tensor and so share
one, :func:`autorank.calibration.collect_moments`), and the factorised modules take
their places.  An attention none of whose projections was compressed is turned back
into ``nn.MultiheadAttention`` (:func:`refuse_attention`); ``Plan.attention`` lists the
ones the realised model holds unfused, and :func:`autorank.realize` (so
:func:`autorank.load`) unfuses those of the dense model it is given.  See
``docs/families.md`` ("Attention").
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from ..graph import PARENTS_READING_CHILD_WEIGHTS, module_aliases, replace_module

__all__ = ["UnfusedMultiheadAttention", "PROJECTIONS", "unfuse_reason", "unfuse_attention", "refuse_attention",
           "unfuse_named"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (no random init: the global RNG is untouched)."""
    lin = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _clone_parameter(p: torch.Tensor | None) -> nn.Parameter | None:
    return None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a projection: an ``nn.Linear``, or a factorised module through its ``to_dense()``."""
    if not isinstance(module, nn.Linear) and hasattr(module, "to_dense"):
        module = module.to_dense()
    if not isinstance(module, nn.Linear):
        raise TypeError(f"a projection of UnfusedMultiheadAttention must be an nn.Linear or have to_dense(), "
                        f"got {type(module).__name__}")
    return module.weight, module.bias


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as called child modules.

    Same constructor attributes (``embed_dim``, ``num_heads``, ``kdim``, ``vdim``,
    ``dropout``, ``batch_first``, ``head_dim``, ``add_zero_attn``, ``bias_k``, ``bias_v``)
    and the same ``forward`` signature and results as ``nn.MultiheadAttention``.  Each
    projection may be replaced by any module mapping the last axis (a factorised layer).
    Build one from an attention module with :meth:`from_attention`; turn it back with
    :meth:`to_attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module,
                 out_proj: nn.Module, *, dropout: float = 0.0, kdim: int | None = None, vdim: int | None = None,
                 bias_k: nn.Parameter | None = None, bias_v: nn.Parameter | None = None,
                 add_zero_attn: bool = False, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if (bias_k is None) != (bias_v is None):
            raise ValueError("bias_k and bias_v must be given together")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.kdim = int(kdim if kdim is not None else embed_dim)
        self.vdim = int(vdim if vdim is not None else embed_dim)
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.head_dim = self.embed_dim // self.num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.bias_k, self.bias_v = bias_k, bias_v

    # ---- conversion ------------------------------------------------------------------
    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention) -> "UnfusedMultiheadAttention":
        """The unfused copy of ``mha`` (weights copied, ``requires_grad`` flags and training mode kept)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(mha).__name__}")
        e, bias, out = mha.embed_dim, mha.in_proj_bias, mha.out_proj
        if mha._qkv_same_embed_dim:
            weights = [(mha.in_proj_weight[i * e:(i + 1) * e], mha.in_proj_weight) for i in range(3)]
        else:
            weights = [(w, w) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
        biases = [(None, None)] * 3 if bias is None else [(bias[i * e:(i + 1) * e], bias) for i in range(3)]
        projections = []
        # (value, the Parameter whose requires_grad flag the copy keeps) of each weight and bias
        for (w, w_flag), (b, b_flag) in zip([*weights, (out.weight, out.weight)], [*biases, (out.bias, out.bias)]):
            lin = _linear(w.detach(), None if b is None else b.detach())
            lin.weight.requires_grad_(w_flag.requires_grad)
            if b is not None:
                lin.bias.requires_grad_(b_flag.requires_grad)
            projections.append(lin)
        new = cls(e, mha.num_heads, *projections, dropout=mha.dropout, kdim=mha.kdim, vdim=mha.vdim,
                  bias_k=_clone_parameter(mha.bias_k), bias_v=_clone_parameter(mha.bias_v),
                  add_zero_attn=mha.add_zero_attn, batch_first=mha.batch_first)
        new.train(mha.training)
        return new

    def to_attention(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (factorised projections multiplied out by ``to_dense()``)."""
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (_dense_weight(m) for m in
                                                    (self.q_proj, self.k_proj, self.v_proj, self.out_proj))
        biases = [b is not None for b in (bq, bk, bv, bo)]
        if any(biases) and not all(biases):
            raise ValueError("nn.MultiheadAttention has biases on all four projections or on none; "
                             f"these have q/k/v/out biases {biases}")
        mha = skip_init(nn.MultiheadAttention, self.embed_dim, self.num_heads, dropout=self.dropout,
                        bias=all(biases), add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                        kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                        device=wq.device, dtype=wq.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([wq, wk, wv]))
            else:
                mha.q_proj_weight.copy_(wq)
                mha.k_proj_weight.copy_(wk)
                mha.v_proj_weight.copy_(wv)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([bq, bk, bv]))
                mha.out_proj.bias.copy_(bo)
            mha.out_proj.weight.copy_(wo)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        mha.train(self.training)
        return mha

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, add_zero_attn={self.add_zero_attn}")

    # ---- forward: nn.MultiheadAttention.forward and F.multi_head_attention_forward, projections as modules ----
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("UnfusedMultiheadAttention does not take nested tensors (nn.MultiheadAttention "
                             "accepts them only on its inference fast path)")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        num_heads, embed_dim, head_dim = self.num_heads, self.embed_dim, self.head_dim
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if query.shape[-1] != embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {embed_dim}, but got {query.shape[-1]}")
        seq = 1 if (self.batch_first and is_batched) else 0  # the sequence axis of the caller's layout
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        elif key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                                 f"{value.shape[:-1]}")

        # the in-projections, in the caller's layout (so calibration sees (B, T, n) rows when batch_first)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if not is_batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif seq == 1:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # (L, B, E), (S, B, E)
        tgt_len, bsz, _ = q.shape

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA takes the is_causal hint itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        src_len = k.shape[0]

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)

        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src_len):
                raise AssertionError(f"expected key_padding_mask of shape {(bsz, src_len)}, got "
                                     f"{tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
            q = q.view(bsz, num_heads, tgt_len, head_dim)
            k = k.view(bsz, num_heads, src_len, head_dim)
            v = v.view(bsz, num_heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = None
            if not is_batched:
                out = out.squeeze(1)
        if seq == 1:
            out = out.transpose(1, 0)
        return out, weights


# ---- the model-level conversions -----------------------------------------------------------

def unfuse_reason(module: nn.Module, parent: nn.Module | None, aliases: Iterable[str] = (),
                  shared: Iterable[str] = ()) -> str | None:
    """Why the attention ``module`` (child of ``parent``) cannot be unfused (None: it can).

    ``aliases``: other names the same module is registered under; ``shared``: names of
    parameters outside it that are the same tensors as its own.
    """
    aliases, shared = list(aliases), list(shared)
    if type(module) is not nn.MultiheadAttention:
        return (f"{type(module).__name__} subclasses nn.MultiheadAttention and may override its forward; "
                "only nn.MultiheadAttention itself is unfused")
    if parent is not None and isinstance(parent, PARENTS_READING_CHILD_WEIGHTS):
        return (f"its parent {type(parent).__name__} reads in_proj_weight and out_proj.weight directly "
                "(fused fast path), so the attention cannot be replaced")
    if aliases:
        return f"the same attention module is also registered as {', '.join(aliases)}"
    if shared:
        return f"its weights are tied with {', '.join(shared)}"
    weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    return None


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    import fnmatch

    for p in patterns:
        if name == p or fnmatch.fnmatchcase(name, p):
            return p
    return None


def unfuse_attention(model: nn.Module, exclude: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Replace (in place) every supported ``nn.MultiheadAttention`` of ``model`` by :class:`UnfusedMultiheadAttention`.

    An attention whose own name matches an ``exclude`` pattern is left as it is.
    Returns ``(unfused names, {name: why left fused})``; the reasons go to the skip list.
    """
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    named = dict(model.named_modules())
    aliases, owners = module_aliases(model)
    done: list[str] = []
    left: dict[str, str] = {}
    for name, mod in named.items():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        if not name:
            left["<model>"] = ("the model itself is a single nn.MultiheadAttention; autorank replaces submodules, "
                               "so wrap it in a parent module")
            continue
        pat = _matches(name, exclude)
        if pat is not None:
            left[name] = f"excluded by pattern {pat!r}"
            continue
        own = {f"{name}.{pn}" for pn, _ in mod.named_parameters()}
        shared = sorted({o for pn, p in mod.named_parameters() for o in owners.get(id(p), []) if o not in own})
        parent = named[name.rpartition(".")[0]] if "." in name else model
        reason = unfuse_reason(mod, parent, [a for a in aliases.get(id(mod), []) if a != name], shared)
        if reason is not None:
            left[name] = f"nn.MultiheadAttention left fused: {reason}"
            continue
        replace_module(model, name, UnfusedMultiheadAttention.from_attention(mod))
        done.append(name)
    return done, left


def unfuse_named(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Unfuse the ``nn.MultiheadAttention`` modules of ``model`` at ``names`` (in place); the ones it changed.

    A name that already holds an :class:`UnfusedMultiheadAttention` is left alone; any other
    module there is a ``ValueError`` (the plan was made for another architecture).
    """
    changed = []
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the plan unfuses the attention {name!r}, which this model does not have") from None
        if isinstance(mod, UnfusedMultiheadAttention):
            continue
        if not isinstance(mod, nn.MultiheadAttention):
            raise ValueError(f"the plan unfuses the attention {name!r}, but this model has a "
                             f"{type(mod).__name__} there")
        replace_module(model, name, UnfusedMultiheadAttention.from_attention(mod))
        changed.append(name)
    return changed


def refuse_attention(model: nn.Module, names: Iterable[str], keep: Iterable[str]) -> list[str]:
    """Turn the :class:`UnfusedMultiheadAttention` at each of ``names`` back into ``nn.MultiheadAttention`` (in place)
    unless a layer named in ``keep`` (the compressed ones) lies inside it; the names turned back."""
    keep = list(keep)
    back = []
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, UnfusedMultiheadAttention):
            continue
        if any(k.startswith(name + ".") for k in keep):
            continue
        if not all(isinstance(getattr(mod, p), nn.Linear) for p in PROJECTIONS):
            continue
        replace_module(model, name, mod.to_attention())
        back.append(name)
    return back
