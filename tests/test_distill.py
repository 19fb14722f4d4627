"""EncoderDistill: the unlabelled distillation fine-tune of a compressed encoder, on a tiny BERT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import autorank
from autorank.distill import EncoderDistill, budget_fraction, lr_scale, mean_pool

transformers = pytest.importorskip("transformers")

VOCAB = 60


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=24, pad_token_id=0)
    return transformers.BertModel(cfg).eval()


def batch(seed: int, size: int = 6, length: int = 12) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded with 0 (row 0 is full length)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, length), generator=g)
    lengths = torch.randint(3, length + 1, (size,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


BATCHES = [batch(s) for s in range(8)]
HELD = [batch(100 + s) for s in range(3)]


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_bert()
    student = autorank.optimize(teacher, 0.7, BATCHES[0]).model
    return teacher, student


def held_error(student, teacher) -> float:
    """Relative squared error of the student's last token states on held-out batches, real tokens only."""
    num = den = 0.0
    with torch.no_grad():
        for b in HELD:
            keep = b["attention_mask"].bool()
            s, t = (m(**b).last_hidden_state[keep] for m in (student, teacher))
            num, den = num + float((s - t).pow(2).sum()), den + float((t - t.mean(0)).pow(2).sum())
    return num / den


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("frac,warmup,expected", [
    (0.0, 0.0, 1.0), (0.5, 0.0, 0.5), (1.0, 0.0, 0.0), (0.25, 0.0, 0.5 * (1 + math.cos(math.pi / 4))),
    (0.0, 0.1, 0.0), (0.05, 0.1, 0.5), (0.1, 0.1, 1.0), (0.55, 0.1, 0.5), (1.5, 0.1, 0.0),
])
def test_lr_scale_warms_up_linearly_then_decays_by_cosine(frac, warmup, expected):
    assert lr_scale(frac, warmup) == pytest.approx(expected, abs=1e-12)


def test_lr_scale_rejects_a_warmup_outside_0_1():
    with pytest.raises(ValueError, match="warmup"):
        lr_scale(0.5, 1.0)


@pytest.mark.parametrize("elapsed,steps,budget_s,max_steps,expected", [
    (30.0, 0, 60.0, None, 0.5), (0.0, 5, None, 10, 0.5), (30.0, 9, 60.0, 10, 0.9), (45.0, 1, 60.0, 10, 0.75),
    (61.0, 0, 60.0, 1000, 61 / 60),
])
def test_budget_fraction_is_the_further_along_of_time_and_steps(elapsed, steps, budget_s, max_steps, expected):
    assert budget_fraction(elapsed, steps, budget_s, max_steps) == pytest.approx(expected)


def test_budget_fraction_needs_a_budget():
    with pytest.raises(ValueError, match="neither"):
        budget_fraction(1.0, 1, None, None)


def test_mean_pool_ignores_padded_positions():
    b = batch(3)
    h = torch.randn(*b["input_ids"].shape, 5)
    garbage = h.clone()
    garbage[b["attention_mask"] == 0] = 1e6
    expected = torch.stack([h[i, b["attention_mask"][i].bool()].mean(0) for i in range(len(h))])
    torch.testing.assert_close(mean_pool(garbage, b["attention_mask"]), expected)


def test_distillation_brings_a_compressed_bert_closer_and_leaves_the_rest_alone(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    teacher_before, student_before = state(teacher), state(student)
    before = held_error(student, teacher)
    report = EncoderDistill(max_steps=60, lr=3e-3)(student, teacher, BATCHES)
    after = held_error(student, teacher)
    assert report["steps"] == 60 and report["epochs"] == pytest.approx(60 / len(BATCHES))
    assert after < 0.7 * before, (before, after)
    assert report["final_loss"] < report["mean_loss"]
    for k, v in state(teacher).items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    after_state = state(student)
    assert torch.equal(after_state["embeddings.word_embeddings.weight"],
                       student_before["embeddings.word_embeddings.weight"])
    assert any(not torch.equal(after_state[k], student_before[k]) for k in after_state if "encoder" in k)
    assert not student.training and not teacher.training
    assert all(p.requires_grad for p in student.parameters())


def test_the_loss_of_an_exact_copy_is_zero():
    teacher = tiny_bert()
    report = EncoderDistill(max_steps=1, hidden_weight=1.0)(copy.deepcopy(teacher), teacher, BATCHES)
    assert report["mean_loss"] == pytest.approx(0.0, abs=1e-6)


def test_same_seed_same_weights_and_dropout_and_caching_behave(pair):
    teacher, compressed = pair
    runs = {}
    for name, cfg in {"a": EncoderDistill(max_steps=12, lr=1e-3),
                      "b": EncoderDistill(max_steps=12, lr=1e-3),
                      "nocache": EncoderDistill(max_steps=12, lr=1e-3, cache_teacher=False),
                      "dropout": EncoderDistill(max_steps=12, lr=1e-3, dropout=True),
                      "seed1": EncoderDistill(max_steps=12, lr=1e-3, seed=1)}.items():
        student = copy.deepcopy(compressed)
        cfg(student, teacher, BATCHES)
        runs[name] = state(student)

    def same(x, y):
        return all(torch.allclose(runs[x][k], runs[y][k], rtol=0, atol=1e-6) for k in runs[x])
    assert same("a", "b") and same("a", "nocache")
    assert not same("a", "dropout") and not same("a", "seed1")


def test_hidden_weight_adds_the_intermediate_states_term(pair):
    teacher, compressed = pair
    plain = EncoderDistill(max_steps=1, lr=1e-12)(copy.deepcopy(compressed), teacher, BATCHES[:1])
    hidden = EncoderDistill(max_steps=1, lr=1e-12, hidden_weight=2.0)(copy.deepcopy(compressed), teacher, BATCHES[:1])
    b = BATCHES[0]
    keep = b["attention_mask"].bool()
    with torch.no_grad():
        s = compressed(**b, output_hidden_states=True).hidden_states[1:-1]
        t = teacher(**b, output_hidden_states=True).hidden_states[1:-1]
    term = sum(F.mse_loss(x[keep], y[keep]) for x, y in zip(s, t)) / len(s)
    assert hidden["mean_loss"] - plain["mean_loss"] == pytest.approx(2.0 * float(term), rel=1e-4)


def test_freeze_embeddings_false_trains_them(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    before = student.embeddings.word_embeddings.weight.detach().clone()
    EncoderDistill(max_steps=3, lr=1e-3, freeze_embeddings=False)(student, teacher, BATCHES)
    assert not torch.equal(before, student.embeddings.word_embeddings.weight)


def test_a_spent_time_budget_takes_no_step(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    before = state(student)
    report = EncoderDistill(minutes=1e-12)(student, teacher, BATCHES)
    assert report["steps"] == 0 and math.isnan(report["mean_loss"])
    assert all(torch.equal(v, before[k]) for k, v in state(student).items())


@pytest.mark.parametrize("kwargs,err", [
    ({}, ValueError),
    ({"minutes": 0}, ValueError), ({"minutes": -1.0}, ValueError), ({"minutes": float("inf")}, ValueError),
    ({"minutes": "1"}, ValueError), ({"max_steps": 0}, ValueError), ({"max_steps": 2.5}, ValueError),
    ({"max_steps": 5, "lr": 0}, ValueError), ({"max_steps": 5, "warmup": 1.0}, ValueError),
    ({"max_steps": 5, "warmup": -0.1}, ValueError), ({"max_steps": 5, "hidden_weight": -1}, ValueError),
    ({"max_steps": 5, "dropout": "no"}, TypeError), ({"max_steps": 5, "cache_teacher": 1}, TypeError),
    ({"max_steps": 5, "seed": -1}, ValueError), ({"max_steps": 5, "seed": "0"}, TypeError),
    ({"max_steps": 5, "progress": "yes"}, TypeError),
])
def test_config_rejects_bad_values(kwargs, err):
    with pytest.raises(err, match="budget" if not kwargs else next(iter(kwargs)) if len(kwargs) == 1
                       else list(kwargs)[-1]):
        EncoderDistill(**kwargs)


def test_call_rejects_bad_arguments(pair):
    teacher, compressed = pair
    cfg = EncoderDistill(max_steps=1)
    with pytest.raises(ValueError, match="same module"):
        cfg(teacher, teacher, BATCHES)
    with pytest.raises(TypeError, match="teacher"):
        cfg(copy.deepcopy(compressed), "bert", BATCHES)
    with pytest.raises(TypeError, match="batches"):
        cfg(copy.deepcopy(compressed), teacher, BATCHES[0])
    with pytest.raises(ValueError, match="empty"):
        cfg(copy.deepcopy(compressed), teacher, [])
    with pytest.raises(ValueError, match=r"batches\[1\] has no 'attention_mask'"):
        cfg(copy.deepcopy(compressed), teacher, [BATCHES[0], {"input_ids": BATCHES[1]["input_ids"]}])
    with pytest.raises(TypeError, match=r"batches\[0\] must be a dict of tensors, got Tensor"):
        cfg(copy.deepcopy(compressed), teacher, [BATCHES[0]["input_ids"]])
    sharing = copy.deepcopy(compressed)
    sharing.pooler = teacher.pooler
    with pytest.raises(ValueError, match="pooler.dense.weight"):
        cfg(sharing, teacher, BATCHES)


def test_both_budgets_stop_at_the_first_and_warmup_changes_the_run(pair):
    teacher, compressed = pair
    runs = {}
    for name, cfg in {"plain": EncoderDistill(minutes=60, max_steps=5, lr=1e-3),
                      "warmup": EncoderDistill(minutes=60, max_steps=5, lr=1e-3, warmup=0.5)}.items():
        student = copy.deepcopy(compressed)
        assert cfg(student, teacher, BATCHES)["steps"] == 5
        runs[name] = state(student)
    assert any(not torch.equal(runs["plain"][k], runs["warmup"][k]) for k in runs["plain"])


def test_global_random_state_and_every_flag_are_restored_also_on_failure(pair):
    teacher, compressed = pair
    teacher = copy.deepcopy(teacher).train()
    teacher.encoder.layer[0].eval()  # a mixed-mode teacher must come back mixed
    modes = {n: m.training for n, m in teacher.named_modules()}
    student = copy.deepcopy(compressed)
    student.encoder.layer[1].output.dense.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    rng = torch.get_rng_state()
    EncoderDistill(max_steps=3, dropout=True)(student, teacher, BATCHES)
    bad = dict(BATCHES[1], input_ids=BATCHES[1]["input_ids"] + VOCAB)  # out of the vocabulary: fails in forward
    with pytest.raises(IndexError):
        EncoderDistill(max_steps=30)(student, teacher, [BATCHES[0], bad])
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in teacher.named_modules()} == modes
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert not student.training


def test_a_non_finite_loss_stops_before_the_step(pair):
    teacher, compressed = pair
    student = copy.deepcopy(compressed)
    with torch.no_grad():
        student.encoder.layer[1].output.LayerNorm.bias[0] = float("nan")
    before = state(student)
    with pytest.raises(FloatingPointError, match="step 0"):
        EncoderDistill(max_steps=3)(student, teacher, BATCHES)
    assert all(torch.equal(v, before[k]) for k, v in state(student).items() if not torch.isnan(v).any())


@pytest.mark.parametrize("freeze", [True, False])
def test_a_student_with_nothing_to_train_is_a_clear_error_and_comes_back_unchanged(pair, freeze):
    teacher, compressed = pair
    student = copy.deepcopy(compressed).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        EncoderDistill(max_steps=2, freeze_embeddings=freeze)(student, teacher, BATCHES)
    assert not any(p.requires_grad for p in student.parameters())
    assert all(torch.equal(v, compressed.state_dict()[k]) for k, v in student.state_dict().items())
