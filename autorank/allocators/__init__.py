"""Allocators: rules that pick one candidate per layer from the curves under a budget (the global step).

An allocator is a plain function ``allocator(ctx) -> {layer: candidate index}`` of an
:class:`AllocationContext` that keeps ``fixed + sum(cost) <= budget * total``; register
your own with :func:`register_allocator`.  The files:

* :mod:`~autorank.allocators.base` -- the context, the registry, :func:`allocate` and
  :func:`solve_curves` (the exact ALDS step).
* :mod:`~autorank.allocators.alds` -- ``"alds"`` (default) and ``"alds_output"``.
* :mod:`~autorank.allocators.uniform` -- ``"uniform"``: one rank fraction everywhere.
* :mod:`~autorank.allocators.llm` -- ``"svd_llm"``: one parameter ratio per matrix (SVD-LLM).
* :mod:`~autorank.allocators.spectral` -- ``"svd_energy"``, ``"lrank"``, ``"vbmf"``, ``"pca"``.
* :mod:`~autorank.allocators.evaluated` -- ``"sensitivity"`` (scores the model).
* :mod:`~autorank.allocators.ranks` -- plain-SVD rank tables and the bisections the baselines share.
* :mod:`~autorank.allocators.cache` -- the sensitivity table's on-disk cache and fingerprints.
"""

from __future__ import annotations

from .base import (AllocationContext, Allocator, allocate, available_allocators, get_allocator,
                   register_allocator, resolve_allocator, solve_curves)
from .ranks import RankTable, bisect_sorted, bisect_threshold, rank_table, rank_tables
from .cache import model_fingerprint
from .spectral import (layer_spectrum, lrank_allocation, lrank_choice, pca_allocation, svd_energy_allocation,
                       vbmf_allocation, vbmf_ranks)
from .evaluated import DEFAULT_RATIOS, fidelity_score, output_gains, sensitivity_allocation, sensitivity_table
from .alds import alds_allocation, alds_output_allocation
from .uniform import uniform_allocation
from .llm import svd_llm_allocation, svd_llm_rank

__all__ = [
    "AllocationContext", "Allocator", "register_allocator", "get_allocator", "resolve_allocator",
    "available_allocators", "allocate", "solve_curves",
    "alds_allocation", "alds_output_allocation", "uniform_allocation", "svd_llm_allocation", "svd_llm_rank",
    "svd_energy_allocation", "lrank_choice", "lrank_allocation", "vbmf_ranks", "vbmf_allocation",
    "pca_allocation", "sensitivity_allocation",
    "layer_spectrum", "RankTable", "rank_table", "rank_tables", "bisect_threshold", "bisect_sorted",
    "fidelity_score", "model_fingerprint", "sensitivity_table", "output_gains", "DEFAULT_RATIOS",
]
