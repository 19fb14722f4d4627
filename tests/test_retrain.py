"""The compress -> fine-tune scheduler."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autorank
from autorank.retrain import geometric, linear, one_shot
from tiny_models import build


@pytest.mark.parametrize("fn,target,steps,expected", [
    (one_shot, 0.3, 3, [0.3]),
    (linear, 0.4, 3, [0.8, 0.6, 0.4]),
    (linear, 0.5, 1, [0.5]),
    (geometric, 0.25, 2, [0.5, 0.25]),
    (geometric, 0.125, 3, [0.5, 0.25, 0.125]),
], ids=["one-shot", "linear3", "linear1", "geometric2", "geometric3"])
def test_schedules(fn, target, steps, expected):
    assert fn(target, steps) == pytest.approx(expected)
    assert fn(target, steps)[-1] == target


def toy_problem(seed=0):
    """A linearly separable 3-class problem and an MLP that fits it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    w = torch.randn(16, 3, generator=g)
    y = (x @ w).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]

    def acc(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    return model.eval(), x[:8], batches, acc


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, model, step):
        self.calls.append((step, autorank.count_params(model),
                           [type(m).__name__ for m in model.modules()]))


@pytest.mark.parametrize("mode", ["cascade", "one-shot"])
def test_callback_gets_compressed_model_and_step(mode):
    model, x, _, acc = toy_problem()
    rec = Recorder()
    res = autorank.optimize(model, 0.3, x, finetune=rec, steps=3, evaluate=acc,
                            retrain=autorank.Retrain(schedule="linear", mode=mode))
    total = autorank.count_params(model)
    assert [c[0] for c in rec.calls] == [1, 2, 3]
    for (step, params, types), budget in zip(rec.calls, linear(0.3, 3)):
        assert params <= budget * total
        assert "GroupedLowRankLinear" in types
    assert [h["step"] for h in res.history] == [0, 1, 2, 3]
    assert res.history[0]["budget"] == 1.0 and res.history[0]["metric"] == acc(model)
    assert res.history[-1]["params"] == res.plan.totals["params"] <= 0.3 * total
    assert "metric compressed" in res.summary()


def test_cascade_refactorises_and_one_shot_starts_from_original():
    """Cascade compresses the fine-tuned model; one-shot always compresses the original weights."""
    model, x, _, acc = toy_problem()
    seen = {}

    def bump(m, step):  # a 'fine-tune' that changes the weights in a recognisable way
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)

    for mode in ("cascade", "one-shot"):
        res = autorank.optimize(model, 0.5, x, finetune=bump, steps=2,
                                retrain=autorank.Retrain(schedule=[0.8, 0.5], mode=mode))
        seen[mode] = res
    # one-shot: step 2 starts from the original, so the final model equals compress(original, 0.5) then bump
    direct = autorank.optimize(model, 0.5, x).model
    bump(direct, 2)
    with torch.no_grad():
        assert torch.allclose(seen["one-shot"].model(x), direct(x), atol=1e-5)
        # cascade: the bumps of both steps are in there, the model differs from one-shot
        assert not torch.allclose(seen["cascade"].model(x), direct(x), atol=1e-3)
    assert not any(isinstance(m, autorank.GroupedLowRankLinear) for m in model.modules())  # caller's model untouched


def test_builtin_finetune_improves_compressed_accuracy():
    model, x, batches, acc = toy_problem()
    ft = autorank.Finetune(batches, epochs=15, lr=3e-3, distill=True, seed=0)
    res = autorank.optimize(model, 0.15, x, finetune=ft, steps=1, evaluate=acc)
    last = res.history[-1]
    assert last["metric"] > last["metric_compressed"]


def test_min_metric_stops_and_keeps_best():
    model, x, _, acc = toy_problem()
    res = autorank.optimize(model, 0.08, x, steps=3, evaluate=acc,
                            retrain=autorank.Retrain(schedule=[0.9, 0.3, 0.08], min_metric=acc(model) - 0.02))
    # compress-only at 0.08 of the parameters on this toy net cannot keep the accuracy
    assert len(res.history) < 4 or res.history[-1]["metric"] < acc(model) - 0.02
    assert res.plan.budget in (0.9, 0.3)


def test_checkpoint_resume_is_exact(tmp_path):
    model, x, batches, acc = toy_problem()
    ft = autorank.Finetune(batches, epochs=2, lr=1e-3, seed=3)
    straight = autorank.optimize(model, 0.3, x, finetune=ft, steps=3,
                                 retrain=autorank.Retrain(checkpoint=tmp_path / "a"))

    calls = []

    def crash_at_3(m, step):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt
        ft(m, step)

    with pytest.raises(KeyboardInterrupt):
        autorank.optimize(model, 0.3, x, finetune=crash_at_3, steps=3,
                          retrain=autorank.Retrain(checkpoint=tmp_path / "b"))
    state = json.loads((tmp_path / "b" / "schedule.json").read_text())
    assert state["done"] == 2 and calls == [1, 2, 3]
    resumed = autorank.optimize(model, 0.3, x, finetune=ft, steps=3,
                                retrain=autorank.Retrain(checkpoint=tmp_path / "b"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="different schedule"):
        autorank.optimize(model, 0.3, x, finetune=ft, steps=2,
                          retrain=autorank.Retrain(checkpoint=tmp_path / "b"))


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"finetune": "adam"}, TypeError, "finetune must be None, an autorank.Finetune or a callable"),
    ({"finetune": 3}, TypeError, "got int"),
    ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
    ({"steps": 2.5}, TypeError, "steps must be an int"),
    ({"retrain": {"schedule": "cubic"}}, ValueError, "schedule must be one of"),
    ({"retrain": {"schedule": [0.5, 0.7]}}, ValueError, "must decrease strictly"),
    ({"retrain": {"schedule": [0.8, 0.4]}}, ValueError, "last budget must be the target 0.5"),
    ({"retrain": {"mode": "greedy"}}, ValueError, "mode must be one of"),
    ({"evaluate": 1.0}, TypeError, "evaluate must be a callable"),
    ({"retrain": {"min_metric": 0.5}}, ValueError, "min_metric needs evaluate"),
    ({"finetune": lambda m, s: None, "inplace": True}, ValueError, "inplace=True applies to single-step"),
], ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_bad_schedule_arguments(kwargs, exc, msg):
    model, x = build("mlp")
    with pytest.raises(exc, match=msg):
        autorank.optimize(model, 0.5, x, **kwargs)


def test_distill_without_teacher_is_supplied_by_scheduler():
    """Finetune(distill=True) gets the original model as teacher from the scheduler."""
    model, x, batches, acc = toy_problem()
    ft = autorank.Finetune(batches, epochs=1, distill=True)
    res = autorank.optimize(model, 0.5, x, finetune=ft)
    assert res.history[-1]["finetune"]["steps"] > 0


def test_resuming_a_schedule_that_stopped_early_returns_the_same_step(tmp_path):
    """A re-run of a checkpointed schedule that stopped on min_metric stays stopped and returns the step it chose."""
    model, x = build("mlp")
    total = autorank.count_params(model)

    def kept(m):
        return autorank.count_params(m) / total

    kw = dict(finetune=lambda m, s: None, evaluate=kept,
              retrain=autorank.Retrain(schedule=[0.8, 0.6, 0.4], min_metric=0.7, checkpoint=tmp_path))
    first = autorank.optimize(model, 0.4, x, **kw)
    again = autorank.optimize(model, 0.4, x, **kw)
    assert first.plan.budget == again.plan.budget == 0.8
    assert [h["step"] for h in again.history] == [h["step"] for h in first.history] == [0, 1, 2]
    assert first.plan.to_json() == again.plan.to_json()
