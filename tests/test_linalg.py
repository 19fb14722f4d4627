"""The shared linear algebra (autorank.linalg) and the deprecated import paths of moved names."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from autorank import linalg

SHAPES = [("wide", (5, 9)), ("tall", (9, 5)), ("square", (6, 6)), ("batched-wide", (3, 4, 7)),
          ("batched-tall", (3, 7, 4))]


@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=[n for n, _ in SHAPES])
def test_singular_values_match_an_svd(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = linalg.singular_values(a)
    assert s.shape == (*shape[:-2], min(shape[-2:]))
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linalg.singular_values(a, threads=True), s, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)], ids=["wide", "tall"])
def test_gram_eigh_gives_the_singular_subspace_of_the_smaller_side(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    evals, evecs, left = linalg.gram_eigh(a)
    assert left == (shape[0] <= shape[1])
    assert evecs.shape[0] == min(shape)
    torch.testing.assert_close(evals.flip(-1).clamp_min(0).sqrt(), torch.linalg.svdvals(a), rtol=1e-10, atol=1e-12)
    side = a @ a.T if left else a.T @ a
    torch.testing.assert_close(side @ evecs, evecs * evals, rtol=1e-9, atol=1e-9)


def test_eigh_desc_is_descending_and_clamped():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    lam = torch.tensor([3.0, 2.0, 1.0, 0.0, -1e-3], dtype=torch.float64)
    evals, evecs = linalg.eigh_desc((q * lam) @ q.T)
    torch.testing.assert_close(evals, lam.clamp_min(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(evecs.abs(), q.abs(), rtol=0, atol=1e-10)


def test_split_columns_rejects_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="groups=3 does not divide the 8 input columns"):
        linalg.split_columns(torch.randn(4, 8), 3)


MOVED = [
    ("autorank.modules", "GroupedLowRankLinear", "autorank.families.alds"),
    ("autorank.modules", "GroupedLowRankConv", "autorank.families.alds"),
    ("autorank.modules", "LowRankEmbedding", "autorank.families.alds"),
    ("autorank.modules", "dense_from_factors", "autorank.families.alds"),
    ("autorank.modules", "grouped_low_rank_factors", "autorank.linalg"),
    ("autorank.curves", "group_singular_values", "autorank.families.alds"),
    ("autorank.curves", "grouped_error_curves", "autorank.families.alds"),
    ("autorank.curves", "alds_cost", "autorank.families.alds"),
    ("autorank.curves", "divisors_upto", "autorank.families.alds"),
    ("autorank.calibration", "whitened_factors", "autorank.linalg"),
    ("autorank.calibration", "whitened_factors_cholesky", "autorank.linalg"),
    ("autorank.calibration", "output_roots", "autorank.linalg"),
    ("autorank.calibration", "OUTPUT_DAMPING", "autorank.linalg"),
    ("autorank.calibration", "whitened_error_curve", "autorank.families.alds"),
    ("autorank.families.spatial", "conv_out_size", "autorank.families.conv"),
    ("autorank.families.spatial", "supports_multi_tap_conv", "autorank.families.conv"),
]
# moved names the old module still imports for its own use: the old path gives the same object
STILL_IMPORTED = [
    ("autorank.families.spatial", name, "autorank.families.conv")
    for name in ("Conv2dGeometry", "conv2d_geometry", "call_flops", "dense_conv", "as_pair", "require_geometry")
] + [("autorank.families.tucker", name, "autorank.families.conv") for name in ("leading_left", "unfold_in", "unfold_out")]


@pytest.mark.parametrize("old,name,new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_import_paths_warn_and_give_the_same_object(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{name} has moved to {new}"):
        obj = getattr(importlib.import_module(old), name)
    assert obj is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old,name,new", STILL_IMPORTED, ids=[f"{o}.{n}" for o, n, _ in STILL_IMPORTED])
def test_old_paths_of_names_still_imported_give_the_same_object(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        importlib.import_module("autorank.modules").nope


def test_candidate_columns_is_one_class_wherever_it_is_imported():
    from autorank.curves import CandidateColumns as from_curves
    from autorank.families import CandidateColumns as from_families
    from autorank.families.base import CandidateColumns

    assert from_curves is from_families is CandidateColumns


def test_autorank_errors_is_a_deprecated_alias_of_measures():
    import autorank
    import autorank.measures

    sys.modules.pop("autorank.errors", None)  # as if never imported: the package attribute and the module
    vars(autorank).pop("errors", None)
    with pytest.warns(DeprecationWarning, match="autorank.measures") as caught:
        errors = autorank.errors  # through autorank.__getattr__, which imports the alias module
    assert len(caught) == 2  # the package's __getattr__ and the alias module's import
    assert errors is sys.modules["autorank.errors"]
    assert errors.relative_errors is autorank.measures.relative_errors
    assert errors.__all__ == autorank.measures.__all__
    assert "measures" in autorank.__all__ and "errors" not in autorank.__all__
