"""Realised factorised layers: exactness at full rank, and predicted vs measured error."""

import math

import pytest
import torch
import torch.nn as nn

from autorank.families.alds import (GroupedLowRankConv, GroupedLowRankLinear, group_singular_values,
                                    grouped_error_curves)
from autorank.linalg import grouped_low_rank_factors

LAYERS = [
    ("linear", lambda: nn.Linear(24, 16), lambda: torch.randn(5, 24)),
    ("linear_nobias_3d", lambda: nn.Linear(24, 40, bias=False), lambda: torch.randn(2, 7, 24)),
    ("conv1d", lambda: nn.Conv1d(8, 12, 5, padding=2), lambda: torch.randn(2, 8, 30)),
    ("conv1d_circular_stride", lambda: nn.Conv1d(8, 12, 3, stride=2, padding=1, padding_mode="circular"),
     lambda: torch.randn(2, 8, 21)),
    ("conv2d", lambda: nn.Conv2d(8, 6, 3, padding=1), lambda: torch.randn(2, 8, 9, 9)),
    ("conv2d_stride_dil", lambda: nn.Conv2d(4, 10, (3, 5), stride=(2, 1), padding=(2, 1), dilation=2),
     lambda: torch.randn(2, 4, 13, 11)),
    ("conv2d_1x1_nobias", lambda: nn.Conv2d(16, 32, 1, bias=False), lambda: torch.randn(2, 16, 5, 5)),
]


def factorise(layer, rank, groups):
    if isinstance(layer, nn.Linear):
        return GroupedLowRankLinear.from_dense(layer, rank, groups)
    return GroupedLowRankConv.from_dense(layer, rank, groups)


def matrix(layer):
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).double()


def in_channels(layer):
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("name,make,inp", LAYERS, ids=[l[0] for l in LAYERS])
def test_full_rank_reproduces_outputs(name, make, inp, groups):
    layer = make().double()
    x = inp().double()
    f, n = matrix(layer).shape
    full = min(f, n // groups)
    new = factorise(layer, full, groups)
    ref, out = layer(x), new(x)
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 1e-5
    # and in float32, the dtype users have
    layer32, new32 = layer.float(), factorise(layer.float(), full, groups)
    ref32 = layer32(x.float())
    assert (new32(x.float()) - ref32).norm() / ref32.norm() < 1e-5


@pytest.mark.parametrize("name,make,inp", LAYERS, ids=[l[0] for l in LAYERS])
def test_to_dense_round_trip(name, make, inp):
    layer = make().double()
    new = factorise(layer, 2, 2)
    dense = new.to_dense()
    x = inp().double()
    assert type(dense) is type(layer)
    assert torch.allclose(dense(x), new(x), atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("name,make,inp", LAYERS, ids=[l[0] for l in LAYERS])
def test_predicted_error_matches_realised_layer(name, make, inp, groups):
    """k = 1: predicted == measured; k > 1: lower <= measured <= upper (the documented bracket)."""
    layer = make().double()
    w = matrix(layer)
    f, n = w.shape
    s = group_singular_values(w, groups).numpy()
    sigma1 = float(torch.linalg.matrix_norm(w, ord=2))
    upper, lower = grouped_error_curves(s, sigma1)
    for rank in range(1, min(f, n // groups) + 1):
        approx = matrix(factorise(layer, rank, groups).to_dense())
        measured = float(torch.linalg.matrix_norm(w - approx, ord=2)) / sigma1
        if groups == 1:
            assert measured == pytest.approx(upper[rank - 1], rel=1e-6, abs=1e-9)
            assert lower[rank - 1] == pytest.approx(upper[rank - 1])
        else:
            assert lower[rank - 1] - 1e-9 <= measured <= upper[rank - 1] + 1e-9
            assert upper[rank - 1] <= math.sqrt(groups) * lower[rank - 1] + 1e-9


def test_factor_shapes_and_params():
    layer = nn.Conv2d(8, 6, 3, padding=1)
    new = GroupedLowRankConv.from_dense(layer, rank=2, groups=4)
    assert new.first.weight.shape == (8, 2, 3, 3)  # c -> k*j with c/k inputs per group
    assert new.first.groups == 4 and new.first.bias is None
    assert new.second.weight.shape == (6, 8, 1, 1)
    # j * (c*K + k*f) + bias
    assert sum(p.numel() for p in new.parameters()) == 2 * (8 * 9 + 4 * 6) + 6


@pytest.mark.parametrize("rank,groups,err", [(0, 1, "rank must be"), (9, 1, "rank must be"), (2, 3, "groups=3")])
def test_bad_factor_arguments(rank, groups, err):
    with pytest.raises(ValueError, match=err):
        grouped_low_rank_factors(torch.randn(8, 8), groups, rank)


def test_depthwise_conv_is_refused():
    with pytest.raises(ValueError, match="groups=1"):
        GroupedLowRankConv.from_dense(nn.Conv2d(4, 4, 3, groups=4), 1)
