"""Optuna refinement: reproducible, never worse than the unrefined allocation, budget kept."""

from __future__ import annotations

import pytest
import torch

import autorank
from autorank.refine import layer_type, output_fidelity
from tests.tiny_models import build


def _data(model_name, n=3):
    model, x = build(model_name)
    g = torch.Generator().manual_seed(5)
    scale = torch.linspace(0.05, 3.0, x.shape[1]).reshape(1, -1, *([1] * (x.dim() - 2)))
    batches = [torch.randn((16, *x.shape[1:]), generator=g) * scale for _ in range(2 * n)]
    return model, x, batches[:n], batches[n:]


@pytest.mark.parametrize("model_name", ["mlp", "residual_cnn"])
def test_refine_is_reproducible_and_not_worse(model_name):
    model, x, calib, held = _data(model_name)
    refine = autorank.Refine(heldout=held, n_trials=8, seed=3)
    a = autorank.optimize(model, 0.45, x, calibration=calib, refine=refine)
    b = autorank.optimize(model, 0.45, x, calibration=calib, refine=refine)
    ra, rb = a.plan.config["refine"], b.plan.config["refine"]
    assert ra["best_params"] == rb["best_params"] and ra["best_metric"] == rb["best_metric"]
    assert ra["gain"] >= 0.0 and ra["n_trials"] == 8
    assert a.plan.totals["params"] <= 0.45 * a.plan.totals["params_before"]
    # the reported best metric is what the returned model scores on the held-out data
    with torch.no_grad():
        score = sum(output_fidelity(a.model, h, model(h)) for h in held) / len(held)
    assert score == pytest.approx(ra["best_metric"], abs=1e-5)
    assert "refine (Optuna" in a.summary()


def test_refine_baseline_is_the_unrefined_allocation():
    model, x, calib, held = _data("mlp")
    plain = autorank.optimize(model, 0.45, x, calibration=calib)
    res = autorank.optimize(model, 0.45, x, calibration=calib,
                            refine=autorank.Refine(heldout=held, n_trials=1))
    assert res.plan.config["refine"]["gain"] == 0.0
    assert res.plan.ranks == plain.plan.ranks


def test_layer_type_groups_blocks():
    assert layer_type("encoder.layer.11.attention.self.query") == "encoder.layer.*.attention.self.query"
    assert layer_type("layer3.1.conv2") == "layer*.*.conv*"


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"heldout": None}, TypeError, "heldout"),
    ({"heldout": []}, ValueError, "empty"),
    ({"heldout": [torch.zeros(1)], "n_trials": 0}, ValueError, "n_trials"),
    ({"heldout": [torch.zeros(1)], "knobs": ("speed",)}, ValueError, "knobs"),
    ({"heldout": [torch.zeros(1)], "weight_range": 0.5}, ValueError, "weight_range"),
    ({"heldout": [torch.zeros(1)], "metric": 3}, TypeError, "metric"),
], ids=["none", "empty", "trials", "knobs", "range", "metric"])
def test_refine_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        autorank.Refine(**kwargs)


def test_refine_rejects_schedules():
    model, x, calib, held = _data("mlp")
    with pytest.raises(ValueError, match="single-step"):
        autorank.optimize(model, 0.5, x, refine=autorank.Refine(heldout=held), steps=2,
                          finetune=lambda m, s: None)
