"""Realisation: turn a plan into real modules."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import torch.nn as nn

from ._util import parallel_map
from .families import get_family, output_kwargs
from .families.attention import unfuse_named
from .graph import replace_module
from .modules import Factorized
from .plan import Plan

__all__ = ["realize", "replace_module", "densify"]


def realize(
    model: nn.Module,
    plan: Plan,
    inplace: bool = False,
    init: bool = True,
    layers: Iterable[str] | None = None,
    moments: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace every compressed layer of ``plan`` in ``model`` by its factorised modules.

    Args:
        model: the dense model the plan was made for.
        plan: the plan.
        inplace: modify ``model`` itself instead of a deep copy.
        init: initialise the factors from the dense weights (truncated SVD); with
            ``False`` only the module structure is built (``autorank.load`` then
            fills in the saved weights).
        layers: restrict to these layer names.
        moments: ``{layer: Moments}`` of calibration data; families that can use them
            fit the factors to the data (e.g. the whitened SVD of ALDS), and to the output
            moments too where ``Moments.output`` is set and the family ``fits_output``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    out = model if inplace else copy.deepcopy(model)
    # the attention modules whose projections the plan names: as four Linear children first
    unfuse_named(out, plan.attention)
    wanted = None if layers is None else set(layers)
    todo = []
    for name, lp in plan.layers.items():
        if not lp.compressed or (wanted is not None and name not in wanted):
            continue
        try:
            old = out.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the plan names layer {name!r}, which this model does not have") from None
        family = get_family(lp.family)
        mom = (moments or {}).get(name)
        if not init:
            todo.append((name, old, lp.hyper, family.skeleton))
        elif mom is None:
            todo.append((name, old, lp.hyper, family.realize))
        else:
            todo.append((name, old, lp.hyper,
                         lambda m, h, f=family, mm=mom.matrix, kw=output_kwargs(family, mom.output_matrix):
                         f.realize(m, h, mm, **kw)))
    # the factorisations are independent: compute them in parallel, then swap the modules in
    built = parallel_map(lambda t: t[3](t[1], t[2]), todo,
                         weight=lambda t: sum(p.numel() for p in t[1].parameters()))
    for (name, old, hyper, _), new in zip(todo, built):
        if not isinstance(new, Factorized):
            raise TypeError(
                f"family {plan.layers[name].family!r} built a {type(new).__name__} for {name!r}; a family must "
                "return an autorank.modules.Factorized module with to_dense()"
            )
        new.train(old.training)
        replace_module(out, name, new)
    return out


def densify(model: nn.Module) -> nn.Module:
    """Replace every factorised module in ``model`` (in place) by its exact dense product.

    The product of trained factors is a dense matrix of rank ``<= k*j``; its
    re-factorisation by truncated SVD is optimal for that product, and lets the
    next allocation re-choose ``k`` and ``j`` against the original model's budget.
    Returns ``model``.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, Factorized)]
    for name in names:
        old = model.get_submodule(name)
        new = old.to_dense()
        new.train(old.training)
        replace_module(model, name, new)
    return model
