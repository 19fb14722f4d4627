"""The base of every factorised module autorank builds.

Each family's modules live in its own file (the ALDS ones,
:class:`~autorank.families.alds.GroupedLowRankLinear`,
:class:`~autorank.families.alds.GroupedLowRankConv` and
:class:`~autorank.families.alds.LowRankEmbedding`, in :mod:`autorank.families.alds`);
they all derive from :class:`Factorized`, so the realiser, the sequential refit and
the retraining scheduler can treat them alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._util import moved_names

__all__ = ["Factorized"]

# the ALDS modules moved to autorank.families.alds, their factors to autorank.linalg (deprecated here)
__getattr__ = moved_names(__name__, {
    **dict.fromkeys(("GroupedLowRankLinear", "GroupedLowRankConv", "LowRankEmbedding", "dense_from_factors"),
                    "autorank.families.alds"),
    "grouped_low_rank_factors": "autorank.linalg",
})


class Factorized:
    """Marker base of every factorised module autorank builds.

    Subclasses implement ``to_dense()``, returning the equivalent dense layer;
    the retraining scheduler uses it to re-factorise layers that are already
    factorised (cascade mode).
    """

    def to_dense(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def output_bias(self) -> torch.Tensor | None:
        """The bias parameter added last to the output, or None (no bias, or none that shifts the
        output alone).  The sequential refit moves it to re-centre the layer's outputs."""
        return None
