"""Deprecated: the baseline allocators moved to :mod:`autorank.allocators`.

``autorank.baselines`` re-exports them for old code: the spectral rules from
:mod:`autorank.allocators.spectral`, the evaluation-driven ones from
:mod:`autorank.allocators.evaluated`, ``alds_output`` from :mod:`autorank.allocators.alds`,
the rank tables and bisections from :mod:`autorank.allocators.ranks` and the model
fingerprint from :mod:`autorank.allocators.cache`.  Nothing inside autorank imports it.
"""

from __future__ import annotations

import warnings

from .allocators.alds import alds_output_allocation
from .allocators.cache import model_fingerprint
from .allocators.evaluated import (DEFAULT_RATIOS, fidelity_score, output_gains, sensitivity_allocation,
                                   sensitivity_table)
from .allocators.ranks import RankTable, bisect_sorted, bisect_threshold, rank_table, rank_tables
from .allocators.spectral import (layer_spectrum, lrank_allocation, lrank_choice, pca_allocation,
                                  svd_energy_allocation, vbmf_allocation, vbmf_ranks)

warnings.warn("autorank.baselines is deprecated; import the allocators from autorank.allocators",
              DeprecationWarning, stacklevel=2)

__all__ = [
    "RankTable",
    "layer_spectrum",
    "rank_table",
    "rank_tables",
    "bisect_threshold",
    "bisect_sorted",
    "svd_energy_allocation",
    "lrank_choice",
    "lrank_allocation",
    "vbmf_ranks",
    "vbmf_allocation",
    "pca_allocation",
    "fidelity_score",
    "model_fingerprint",
    "sensitivity_table",
    "sensitivity_allocation",
    "output_gains",
    "alds_output_allocation",
    "DEFAULT_RATIOS",
]
