"""Decomposition families: the :class:`Family` record, its candidate columns and the registry.

A family turns one dense layer into candidates (error and cost of each) and
realises a chosen candidate as modules.  Adding a family touches one file: write
the four functions of :class:`Family` and call :func:`register_family`.  The
entries live in :data:`autorank.registry.FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ..layers import get_layer_handler
from ..registry import FAMILIES

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from ..config import CurveConfig
    from ..graph import LayerInfo

__all__ = ["CostColumns", "CandidateColumns", "Family", "supports_kinds", "register_family", "get_family",
           "available_families", "family_options", "output_kwargs"]


@dataclass(kw_only=True)
class CostColumns:
    """The error and cost of each candidate, as parallel numpy columns of equal length (keyword-only fields).

    ``error``: in the shared measure (:mod:`autorank.measures`); ``error_lower``: a lower
    bound of it (``error`` again where it is exact); ``params`` and ``flops``: the
    realised module's parameters and multiply-accumulates.
    """

    error: np.ndarray
    error_lower: np.ndarray
    params: np.ndarray
    flops: np.ndarray

    def __len__(self) -> int:
        return len(self.error)


@dataclass
class CandidateColumns(CostColumns):
    """Candidates of one family for one layer, as parallel columns.

    ``hyper`` holds the family's hyperparameter columns (for ALDS ``groups`` and ``rank``).
    """

    hyper: dict[str, np.ndarray]


@dataclass(frozen=True)
class Family:
    """One decomposition family.

    supports:
        ``(module, info) -> bool``: can this family factorise this layer?
    candidates:
        ``(module, info, config, moment) -> CandidateColumns``: every candidate with
        its error and its parameter and FLOP cost (without "dense").  ``moment`` is
        None (weight-only: the error is the relative operator-norm error
        ``||W - W_hat||_2 / ||W||_2`` of the ``f x c*K`` weight matrix) or the layer's
        input second moment ``M`` (``n x n`` float64; data-aware: the error is
        ``||(W - W_hat) X||_F / ||W X||_F``).  See :mod:`autorank.measures`.
    realize:
        ``(module, hyper, moment) -> nn.Module``: the factorised module, initialised
        from ``module``'s weights (fitted to the data when ``moment`` is given and the
        family can use it); ``hyper`` is the candidate's hyperparameters (for ALDS
        ``{"groups": k, "rank": j}``).  It must be an instance of
        :class:`autorank.modules.Factorized` whose ``to_dense()`` returns the
        equivalent dense layer (the cascade scheduler re-factorises through it;
        :func:`autorank.realize` checks this).
    skeleton:
        ``(module, hyper) -> nn.Module``: the same module structure with
        uninitialised weights (used by ``autorank.load``).
    fits_data:
        ``realize`` fits the factors to the data when given a moment (the minimiser of
        ``tr((W - W_hat) M (W - W_hat)^T)`` over the family's structure), so the
        sequential refit (:mod:`autorank.sequential`) can re-fit its layers.
    fits_output:
        ``candidates`` and ``realize`` accept a keyword ``output``: the layer's output
        moment ``G`` (``f x f``, :func:`autorank.calibration.collect_output_moments`),
        and then measure and minimise the output-weighted error
        ``tr((W - W_hat) M (W - W_hat)^T G)``.  Families without it are given the input
        moment alone.
    needs_finetune:
        the family's candidates are only worth their cost after fine-tuning (ALRF);
        their error is that of the module as initialised.
    description:
        one line for listings.
    """

    name: str
    supports: Callable[["nn.Module", "LayerInfo"], bool]
    candidates: Callable[["nn.Module", "LayerInfo", "CurveConfig", Any], "CandidateColumns"]
    realize: Callable[["nn.Module", dict[str, Any], Any], "nn.Module"]
    skeleton: Callable[["nn.Module", dict[str, Any]], "nn.Module"]
    needs_finetune: bool = False
    description: str = ""
    fits_data: bool = False
    fits_output: bool = False

    @classmethod
    def from_build(cls, name: str, supports: Callable[["nn.Module", "LayerInfo"], bool],
                   candidates: Callable[..., "CandidateColumns"], build: Callable[..., "nn.Module"],
                   **fields: Any) -> "Family":
        """The family whose ``realize`` and ``skeleton`` are one ``build(module, hyper, moment=None, init=True)``.

        ``realize(module, hyper, moment=None, **kw) = build(module, hyper, moment, init=True, **kw)``
        (``kw`` is ``output=G`` for a ``fits_output`` family) and
        ``skeleton(module, hyper) = build(module, hyper, init=False)``; ``fields``: the other
        fields (``description``, ``fits_data``, ...).
        """
        return cls(name=name, supports=supports, candidates=candidates,
                   realize=lambda module, hyper, moment=None, **kw: build(module, hyper, moment, init=True, **kw),
                   skeleton=lambda module, hyper: build(module, hyper, init=False), **fields)


def supports_kinds(kinds: Iterable[str]) -> Callable[["nn.Module", "LayerInfo"], bool]:
    """A ``supports`` that accepts the layers whose handler kind (:mod:`autorank.layers`) is in ``kinds``."""
    kinds = frozenset(kinds)

    def supports(module: "nn.Module", info: "LayerInfo") -> bool:
        handler = get_layer_handler(module)
        return handler is not None and handler.kind in kinds

    return supports


def output_kwargs(family: Family, output: Any) -> dict[str, Any]:
    """``{"output": output}`` for a family that takes output moments (and one is given), else ``{}``."""
    return {"output": output} if family.fits_output and output is not None else {}


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` (replacing one of the same name)."""
    if not isinstance(family, Family):
        raise TypeError(f"family must be an autorank.families.Family, got {type(family).__name__}")
    if family.name == "dense":
        raise ValueError("'dense' is reserved for the uncompressed candidate")
    return FAMILIES.register(family.name, family)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ``ValueError`` naming the available ones if there is none."""
    return FAMILIES.get(name)


def available_families() -> list[str]:
    """Names of the registered decomposition families."""
    return FAMILIES.names()


def family_options(config: "CurveConfig", family: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``config.options[family]``; unknown option names raise ValueError.

    Each value must have the type of its default (ints are accepted for floats).
    """
    given = config.family_options(family)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"CurveConfig.options[{family!r}]: unknown option(s) {unknown}; "
                         f"{family} accepts {sorted(defaults)}")
    out = dict(defaults)
    for key, val in given.items():
        want = type(defaults[key])
        ok = isinstance(val, want) and not (want is not bool and isinstance(val, bool))
        if want is float and isinstance(val, int) and not isinstance(val, bool):
            ok, val = True, float(val)
        if defaults[key] is None:
            ok = True
        if not ok:
            raise TypeError(f"CurveConfig.options[{family!r}][{key!r}] must be a {want.__name__}, got {val!r}")
        out[key] = val
    return out
