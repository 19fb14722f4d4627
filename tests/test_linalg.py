"""The shared linear algebra (autorank.linalg) and the deprecated import paths of moved names."""

from __future__ import annotations

import importlib
import sys

import numpy as np
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


# ---- tall layers in input space (f > n/k): the same curves and factors without an f x n float64 copy ----

TALL = [  # (f, n, groups, rank of the inputs or None for full)
    (40, 16, 1, None), (40, 16, 2, None), (40, 16, 4, 3), (33, 32, 8, 5), (64, 8, 1, 2),
]


def _explicit(monkeypatch, fn, *args):
    """``fn(*args)`` with the tall-layer formulas switched off (the f x n computation)."""
    from autorank.families import alds

    with monkeypatch.context() as mp:
        mp.setattr(alds, "is_tall", lambda *a, **k: False)
        mp.setattr(linalg, "is_tall", lambda *a, **k: False)
        return fn(*args)


@pytest.mark.parametrize("f,n,k,data_rank", TALL, ids=[f"{f}x{n}-k{k}-r{r}" for f, n, k, r in TALL])
def test_tall_layers_give_the_explicit_errors_and_factors(f, n, k, data_rank, monkeypatch):
    from autorank.families.alds import whitened_error_curve

    torch.manual_seed(0)
    w = torch.randn(f, n)
    x = torch.randn(300, n if data_rank is None else data_rank)
    if data_rank is not None:  # inputs in a low-rank subspace: a singular moment, no NaN and no failure
        x = x @ torch.randn(data_rank, n)
    x = x.double()
    m = x.T @ x / 300
    assert linalg.is_tall(w, m, k)
    err, spec = whitened_error_curve(w, m, k)
    err0, spec0 = _explicit(monkeypatch, whitened_error_curve, w, m, k)
    assert np.isfinite(err).all() and np.abs(err - err0).max() < 1e-10
    np.testing.assert_allclose(spec, spec0, rtol=1e-9, atol=1e-9 * spec0[0])
    rank = max(1, min(f, n // k) // 2)
    a, b = linalg.whitened_factors(w, m, k, rank)
    a0, b0 = _explicit(monkeypatch, linalg.whitened_factors, w, m, k, rank)
    prod = torch.cat([b[i] @ a[i] for i in range(k)], 1)
    prod0 = torch.cat([b0[i] @ a0[i] for i in range(k)], 1)
    assert torch.isfinite(prod).all() and float((prod - prod0).norm() / prod0.norm()) < 1e-10
    # and the curve is the measured error of those factors: ||(W - W_hat) X|| / ||W X||
    measured = float(((w.double() - prod) @ x.T).norm() / (w.double() @ x.T).norm())
    assert measured == pytest.approx(float(err[rank - 1]), abs=1e-7)  # (directions under 1e-7 sigma_1 are cut)


def test_column_gram_and_rows_matmul_work_in_chunks_of_rows():
    torch.manual_seed(0)
    w = torch.randn(10, 4)
    torch.testing.assert_close(linalg.column_gram(w, chunk=3), w.double().T @ w.double())
    b = torch.randn(4, 2, dtype=torch.float64)
    out = linalg.rows_matmul(w, b, torch.float32, chunk=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (w.double() @ b).float())


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
