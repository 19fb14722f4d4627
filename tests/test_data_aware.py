"""The default data-aware recipe (issue #19): on with calibration, off without, each part switchable."""

from __future__ import annotations

import functools

import pytest
import torch

import autorank
from autorank.allocators.alds import alds_output_allocation, gauss_newton_gain
from autorank.linalg import output_roots
from autorank.pipeline import CompressStep, Settings
from tiny_models import build


def _calibration(x, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


def _recorded(result) -> dict:
    c = result.plan.config
    return {"output_weighting": c["output_weighting"], "output_allocation": c["allocator"] == "alds_output",
            "sequential": c["sequential"], "data_aware": c["data_aware"]}


def test_calibration_alone_runs_every_part_and_no_calibration_none():
    model, x = build("mlp")
    on = autorank.optimize(model, 0.5, x, calibration=_calibration(x))
    off = autorank.optimize(model, 0.5, x)
    assert _recorded(on) == {"output_weighting": True, "output_allocation": True, "sequential": True,
                             "data_aware": True}
    assert _recorded(off) == {"output_weighting": False, "output_allocation": False, "sequential": False,
                              "data_aware": False}
    assert {"calibration", "output_moments", "refit"} <= set(on.timings)
    assert not {"calibration", "output_moments", "refit"} & set(off.timings)


PARTS = ["output_weighting", "output_allocation", "sequential"]


@pytest.mark.parametrize("part", PARTS)
def test_each_switch_turns_its_part_off_and_only_that_part(part):
    model, x = build("residual_cnn")
    result = autorank.optimize(model, 0.5, x, calibration=_calibration(x), data=autorank.DataAware(**{part: False}))
    expected = {p: p != part for p in PARTS}
    assert _recorded(result) == {**expected, "data_aware": True}
    assert ("refit" in result.timings) is expected["sequential"]
    # the output moments are collected for the output weighting
    assert ("output_moments" in result.timings) is expected["output_weighting"]


def test_an_explicit_allocator_is_kept_and_the_output_allocation_does_not_replace_it():
    model, x = build("mlp")
    result = autorank.optimize(model, 0.5, x, calibration=_calibration(x),
                               compression=autorank.Compression(allocator="uniform"))
    assert result.plan.config["allocator"] == "uniform"


def test_the_default_recipe_is_deterministic():
    plans, outs = [], []
    for _ in range(2):
        model, x = build("residual_cnn")
        result = autorank.optimize(model, 0.4, x, calibration=_calibration(x))
        plans.append(result.plan.to_json())
        with torch.no_grad():
            outs.append(result.model(x))
    assert plans[0] == plans[1]
    assert torch.equal(outs[0], outs[1])


def test_the_default_recipe_fits_the_model_output_better_than_input_only():
    model, x = build("mlp")
    calib = [torch.randn(64, 32) @ torch.randn(32, 32) for _ in range(4)]
    held = torch.randn(256, 32) @ torch.randn(32, 32)
    input_only = autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False)
    with torch.no_grad():
        ref = model(held)
        errs = {}
        for name, data in (("default", None), ("input-only", input_only)):
            res = autorank.optimize(model, 0.3, x, calibration=calib, data=data)
            errs[name] = float((res.model(held) - ref).norm() / ref.norm())
    assert errs["default"] < errs["input-only"]


# ---- the Gauss-Newton gains --------------------------------------------------------------------------

def test_gauss_newton_gain_is_the_expected_output_error_of_a_layer_error():
    """tr(R M R^T G) is the probed output error of the error R, so g^2 eps^2 with eps = ||R|| / ||W|| in that measure."""
    torch.manual_seed(0)
    f, n = 6, 5
    w = torch.randn(f, n, dtype=torch.float64)
    x = torch.randn(1000, n, dtype=torch.float64)
    j = torch.randn(3, f, dtype=torch.float64)  # a linear read-out: output = J (W x)
    m = x.T @ x / len(x)
    g_sum = len(x) * (j.T @ j)  # sum over the 1000 positions of E_r[J^T r r^T J]
    gain = gauss_newton_gain(w, m, g_sum)
    assert gain ** 2 == pytest.approx(float(((x @ w.T) @ j.T).pow(2).sum()), rel=1e-10)  # = ||J W X||^2
    zero = gauss_newton_gain(w, m, torch.zeros(f, f, dtype=torch.float64))
    assert zero == 0.0


GAUSS_NEWTON = autorank.Compression(allocator=functools.partial(alds_output_allocation, gains="gauss_newton"))


def test_alds_output_measures_its_gains_by_default_and_gauss_newton_needs_no_evaluation(monkeypatch):
    import autorank.allocators.alds as alds

    calls = []
    real = alds.output_gains
    monkeypatch.setattr(alds, "output_gains", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, x = build("mlp")
    result = autorank.optimize(model, 0.5, x, calibration=_calibration(x))
    assert result.plan.config["allocator"] == "alds_output" and calls == [1]
    autorank.optimize(model, 0.5, x, calibration=_calibration(x), compression=GAUSS_NEWTON)
    assert calls == [1]  # the Gauss-Newton gains come from the moments: no probe evaluation
    with pytest.raises(ValueError, match="gains='gauss_newton' needs the input and output moments"):
        autorank.optimize(model, 0.5, x, calibration=_calibration(x), compression=GAUSS_NEWTON,
                          data=autorank.DataAware(output_weighting=False))


def test_output_roots_are_computed_once_per_moment(monkeypatch):
    import autorank.linalg as linalg

    calls = []
    real = linalg._output_roots
    monkeypatch.setattr(linalg, "_output_roots", lambda g, d: calls.append(g) or real(g, d))
    g = torch.eye(4, dtype=torch.float64) * 2
    first = output_roots(g)
    again = output_roots(g)
    assert len(calls) == 1 and first[0] is again[0]
    assert torch.allclose(first[0] @ first[0], g + 0.1 * 2 * torch.eye(4, dtype=torch.float64))
    output_roots(g.clone())  # another tensor: computed afresh
    assert len(calls) == 2


# ---- bad calibration names the batch -------------------------------------------------------------------

def _bad(x, value):
    b = torch.randn(x.shape)
    b[0, 0] = value
    return b


@pytest.mark.parametrize("make,err,match", [
    (lambda x: [torch.randn(x.shape), _bad(x, float("nan"))], ValueError, "calibration batch 1 holds NaN"),
    (lambda x: [_bad(x, float("inf"))], ValueError, "calibration batch 0 holds Inf"),
    (lambda x: [torch.randn(x.shape), torch.randn(4, 7)], RuntimeError, "calibration batch 1 failed"),
    (lambda x: [], ValueError, "calibration is empty"),
    (lambda x: torch.randn(x.shape), TypeError, "not a single Tensor; wrap it in a list"),
    (lambda x: iter(()), ValueError, "calibration is empty"),
], ids=["nan", "inf", "wrong-shape", "empty-list", "single-tensor", "empty-iterator"])
def test_bad_calibration_is_a_clear_error_naming_the_batch(make, err, match):
    model, x = build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        autorank.optimize(model, 0.5, x, calibration=make(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_step_records_the_parts_it_ran():
    model, x = build("mlp")
    step = CompressStep(x, Settings("params"), calibration=_calibration(x))
    assert step.parts == {"output_weighting": True, "output_allocation": True, "sequential": True, "streaming": True}
    assert CompressStep(x).parts == {p: False for p in (*PARTS, "streaming")}


class TwoHeads(torch.nn.Module):
    """``(main, aux)``: the primary output (the first tensor) does not depend on ``aux``, like BERT's pooler."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 32)
        self.main = torch.nn.Linear(32, 16)
        self.aux = torch.nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.main(h), self.aux(h)


def test_a_layer_the_output_does_not_depend_on_gets_gain_zero_without_probes(monkeypatch):
    import autorank.allocators.alds as alds

    monkeypatch.setattr(alds, "output_gains", lambda *a, **k: pytest.fail("probe evaluations ran"))
    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(8, 16)
    result = autorank.optimize(model, 0.6, x, calibration=_calibration(x, n=4), compression=GAUSS_NEWTON)
    assert result.plan.config["allocator"] == "alds_output_allocation"
    aux, main = result.plan.layers["aux"], result.plan.layers["main"]
    assert aux.params <= main.params  # nothing at the output depends on aux: it is compressed at least as hard


def test_output_roots_are_recomputed_after_an_in_place_change():
    g = torch.eye(3, dtype=torch.float64)
    before = output_roots(g)[0].clone()
    g.mul_(4)
    after = output_roots(g)[0]
    assert not torch.allclose(before, after)
    assert torch.allclose(after @ after, g + 0.1 * 4 * torch.eye(3, dtype=torch.float64))


def test_output_allocation_true_with_another_allocator_is_an_error_naming_it():
    model, x = build("mlp")
    with pytest.raises(ValueError, match="Compression.allocator='uniform'"):
        autorank.optimize(model, 0.5, x, calibration=_calibration(x), compression=autorank.Compression(allocator="uniform"),
                          data=autorank.DataAware(output_allocation=True))


def test_a_sweep_method_demanding_a_part_needs_calibration():
    from autorank.apps.sweep import SweepConfig

    with pytest.raises(ValueError, match=r"methods\['a'\].data_aware: DataAware.sequential=True uses calibration"):
        SweepConfig.from_dict({"model": "mlp", "budgets": [0.5],
                               "methods": [{"name": "a", "data_aware": {"sequential": True}}]})
