"""Decomposition families: one file per family, the shared parts in :mod:`.base` and :mod:`.conv`.

A family turns one dense layer into candidates (error and cost of each) and
realises a chosen candidate as modules.  Adding a family touches one file: write
the four functions of :class:`Family` and call :func:`register_family`
(see ``docs/adding_a_family.md``).

* :mod:`.base`: :class:`Family`, :class:`CandidateColumns` (:class:`CostColumns`), the registry functions,
  :func:`family_options`, :func:`output_kwargs`;
* :mod:`.conv`: the 2-D convolution geometry and tensor unfoldings the convolution
  families share;
* :mod:`.memo`: the per-compression memo of kernel decompositions (the candidates compute
  them, every build reads them back);
* the families: :mod:`.alds` (grouped low-rank SVD), :mod:`.alrf`, :mod:`.cp`,
  :mod:`.sparse_lowrank`, :mod:`.spatial` (spatial SVD), :mod:`.tt`, :mod:`.tucker` (Tucker-2);
* :mod:`.attention`: ``nn.MultiheadAttention`` as four Linear layers (q, k, v, out), which every
  Linear family then factorises (it registers no family of its own).
"""

from __future__ import annotations

from .base import (CandidateColumns, CostColumns, Family, available_families, family_options, get_family,
                   output_kwargs, register_family)

# the built-in families register themselves on import
from . import alds as _alds  # noqa: E402,F401
from . import alrf as _alrf  # noqa: E402,F401
from . import cp as _cp  # noqa: E402,F401
from . import sparse_lowrank as _sparse_lowrank  # noqa: E402,F401
from . import spatial as _spatial  # noqa: E402,F401
from . import tt as _tt  # noqa: E402,F401
from . import tucker as _tucker  # noqa: E402,F401

__all__ = ["CostColumns", "CandidateColumns", "Family", "register_family", "get_family", "available_families", "family_options",
           "output_kwargs"]
