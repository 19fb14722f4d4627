"""Sequential refit (autorank.sequential): per-layer optimality, stages, and the optimize(data=DataAware(sequential=True)) path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autorank
from autorank.layers import LayerHandler, register_layer_handler, set_weight_matrix
from autorank.sequential import CrossMoments, effective_weight, refit_layer, refit_stages


def _pairs(n: int, rows: int, seed: int, drift: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs ``x`` (non-zero mean) and a perturbed copy ``x_hat`` (what a compressed upstream gives)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g) + torch.randn(n, generator=g)
    x_hat = x + drift * (torch.randn(rows, n, generator=g) @ torch.randn(n, n, generator=g)) + 0.2
    return x.double(), x_hat.double()


def _layer(n: int, f: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, f, bias=bias).double()


def _err(original: nn.Module, new: nn.Module, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((original(x) - new(x_hat)) ** 2).sum())


def _moments(x: torch.Tensor, x_hat: torch.Tensor) -> CrossMoments:
    acc = CrossMoments(x.shape[1])
    half = x.shape[0] // 2  # two updates: the streamed sums must equal one big batch
    acc.update(x[:half], x_hat[:half])
    acc.update(x[half:], x_hat[half:])
    return acc


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_refit_is_the_least_squares_fit_of_the_original_outputs(bias):
    n, f = 6, 4
    x, x_hat = _pairs(n, 200, seed=1)
    layer = _layer(n, f, bias, seed=2)
    built = autorank.get_family("alds").realize(layer, {"groups": 1, "rank": f}, None)
    new = refit_layer(layer, built, "alds", {"groups": 1, "rank": f}, _moments(x, x_hat), damping=1e-12)
    with torch.no_grad():
        target = layer(x)
        design = torch.cat([x_hat, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x_hat
        coef = torch.linalg.lstsq(design, target).solution
        best = design @ coef
    torch.testing.assert_close(new(x_hat).detach(), best, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rank,groups", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_low_rank_refit_beats_the_fit_to_the_original_inputs_and_is_locally_optimal(rank, groups):
    n, f = 8, 6
    x, x_hat = _pairs(n, 300, seed=3)
    layer = _layer(n, f, True, seed=4)
    hyper = {"groups": groups, "rank": rank}
    plain = autorank.get_family("alds").realize(layer, hyper, (x.T @ x / len(x)))  # fitted to x, not x_hat
    new = refit_layer(layer, plain, "alds", hyper, _moments(x, x_hat), damping=1e-12)
    e_new = _err(layer, new, x, x_hat)
    assert e_new < _err(layer, plain, x, x_hat)
    if groups > 1:  # each group is whitened by its own block: a good fit, not the joint minimiser
        return
    # no small move of the factors or the bias does better (for k = 1 the fit is the exact minimiser)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        moved = copy.deepcopy(new)
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        assert _err(layer, moved, x, x_hat) >= e_new * (1 - 1e-9)


def test_unchanged_inputs_keep_the_weights_up_to_damping():
    n, f = 5, 7
    x, _ = _pairs(n, 100, seed=6)
    w = torch.randn(f, n, dtype=torch.float64)
    acc = _moments(x, x)
    cov, cross, _, _ = acc.centred(True)
    torch.testing.assert_close(effective_weight(w, cross, cov, damping=1e-12), w, atol=1e-8, rtol=1e-8)


def test_cross_moments_reject_rows_of_different_shapes():
    with pytest.raises(RuntimeError, match="different shapes"):
        CrossMoments(3).update(torch.zeros(4, 3), torch.zeros(5, 3))


def test_refit_of_a_layer_without_bias_adds_none():
    x, x_hat = _pairs(6, 100, seed=7)
    layer = _layer(6, 4, False, seed=8)
    built = autorank.get_family("alds").realize(layer, {"groups": 1, "rank": 2}, None)
    new = refit_layer(layer, built, "alds", {"groups": 1, "rank": 2}, _moments(x, x_hat))
    assert new.output_bias() is None
    assert _err(layer, new, x, x_hat) < _err(layer, built, x, x_hat)


def test_refit_does_not_modify_the_original_layer():
    x, x_hat = _pairs(6, 100, seed=9)
    layer = _layer(6, 4, True, seed=10)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    built = autorank.get_family("alds").realize(layer, {"groups": 1, "rank": 2}, None)
    refit_layer(layer, built, "alds", {"groups": 1, "rank": 2}, _moments(x, x_hat))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


# ---- set_weight_matrix ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: nn.Linear(5, 3), lambda: nn.Conv2d(2, 3, 3), lambda: nn.Conv1d(2, 4, 2)],
                         ids=["linear", "conv2d", "conv1d"])
def test_set_weight_matrix_round_trips(make):
    from autorank.layers import get_layer_handler

    m = make()
    h = get_layer_handler(m)
    new = torch.randn(h.weight_matrix(m).shape)
    set_weight_matrix(m, new)
    assert torch.equal(h.weight_matrix(m), new)


def test_set_weight_matrix_rejects_wrong_shape_and_non_view_handlers():
    with pytest.raises(ValueError, match="weight matrix"):
        set_weight_matrix(nn.Linear(5, 3), torch.zeros(5, 3))

    class Copying(nn.Linear):
        pass

    register_layer_handler(Copying, LayerHandler("linear", lambda m: (m.out_features, m.in_features, ()),
                                                 lambda m: m.weight.clone(), lambda m: None))
    with pytest.raises(TypeError, match="not a view"):
        set_weight_matrix(Copying(4, 2), torch.ones(2, 4))


# ---- stages and the whole-model path ----------------------------------------------------------

class QKV(nn.Module):
    """Three projections of one input, a mixing layer, then an output layer."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mix = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        return self.out(torch.relu(self.mix(a + x)))


def test_stages_group_independent_layers_and_split_dependent_ones():
    m = QKV()
    g = autorank.analyze(m, torch.randn(2, 5, 12)).graph
    assert refit_stages(g, ["q", "k", "v", "mix", "out"]) == [["q", "k", "v"], ["mix"], ["out"]]
    assert refit_stages(None, ["q", "k"]) == [["q"], ["k"]]


def _calib(seed: int, n: int = 4, shape=(32, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(shape[-1], shape[-1], generator=g)
    return [torch.randn(*shape, generator=g) @ mix for _ in range(n)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3))


CASES = [
    ("mlp", _mlp, lambda: _calib(1), 0.3),
    ("mlp", _mlp, lambda: _calib(1), 0.5),
    ("qkv", QKV, lambda: _calib(2, shape=(4, 6, 12)), 0.4),
    ("cnn", _cnn, lambda: [torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(s)) for s in range(3)], 0.3),
]


@pytest.mark.parametrize("name,make,calib,budget", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_sequential_lowers_output_error_on_the_calibration_data_at_the_same_cost(name, make, calib, budget):
    model, batches = make(), calib()
    x = torch.cat(batches)
    plain = autorank.optimize(model, budget, batches[0], calibration=batches, data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False))
    seq = autorank.optimize(model, budget, batches[0], calibration=batches,
                            data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=True))
    assert seq.plan.config["sequential"] and not plain.plan.config["sequential"]
    assert {n: lp.hyper for n, lp in seq.plan.layers.items()} == {n: lp.hyper for n, lp in plain.plan.layers.items()}
    assert seq.plan.totals == plain.plan.totals
    with torch.no_grad():
        y = model(x)
        e_plain = float((plain.model(x) - y).norm() / y.norm())
        e_seq = float((seq.model(x) - y).norm() / y.norm())
    assert e_seq < e_plain
    assert "refit" in seq.timings


def test_sequential_on_dict_inputs_with_padding_mask():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 100, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 8:] = 0
        ids[1, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})

    def err(m):
        num = den = 0.0
        with torch.no_grad():
            for b in batches:
                keep = b["attention_mask"].bool()
                ref = model(**b).last_hidden_state[keep]
                num += float(((m(**b).last_hidden_state[keep] - ref) ** 2).sum())
                den += float((ref ** 2).sum())
        return (num / den) ** 0.5

    plain = autorank.optimize(model, 0.6, batches[0], calibration=batches, data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False))
    seq = autorank.optimize(model, 0.6, batches[0], calibration=batches,
                            data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=True))
    assert err(seq.model) < err(plain.model)


def test_layers_of_families_that_do_not_fit_data_are_left_as_realised():
    model, batches = _cnn(), [torch.randn(2, 3, 10, 10) for _ in range(2)]
    spatial = autorank.Compression(families=["spatial_svd"])
    a = autorank.optimize(model, 0.5, batches[0], calibration=batches, compression=spatial,
                          data=autorank.DataAware(sequential=False))
    b = autorank.optimize(model, 0.5, batches[0], calibration=batches, compression=spatial,
                          data=autorank.DataAware(sequential=True))
    for (n1, p1), (n2, p2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_sequential_leaves_the_callers_model_and_training_mode_alone():
    model, batches = _mlp(), _calib(3)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = autorank.optimize(model, 0.4, batches[0], calibration=batches,
                            data=autorank.DataAware(sequential=True))
    assert model.training and res.model.training
    assert all(m.training for m in res.model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(data={"sequential": True}), ValueError, "calibration"),
    (dict(data={"sequential": 1}, calibration=[torch.randn(4, 16)]), TypeError, "sequential must be a bool"),
])
def test_sequential_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        autorank.optimize(_mlp(), 0.5, torch.randn(4, 16), **kwargs)


class _Fan(nn.Module):
    """Three Linear layers on one tensor (as q/k/v), or on three equal copies of it."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre = nn.Linear(12, 12)
        self.q, self.k, self.v = nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(12, 10)
        self.shared = shared

    def forward(self, x):
        h = torch.relu(self.pre(x))
        hs = (h, h, h) if self.shared else (h.clone(), h.clone(), h.clone())
        return self.q(hs[0]) * self.k(hs[1]) + self.v(hs[2])


def test_layers_reading_one_tensor_share_the_refit_products(monkeypatch):
    import autorank.sequential as seq

    calls = []
    real = seq.paired_sums
    monkeypatch.setattr(seq, "paired_sums", lambda x, h: calls.append(x.shape) or real(x, h))
    batches = [torch.randn(16, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = {}
    for shared in (True, False):
        calls.clear()
        res = autorank.optimize(_Fan(shared), 0.5, batches[0], calibration=batches,
                                data=autorank.DataAware(output_weighting=False, output_allocation=False),
                                progress=False)
        refitted = [n for n, lp in res.plan.layers.items() if lp.compressed and n != "pre"]
        assert len(refitted) >= 2, res.plan.layers  # the case needs several of q/k/v compressed
        out[shared] = (res.plan.layers, res.model.state_dict(), len(calls))
    # the same plan and bit-identical weights, with one product per batch for the layers reading h
    assert {n: (lp.family, lp.hyper) for n, lp in out[True][0].items()} == \
        {n: (lp.family, lp.hyper) for n, lp in out[False][0].items()}
    for key, value in out[True][1].items():
        assert torch.equal(value, out[False][1][key]), key
    n_other = out[False][2] - len(refitted) * len(batches)  # the products of the layers not reading h
    assert out[True][2] == n_other + len(batches)
