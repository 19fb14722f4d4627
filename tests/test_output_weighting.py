"""Output weighting: the output moment G, its damped root, the two-sided truncation and DataAware(output_weighting=)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autorank
from autorank.calibration import collect_output_moments, primary_output
from autorank.families import get_family, output_kwargs
from autorank.families.alds import whitened_error_curve
from autorank.linalg import output_roots, whitened_factors


def _psd(n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * decay ** torch.arange(n, dtype=torch.float64)) @ q.T


def _two_sided_error(w, w_hat, m, s) -> float:
    r = s @ (w - w_hat)
    return float(torch.sqrt(torch.trace(r @ m @ r.T) / torch.trace(s @ w @ m @ w.T @ s)))


@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
def test_output_roots_square_to_the_damped_moment(damping):
    g = _psd(6, 0)
    s, inv = output_roots(g, damping)
    lam = torch.linalg.eigvalsh(g).clamp_min(0)
    expect = g + damping * float(lam.mean()) * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(s @ s, expect, atol=1e-10)
    assert torch.allclose(s @ inv, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(s, s.T)


def test_output_roots_of_a_zero_moment_are_the_identity():
    s, inv = output_roots(torch.zeros(4, 4))
    assert torch.equal(s, torch.eye(4, dtype=torch.float64)) and torch.equal(inv, s)


@pytest.mark.parametrize("g,damping,match", [
    (torch.eye(3), 0.0, "positive"),
    (torch.eye(3), float("nan"), "positive"),
    (torch.ones(3, 4), 0.1, "square"),
])
def test_output_roots_reject_bad_arguments(g, damping, match):
    with pytest.raises(ValueError, match=match):
        output_roots(g, damping)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_two_sided_truncation_is_the_closed_form_optimum(rank):
    """W_hat = S^-1 [S W L]_j L^-1 (SVD-LLM form with a left factor), for full-rank M and G."""
    torch.manual_seed(rank)
    w = torch.randn(7, 9, dtype=torch.float64)
    m, g = _psd(9, 1), _psd(7, 2, decay=0.5)
    a, b = whitened_factors(w, m, 1, rank, output=g, output_damping=1e-2)
    s, inv = output_roots(g, 1e-2)
    lower = torch.linalg.cholesky(m)
    u, sv, vh = torch.linalg.svd(s @ w @ lower)
    expect = inv @ (u[:, :rank] * sv[:rank]) @ vh[:rank] @ torch.linalg.inv(lower)
    assert torch.allclose(b[0] @ a[0], expect, atol=1e-8)
    # and it beats the input-only whitened factors on the two-sided objective
    a1, b1 = whitened_factors(w, m, 1, rank)
    assert _two_sided_error(w, b[0] @ a[0], m, s) < _two_sided_error(w, b1[0] @ a1[0], m, s) - 1e-6


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_two_sided_curve_is_the_error_of_the_two_sided_factors(groups):
    torch.manual_seed(groups)
    w = torch.randn(5, 12, dtype=torch.float64)
    m, g = _psd(12, 3), _psd(5, 4, decay=0.3)
    err, _ = whitened_error_curve(w, m, groups, output=g)
    s, _ = output_roots(g)
    for j in range(1, len(err) + 1):
        a, b = whitened_factors(w, m, groups, j, output=g)
        w_hat = torch.cat([b[i] @ a[i] for i in range(groups)], dim=1)
        assert err[j - 1] == pytest.approx(_two_sided_error(w, w_hat, m, s), abs=1e-9)


def test_output_moment_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="does not match a weight with 5 rows"):
        whitened_factors(torch.randn(5, 4), torch.eye(4), 1, 2, output=torch.eye(3))


def test_streamed_output_moment_estimates_the_gauss_newton_matrix():
    """For y = W2 (W1 x), E[g g^T] at the first layer's output is W2^T W2, and I at the model's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    batches = [torch.randn(16, 4) for _ in range(400)]
    layers = autorank.analyze(model, batches[0]).layers
    grads_before = [p.grad for p in model.parameters()]
    moments = collect_output_moments(model, layers, batches, progress=False)
    w2 = model[1].weight.detach().to(torch.float64)
    g0, g1 = moments["0"].matrix, moments["1"].matrix
    assert moments["0"].count == 16 * 400
    assert torch.linalg.matrix_norm(g0 - w2.T @ w2) < 0.1 * torch.linalg.matrix_norm(w2.T @ w2)
    assert torch.linalg.matrix_norm(g1 - torch.eye(2, dtype=torch.float64)) < 0.1
    assert [p.grad for p in model.parameters()] == grads_before
    assert all(p.requires_grad for p in model.parameters())


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, attention_mask):
        return {"last_hidden_state": self.head(torch.tanh(self.lin(x))), "mask": attention_mask}


def test_padded_positions_and_the_output_function():
    torch.manual_seed(0)
    model = _Masked().train()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"x": torch.randn(2, 5, 4), "attention_mask": mask}
    layers = autorank.analyze(model, batch).layers
    mom = collect_output_moments(model, layers, [batch], progress=False)
    assert mom["lin"].count == mom["head"].count == int(mask.sum())
    assert model.training  # mode restored
    # an output function that reads the first output channel only: G of the head is e_1 e_1^T-shaped
    first = collect_output_moments(model, layers, [batch], lambda out: out["last_hidden_state"][..., :1],
                                   progress=False)
    g = first["head"].matrix
    assert g[0, 0] > 0 and torch.count_nonzero(g[1:]) == 0 and torch.count_nonzero(g[:, 1:]) == 0


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.fc1(x)
        h += 1.0  # in place on the first layer's output
        return self.fc2(torch.relu_(h))


def test_a_model_that_modifies_layer_outputs_in_place():
    model = _InPlace()
    x = torch.randn(8, 4)
    ref = model(x).detach()
    mom = collect_output_moments(model, autorank.analyze(model, x).layers, [x], progress=False)
    assert mom["fc1"].count == 8 and torch.count_nonzero(mom["fc1"].sum) > 0
    assert torch.equal(model(x), ref)


def test_conv_output_rows_are_pixels():
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 1))
    x = torch.randn(3, 2, 6, 6)
    layers = autorank.analyze(model, x).layers
    mom = collect_output_moments(model, layers, [x], progress=False)
    assert mom["0"].sum.shape == (5, 5) and mom["0"].count == 3 * 4 * 4
    assert mom["2"].sum.shape == (4, 4)


@pytest.mark.parametrize("out,expect", [
    (torch.ones(2), "tensor"),
    ({"last_hidden_state": torch.ones(2), "other": torch.zeros(2)}, "last_hidden_state"),
    ((torch.arange(3), torch.ones(2)), "second"),  # integer tensors are skipped
])
def test_primary_output(out, expect):
    got = primary_output(out)
    want = {"tensor": out, "last_hidden_state": out["last_hidden_state"] if isinstance(out, dict) else None,
            "second": out[1] if isinstance(out, tuple) else None}[expect]
    assert got is want


def test_primary_output_without_a_float_tensor_names_the_fix():
    with pytest.raises(TypeError, match="output_weighting=fn"):
        primary_output({"ids": torch.arange(3)})


def _uneven_model() -> nn.Module:
    """The second layer scales its inputs over three decades: most output errors of layer 0 do not matter."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    with torch.no_grad():
        m[1].weight.mul_(torch.logspace(-2, 1, 32))
    return m


@pytest.mark.parametrize("sequential", [False, True])
def test_optimize_with_output_weighting_tracks_the_model_output_better(sequential):
    model = _uneven_model()
    x = torch.randn(512, 16) @ torch.randn(16, 16)
    calib = list(x.split(64))
    ref = model(x).detach()
    errors = {}
    for ow in (False, True):
        res = autorank.optimize(model, 0.5, x[:4], calibration=calib, progress=False,
                                data=autorank.DataAware(output_weighting=ow, output_allocation=False,
                                                        sequential=sequential),
                                compression=autorank.Compression(exclude=["1"]))
        assert res.plan.config["output_weighting"] is ow
        assert ("output_moments" in res.timings) is ow
        with torch.no_grad():
            errors[ow] = float((res.model(x) - ref).norm() / ref.norm())
    assert errors[True] < 0.8 * errors[False]


def test_output_weighting_with_a_family_that_does_not_fit_outputs():
    """sparse + low-rank has no fits_output: it gets the input moment alone, and the run succeeds."""
    assert output_kwargs(get_family("sparse_lowrank"), torch.eye(2)) == {}
    assert output_kwargs(get_family("alds"), torch.eye(2)).keys() == {"output"}
    assert output_kwargs(get_family("alds"), None) == {}
    model = _uneven_model()
    x = torch.randn(128, 16)
    res = autorank.optimize(model, 0.6, x[:4], calibration=[x], data=autorank.DataAware(output_weighting=True),
                            compression=autorank.Compression(families=["sparse_lowrank"]), progress=False)
    assert res.plan.config["output_weighting"] is True


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(data={"output_weighting": "yes"}, calibration=[torch.randn(4, 16)]), TypeError, "output_weighting must be"),
    (dict(data={"output_weighting": True}), ValueError, "pass calibration"),
])
def test_output_weighting_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        autorank.optimize(_uneven_model(), 0.5, torch.randn(4, 16), **kwargs)
