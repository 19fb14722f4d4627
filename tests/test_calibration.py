"""Data-aware curves: streamed moments, im2col rows, the whitened truncation and its exact errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import minimize

import autorank
from autorank.calibration import collect_moments, layer_inputs
from autorank.families.alds import whitened_error_curve
from autorank.linalg import whitened_factors, whitened_factors_cholesky
from tests.tiny_models import build

CONVS = [
    ("conv2d-plain", nn.Conv2d(3, 5, 3), (2, 3, 7, 6)),
    ("conv2d-stride-pad-dil", nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 4, 9, 8)),
    ("conv2d-circular", nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 5, 5)),
    ("conv2d-reflect", nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (1, 2, 6, 6)),
    # an even kernel with padding="same" pads asymmetrically (the case under test); torch's reference
    # forward then warns that it copies the input, which says nothing about autorank
    pytest.param("conv2d-same", nn.Conv2d(2, 3, (3, 4), padding="same"), (1, 2, 6, 7),
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")),
    ("conv1d-stride", nn.Conv1d(3, 4, 5, stride=2, padding=2), (2, 3, 11)),
    ("conv1d-circular", nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 8)),
]


@pytest.mark.parametrize("name,conv,shape", CONVS, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CONVS])
def test_im2col_rows_reproduce_the_convolution(name, conv, shape):
    """W @ row equals the conv output (minus bias) at every position: the column order matches the weight."""
    x = torch.randn(shape)
    kind = "conv1d" if isinstance(conv, nn.Conv1d) else "conv2d"
    rows = layer_inputs(conv, x, kind)
    w = conv.weight.reshape(conv.out_channels, -1)
    y = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    expect = y.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    torch.testing.assert_close(rows @ w.T, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name", ["mlp", "residual_cnn", "conv1d"])
def test_streamed_moments_equal_the_batch_computation(model_name):
    model, x = build(model_name)
    graph = autorank.analyze(model, x)
    batches = [torch.randn_like(x) for _ in range(3)]
    streamed = collect_moments(model, graph.layers, batches)
    whole = collect_moments(model, graph.layers, [torch.cat(batches)])
    assert set(streamed) == set(graph.layers)
    for name in graph.layers:
        assert streamed[name].count == whole[name].count
        torch.testing.assert_close(streamed[name].matrix, whole[name].matrix, atol=1e-10, rtol=1e-9)
    # against an explicit X^T X of the rows seen by one layer
    name = next(iter(graph.layers))
    rows = []
    h = dict(model.named_modules())[name].register_forward_pre_hook(
        lambda m, a: rows.append(layer_inputs(m, a[0], graph.layers[name].kind)))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    r = torch.cat(rows).double()
    torch.testing.assert_close(streamed[name].matrix, r.T @ r / r.shape[0], atol=1e-10, rtol=1e-9)


def test_masked_positions_are_left_out():
    lin = nn.Linear(4, 3)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, attention_mask):
            return self.lin(x)

    model = Wrap()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    graph = autorank.analyze(model, {"x": x, "attention_mask": mask})
    mom = collect_moments(model, graph.layers, [{"x": x, "attention_mask": mask}])["lin"]
    kept = x[mask.bool()].double()
    assert mom.count == 8
    torch.testing.assert_close(mom.matrix, kept.T @ kept / 8)


def _data_error(w, what, x):
    return float(((w - what) @ x).norm() / (w @ x).norm())


@pytest.mark.parametrize("f,n,samples,groups", [(5, 6, 20, 1), (6, 8, 30, 2), (4, 12, 40, 4), (8, 4, 25, 1),
                                               (6, 8, 5, 2)],
                         ids=["wide", "grouped2", "grouped4", "tall", "rank-deficient-grouped"])
def test_predicted_data_error_equals_measured(f, n, samples, groups):
    """The exact curve (cross-group terms included) equals the error of the realised factors, for every rank."""
    g = torch.Generator().manual_seed(f * n + groups)
    w = torch.randn(f, n, dtype=torch.float64, generator=g)
    x = torch.randn(n, samples, dtype=torch.float64, generator=g) * torch.linspace(0.2, 2, n, dtype=torch.float64)[:, None]
    m = x @ x.T / samples
    errors, _ = whitened_error_curve(w, m, groups)
    assert len(errors) == min(f, n // groups)
    for j in range(1, len(errors) + 1):
        a, b = whitened_factors(w, m, groups, j)
        what = torch.cat([b[i] @ a[i] for i in range(groups)], dim=1)
        assert errors[j - 1] == pytest.approx(_data_error(w, what, x), abs=1e-7)
    assert np.all(np.diff(errors) <= 1e-12)  # more rank never hurts


@pytest.mark.parametrize("seed", range(4))
def test_whitened_truncation_is_optimal_against_brute_force(seed):
    """No rank-j matrix found by a numerical optimiser from many starts beats the whitened truncation."""
    rng = np.random.default_rng(seed)
    f, n, j = 3, 4, 1
    w = rng.standard_normal((f, n))
    x = rng.standard_normal((n, 9)) * np.array([3.0, 1.0, 0.3, 0.1])[:, None]
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    a, b = whitened_factors(wt, xt @ xt.T, 1, j)
    ours = _data_error(wt, b[0] @ a[0], xt)

    def loss(p):
        u, v = p[: f * j].reshape(f, j), p[f * j:].reshape(j, n)
        return float(np.linalg.norm((w - u @ v) @ x) / np.linalg.norm(w @ x))

    best = min(minimize(loss, rng.standard_normal(f * j + j * n), method="BFGS").fun for _ in range(25))
    assert ours <= best + 1e-7
    assert best == pytest.approx(ours, abs=1e-4)  # the optimiser does reach the same optimum
    # and plain (weight-only) truncation is worse on this anisotropic data
    u, s, vh = torch.linalg.svd(wt)
    assert _data_error(wt, (u[:, :j] * s[:j]) @ vh[:j], xt) > ours


def test_projection_form_equals_the_cholesky_form():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 9, dtype=torch.float64, generator=g)
    x = torch.randn(9, 50, dtype=torch.float64, generator=g)
    m = x @ x.T / 50
    for j in (1, 3, 6):
        a, b = whitened_factors(w, m, 1, j)
        ac, bc = whitened_factors_cholesky(w, m, j, damping=1e-12)
        torch.testing.assert_close(b[0] @ a[0], bc @ ac, atol=1e-8, rtol=1e-8)


def test_rank_deficient_calibration_is_handled():
    """Fewer samples than inputs: errors reach 0 at the data rank and the factors stay finite and bounded."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 10, dtype=torch.float64, generator=g)
    x = torch.randn(10, 3, dtype=torch.float64, generator=g)  # rank 3
    m = x @ x.T
    errors, _ = whitened_error_curve(w, m, 1)
    assert errors[2] == pytest.approx(0.0, abs=1e-7) and errors[1] > 1e-3
    a, b = whitened_factors(w, m, 1, 3)
    what = b[0] @ a[0]
    assert torch.isfinite(what).all()
    assert _data_error(w, what, x) < 1e-7
    # W_hat is a projection of W: never larger than W (no blow-up in unseen directions)
    assert torch.linalg.matrix_norm(what, 2) <= torch.linalg.matrix_norm(w, 2) + 1e-9
    # the damped Cholesky form stays finite too
    ac, bc = whitened_factors_cholesky(w, m, 3)
    assert torch.isfinite(bc @ ac).all()
    # an all-zero moment (no data) gives zero errors rather than NaN
    err0, _ = whitened_error_curve(w, torch.zeros(10, 10, dtype=torch.float64), 1)
    assert np.all(err0 == 0)


@pytest.mark.parametrize("model_name", ["mlp", "residual_cnn", "conv1d"])
def test_optimize_with_calibration_lowers_the_data_error(model_name):
    """On anisotropic inputs, data-aware allocation + whitened factors fit the data better than weight-only."""
    model, x = build(model_name)
    scale = torch.linspace(0.05, 3.0, x.shape[1]).reshape(1, -1, *([1] * (x.dim() - 2)))
    batches = [torch.randn((32, *x.shape[1:])) * scale for _ in range(4)]
    test = torch.randn((64, *x.shape[1:])) * scale
    with torch.no_grad():
        ref = model(test)
    res_w = autorank.optimize(model, 0.5, x)
    res_d = autorank.optimize(model, 0.5, x, calibration=batches)
    assert res_d.plan.config["data_aware"] and not res_w.plan.config["data_aware"]
    assert res_d.plan.totals["params"] <= 0.5 * res_d.plan.totals["params_before"]
    with torch.no_grad():
        err_w = float((res_w.model(test) - ref).norm() / ref.norm())
        err_d = float((res_d.model(test) - ref).norm() / ref.norm())
    assert err_d < err_w


def test_data_aware_plan_errors_are_measured_errors():
    """Each layer's planned error is the measured ||(W - W_hat) X|| / ||W X|| of the realised layer."""
    model, x = build("mlp")
    batches = [torch.randn(16, 32) * torch.linspace(0.1, 2, 32) for _ in range(2)]
    res = autorank.optimize(model, 0.6, x, calibration=batches, data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False),  # the input-side errors
                            compression=autorank.Compression(curves=autorank.CurveConfig(max_groups=4)))
    graph = autorank.analyze(model, x)
    moms = collect_moments(model, graph.layers, batches)
    for name, lp in res.plan.layers.items():
        if not lp.compressed:
            continue
        dense = dict(model.named_modules())[name].weight.double()
        approx = dict(res.model.named_modules())[name].to_dense().weight.double()
        measured = autorank.measures.relative_data_error(dense, approx, moms[name].matrix)
        assert lp.error == pytest.approx(measured, rel=1e-4, abs=1e-6)


def test_calibration_errors():
    model, x = build("mlp")
    with pytest.raises(TypeError, match="iterable of batches"):
        autorank.optimize(model, 0.5, x, calibration=torch.randn(4, 32))
    with pytest.raises(ValueError, match="calibration is empty"):
        autorank.optimize(model, 0.5, x, calibration=[])
    with pytest.raises(TypeError, match="iterable of input batches"):
        autorank.optimize(model, 0.5, x, calibration=3)
    with pytest.raises(RuntimeError, match="calibration batch 1 failed"):
        autorank.optimize(model, 0.5, x, calibration=[x, torch.randn(2, 5)])


def test_diagonal_moment_of_an_embedding_matches_the_dense_form():
    """Embedding inputs are one-hot: the kept diagonal gives the same curves, factors and errors as diag(d)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 40, dtype=torch.float64, generator=g)
    d = torch.rand(40, dtype=torch.float64, generator=g)
    d[::7] = 0.0  # tokens never seen
    e_diag, _ = whitened_error_curve(w, d, 1)
    e_full, _ = whitened_error_curve(w, torch.diag(d), 1)
    np.testing.assert_allclose(e_diag, e_full, atol=1e-12)
    a, b = whitened_factors(w, d, 1, 2)
    a2, b2 = whitened_factors(w, torch.diag(d), 1, 2)
    torch.testing.assert_close(b[0] @ a[0], b2[0] @ a2[0])
    err = autorank.measures.relative_data_error(w, b[0] @ a[0], d)
    assert err == pytest.approx(autorank.measures.relative_data_error(w, b[0] @ a[0], torch.diag(d)))
    assert err == pytest.approx(e_diag[1], abs=1e-9)


def test_embedding_moments_are_token_counts():
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    ids = torch.tensor([[1, 2, 2, 9], [3, 3, 3, 0]])
    graph = autorank.analyze(emb, ids, embeddings=True)
    moms = collect_moments(emb, graph.layers, [ids])
    expect = torch.bincount(ids.flatten(), minlength=10).double() / 8
    torch.testing.assert_close(moms["0"].matrix, expect)
    assert moms["1"].matrix.shape == (4, 4)
