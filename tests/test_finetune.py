"""Tests for autorank.finetune: config validation, training, distillation, determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autorank.finetune import Finetune, _schedule, distillation_loss


def _blobs(n: int = 240, seed: int = 0) -> TensorDataset:
    """Three well-separated Gaussian blobs in 8-D: an easy 3-class problem."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(3, 8, generator=g)
    y = torch.arange(n) % 3
    x = centres[y] + 0.5 * torch.randn(n, 8, generator=g)
    return TensorDataset(x, y)


def _mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


DATA = _blobs()


BAD_ARGS = [
    ("loader-none", dict(train_loader=None), ValueError, "None"),
    ("loader-int", dict(train_loader=3), TypeError, "int"),
    ("loader-str", dict(train_loader="data.csv"), TypeError, "str"),
    ("epochs-zero", dict(epochs=0), ValueError, "epochs must be a positive finite number, got 0"),
    ("epochs-negative", dict(epochs=-1.5), ValueError, "-1.5"),
    ("epochs-nan", dict(epochs=float("nan")), ValueError, "nan"),
    ("epochs-bool", dict(epochs=True), ValueError, "True"),
    ("lr-negative", dict(lr=-1), ValueError, "Finetune.lr must be a positive finite number, got -1"),
    ("lr-inf", dict(lr=float("inf")), ValueError, "inf"),
    ("lr-str", dict(lr="0.1"), ValueError, "'0.1'"),
    ("optimizer-unknown", dict(optimizer="rmsprop"), ValueError, "'rmsprop'"),
    ("optimizer-not-str", dict(optimizer=torch.optim.SGD), TypeError, "optimizer"),
    ("momentum-one", dict(momentum=1.0), ValueError, "momentum"),
    ("weight-decay-negative", dict(weight_decay=-0.1), ValueError, "-0.1"),
    ("schedule-unknown", dict(lr_schedule="step"), ValueError, "'step'"),
    ("distill-not-bool", dict(distill="yes"), TypeError, "'yes'"),
    ("temperature-zero", dict(temperature=0), ValueError, "temperature must be a positive finite number, got 0"),
    ("alpha-above-one", dict(alpha=1.5), ValueError, "alpha must be a number in [0, 1], got 1.5"),
    ("alpha-negative", dict(alpha=-0.1), ValueError, "-0.1"),
    ("device-bad-string", dict(device="gpu0"), ValueError, "'gpu0'"),
    ("device-int", dict(device=0), TypeError, "device"),
    ("seed-float", dict(seed=1.5), TypeError, "1.5"),
    ("seed-negative", dict(seed=-3), ValueError, "-3"),
    ("max-steps-zero", dict(max_steps=0), ValueError, "max_steps"),
    ("max-steps-float", dict(max_steps=2.0), ValueError, "2.0"),
    ("progress-str", dict(progress="auto"), TypeError, "'auto'"),
    ("loss-fn-not-callable", dict(loss_fn="mse"), TypeError, "'mse'"),
    ("batch-size-zero", dict(batch_size=0), ValueError, "batch_size"),
]


@pytest.mark.parametrize(
    "kwargs, exc, message", [case[1:] for case in BAD_ARGS], ids=[case[0] for case in BAD_ARGS]
)
def test_bad_arguments_name_the_value(kwargs, exc, message):
    kwargs = {"train_loader": DATA, **kwargs}
    with pytest.raises(exc) as info:
        Finetune(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_finetuning_improves_accuracy(optimizer, schedule):
    model = _mlp()
    before = _accuracy(model, DATA)
    lr = 0.05 if optimizer == "sgd" else 0.01
    report = Finetune(DATA, epochs=5, lr=lr, optimizer=optimizer, lr_schedule=schedule, batch_size=32)(model)
    after = _accuracy(model, DATA)
    assert before < 0.8
    assert after >= 0.95
    assert report["steps"] == 5 * math.ceil(len(DATA) / 32)
    assert math.isfinite(report["mean_loss"]) and math.isfinite(report["final_loss"])
    assert report["final_loss"] < report["mean_loss"]
    assert report["time_s"] >= 0


def test_distillation_pulls_student_towards_teacher():
    teacher = _mlp(seed=1)
    student = _mlp(seed=2)
    x = DATA.tensors[0]
    with torch.no_grad():
        before = distillation_loss(student(x), teacher(x), 4.0).item()
    teacher_state = copy.deepcopy(teacher.state_dict())
    Finetune(DATA, epochs=20, lr=0.01, distill=True, alpha=1.0, temperature=4.0)(student, teacher=teacher)
    with torch.no_grad():
        after = distillation_loss(student(x), teacher(x), 4.0).item()
    assert after < 0.2 * before
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_without_teacher_raises():
    with pytest.raises(ValueError, match="teacher"):
        Finetune(DATA, distill=True)(_mlp())


def test_teacher_is_ignored_without_distill():
    teacher = _mlp(seed=1).train()
    a, b = _mlp(), _mlp()
    Finetune(DATA, max_steps=3)(a, teacher=teacher)
    Finetune(DATA, max_steps=3)(b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert teacher.training


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone():
    a, b = _mlp(dropout=0.3), _mlp(dropout=0.3)
    config = Finetune(DATA, epochs=2, seed=7)
    rng_before = torch.get_rng_state()
    config(a, step=3)
    rng_after = torch.get_rng_state()
    config(b, step=3)
    assert torch.equal(rng_before, rng_after)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_different_step_gives_different_shuffle():
    a, b = _mlp(), _mlp()
    Finetune(DATA, epochs=1, seed=7)(a, step=0)
    Finetune(DATA, epochs=1, seed=7)(b, step=1)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_training_modes():
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    teacher = _mlp(seed=1).train()
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    student.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    Finetune(DATA, max_steps=2, distill=True)(student, teacher=teacher)
    assert not student.training
    assert teacher.training
    assert seen == [True, False, True, False]  # student trains, teacher runs in eval

    teacher.eval()
    Finetune(DATA, max_steps=1, distill=True)(student, teacher=teacher)
    assert not teacher.training


def test_model_left_in_eval_mode_when_training_fails():
    model = _mlp().train()

    def broken_loss(logits, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Finetune(DATA, loss_fn=broken_loss)(model)
    assert not model.training


def test_fractional_epochs_and_max_steps():
    loader = DataLoader(DATA, batch_size=24)  # 10 batches
    assert Finetune(loader, epochs=0.5)(_mlp())["steps"] == 5
    assert Finetune(loader, epochs=0.5)(_mlp())["epochs"] == pytest.approx(0.5)
    assert Finetune(loader, epochs=2.5)(_mlp())["steps"] == 25
    assert Finetune(loader, epochs=3, max_steps=4)(_mlp())["steps"] == 4


def test_plain_list_of_batches():
    x, y = DATA.tensors
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)]
    model = _mlp()
    report = Finetune(batches, epochs=10, lr=0.01)(model)
    assert report["steps"] == 10 * len(batches)
    assert _accuracy(model, DATA) >= 0.95


class _NoLen:
    """Re-iterable batches without len()."""

    def __iter__(self):
        x, y = DATA.tensors
        for i in range(0, len(x), 40):
            yield x[i : i + 40], y[i : i + 40]


def test_loader_without_len_needs_max_steps():
    with pytest.raises(ValueError, match="max_steps"):
        Finetune(_NoLen())(_mlp())
    report = Finetune(_NoLen(), max_steps=15)(_mlp())
    assert report["steps"] == 15  # wraps around the 6 batches
    assert math.isnan(report["epochs"])


def test_bad_batches_and_call_arguments():
    with pytest.raises(TypeError, match="length 3"):
        Finetune([(torch.zeros(2, 8), torch.zeros(2), torch.zeros(2))])(_mlp())
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        Finetune(DATA)(_mlp(), step=-1)
    with pytest.raises(TypeError, match="Module"):
        Finetune(DATA)("model")
    with pytest.raises(ValueError, match="empty"):
        Finetune([])(_mlp())
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        Finetune(DATA)(frozen)


def test_divergence_is_reported():
    model = _mlp()
    with pytest.raises(FloatingPointError, match="diverged"):
        Finetune(DATA, max_steps=2, loss_fn=lambda logits, y: logits.sum() * float("nan"))(model)


def test_explicit_device():
    model = _mlp()
    Finetune(DATA, max_steps=2, device="cpu")(model)
    assert next(model.parameters()).device == torch.device("cpu")


# --- distillation_loss, the pure function ---------------------------------------------------


def test_distillation_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    temperature = 3.0
    p_t = torch.softmax(t / temperature, -1)
    expected = temperature**2 * (p_t * (p_t.log() - torch.log_softmax(s / temperature, -1))).sum(-1).mean()
    assert distillation_loss(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(s, s, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, t, temperature).item() > 0


def test_distillation_loss_flattens_leading_dims_and_grads_only_student():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    loss = distillation_loss(s, t, 2.0)
    flat = distillation_loss(s.reshape(6, 5), t.reshape(6, 5), 2.0)
    assert loss.item() == pytest.approx(flat.item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize(
    "student, teacher, temperature, message",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), 1.0, "same shape"),
        (torch.zeros(()), torch.zeros(()), 1.0, "scalar"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 0.0, "got 0.0"),
    ],
    ids=["shape-mismatch", "scalar", "zero-temperature"],
)
def test_distillation_loss_bad_inputs(student, teacher, temperature, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, temperature)


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_schedules_start_at_one_and_stay_in_range(name):
    factor = _schedule(name, 10)
    values = [factor(i) for i in range(11)]
    assert values[0] == 1.0
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    if name != "constant":
        assert values[-1] == pytest.approx(0.0, abs=1e-12)
