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

__all__ = ["Family", "register_family", "get_family", "available_families", "family_options", "output_kwargs"]


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
        ``||(W - W_hat) X||_F / ||W X||_F``).  See :mod:`autorank.errors`.
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


def output_kwargs(family: Family, output: Any) -> dict[str, Any]:
    """``{"output": output}`` for a family that takes output moments (and one is given), else ``{}``."""
    return {"output": output} if family.fits_output and output is not None else {}


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


# the built-in families register themselves on import
from . import alds as _alds  # noqa: E402,F401
from . import alrf as _alrf  # noqa: E402,F401
from . import cp as _cp  # noqa: E402,F401
from . import sparse_lowrank as _sparse_lowrank  # noqa: E402,F401
from . import spatial as _spatial  # noqa: E402,F401
from . import tt as _tt  # noqa: E402,F401
from . import tucker as _tucker  # noqa: E402,F401
