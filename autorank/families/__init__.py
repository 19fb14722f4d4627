"""Decomposition families: the registry.

A family turns one dense layer into candidates (error and cost of each) and
realises a chosen candidate as modules.  Adding a family touches one file: write
the four functions of :class:`Family` and call :func:`register_family`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from ..config import CurveConfig
    from ..curves import CandidateColumns
    from ..graph import LayerInfo

__all__ = ["Family", "register_family", "get_family", "available_families"]


@dataclass(frozen=True)
class Family:
    """One decomposition family.

    supports:
        ``(module, info) -> bool``: can this family factorise this layer?
    candidates:
        ``(module, info, config) -> CandidateColumns``: every candidate with its
        predicted error and its parameter and FLOP cost (without "dense").
    realize:
        ``(module, hyper) -> nn.Module``: the factorised module, initialised
        from ``module``'s weights; ``hyper`` is the candidate's hyperparameters
        (for ALDS ``{"groups": k, "rank": j}``).  It must be an instance of
        :class:`autorank.modules.Factorized` whose ``to_dense()`` returns the
        equivalent dense layer (the cascade scheduler re-factorises through it;
        :func:`autorank.realize` checks this).
    skeleton:
        ``(module, hyper) -> nn.Module``: the same module structure with
        uninitialised weights (used by ``autorank.load``).
    """

    name: str
    supports: Callable[["nn.Module", "LayerInfo"], bool]
    candidates: Callable[["nn.Module", "LayerInfo", "CurveConfig"], "CandidateColumns"]
    realize: Callable[["nn.Module", dict[str, Any]], "nn.Module"]
    skeleton: Callable[["nn.Module", dict[str, Any]], "nn.Module"]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` (replacing one of the same name)."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be an autorank.families.Family, got {type(family).__name__}")
    if family.name == "dense":
        raise ValueError("'dense' is reserved for the uncompressed candidate")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown decomposition family {name!r}; available: {available_families()}") from None


def available_families() -> list[str]:
    """Names of the registered decomposition families."""
    return sorted(_FAMILIES)


from . import alds as _alds  # noqa: E402,F401  (registers the built-in family)
