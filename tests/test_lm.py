"""Perplexity, the module-disjoint text split and the LLM baselines (issue #16, items 4 and 5).

Known-answer tests on hand-built models: uniform logits give perplexity = vocabulary size; a
bigram table gives a perplexity computed here by hand (an off-by-one shift would miss it).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autorank
from autorank.allocators.llm import svd_llm_rank
from autorank.apps import lm
from autorank.calibration import collect_moments
from autorank.apps.lm_baselines import asvd_factors, threshold_ranks
from autorank.linalg import whitened_factors_cholesky

V = 11


class Uniform(nn.Module):
    """Logits 0 everywhere: every token has probability 1/V."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, V) + 0 * self.p


class Bigram(nn.Module):
    """Logits at position t are ``table[x_t]``: the next token depends on this one only."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def bigram_nll(model: Bigram, prev: int, nxt: int) -> float:
    return -float(torch.log_softmax(model.table[prev].detach().double(), -1)[nxt])


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0], [10, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask}


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    model = Uniform()
    assert lm.perplexity(model, padded_batch()) == pytest.approx(V, rel=1e-6)
    stream = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(0))
    assert lm.perplexity(model, stream, window=8, stride=3) == pytest.approx(V, rel=1e-6)


def test_bigram_perplexity_scores_real_next_tokens_only_and_not_the_first_of_a_window():
    model = Bigram()
    batch = padded_batch()
    total, count = lm.token_nll(model, [batch])
    # row 0: 5 targets; row 1: 2 (8, 9; the pads carry no loss); row 2: 1 (3)
    pairs = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (7, 8), (8, 9), (10, 3)]
    assert count == len(pairs)
    assert total == pytest.approx(sum(bigram_nll(model, a, b) for a, b in pairs), rel=1e-6)
    assert lm.perplexity(model, [batch]) == pytest.approx(math.exp(total / count), rel=1e-12)


@pytest.mark.parametrize("window,stride,count", [(8, 8, 5 * 7), (8, 3, 7 + 10 * 3), (5, 1, 4 + 35)])
def test_strided_windows_score_each_token_once_and_never_a_window_start(window, stride, count):
    model = Bigram(seed=1)
    stream = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2))
    n_windows = (len(stream) - window) // stride + 1
    # window k starts at k*stride; it scores its positions max(1, window - stride) .. window - 1
    # (window 0: 1 .. window - 1): the first token of a window carries no loss, overlaps are scored once
    scored = set(range(1, window))
    for k in range(1, n_windows):
        scored |= {k * stride + p for p in range(max(1, window - stride), window)}
    assert len(scored) == count
    expected = sum(bigram_nll(model, int(stream[t - 1]), int(stream[t])) for t in scored) / count
    assert lm.perplexity(model, stream, window=window, stride=stride, batch_size=2) == pytest.approx(
        math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 4, "stride": 5}, "stride=5 must not exceed window=4"),
    ({}, "needs window="),
])
def test_perplexity_rejects_bad_windows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.perplexity(Uniform(), torch.arange(20) % V, **kwargs)


def test_split_by_module_puts_each_source_module_on_one_side():
    corpus = [(f"pkg.m{i % 40}", f"text {i}") for i in range(400)]
    train, held = lm.split_by_module(corpus, eval_percent=20)
    side = {}
    for module, text in corpus:
        s = "eval" if text in held else "train"
        assert side.setdefault(module, s) == s  # a module never lands on both sides
    assert set(side.values()) == {"train", "eval"} and len(train) + len(held) == 400


@pytest.mark.parametrize("ratio,f,n,rank", [(0.6, 64, 64, 19), (0.8, 768, 256, 153), (0.0, 8, 8, 1), (1.0, 3, 6, 2)])
def test_svd_llm_rank_keeps_the_ratio_of_parameters(ratio, f, n, rank):
    r = svd_llm_rank(ratio, f, n)
    assert r == rank and r * (f + n) <= max(ratio * f * n, f + n)


def test_svd_llm_allocator_gives_every_matrix_the_same_parameter_ratio_and_whitened_factors():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cal = lm.lm_batches(torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1)), 4)
    data = autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False)
    res = autorank.optimize(model, 0.7, cal[0], calibration=cal, data=data, progress=False,
                            compression=autorank.Compression(allocator="svd_llm", exclude=("lm_head",)))
    ranks = {n: lp.hyper["rank"] for n, lp in res.plan.layers.items() if lp.compressed}
    assert len(ranks) == 7
    rhos = []
    for name, r in ranks.items():
        f, n = model.get_submodule(name).weight.shape
        rho_lo, rho_hi = r * (f + n) / (f * n), (r + 1) * (f + n) / (f * n)  # svd_llm_rank(rho) == r on [lo, hi)
        rhos.append((rho_lo, rho_hi))
    assert max(lo for lo, _ in rhos) < min(hi for _, hi in rhos)  # one ratio rho gives every rank
    # the realised layer is the SVD-LLM truncation [W L]_r L^{-1} (Cholesky form, float64, jitter)
    graph = autorank.analyze(model, cal[0])
    moments = collect_moments(model, {n: graph.layers[n] for n in ranks}, cal)
    for name, r in ranks.items():
        m = moments[name]
        a, b = whitened_factors_cholesky(model.get_submodule(name).weight, m.sum / m.count, r, damping=1e-12)
        got = res.model.get_submodule(name).to_dense().weight.double()
        torch.testing.assert_close(got, b @ a, atol=1e-5, rtol=1e-4)


def test_asvd_factors_reproduce_the_weight_at_full_rank_and_are_plain_svd_at_alpha_zero():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    scale = torch.rand(8, generator=g, dtype=torch.float64) + 0.1
    a, b = asvd_factors(w, scale, 8)
    torch.testing.assert_close(b @ a, w)
    a, b = asvd_factors(w, scale, 3, alpha=0.0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :3] * s[:3]) @ vh[:3])
    a, b = asvd_factors(w, scale, 3)  # alpha 0.5: the truncation of W S, mapped back
    ws = w * scale.sqrt()
    u, s, vh = torch.linalg.svd(ws, full_matrices=False)
    torch.testing.assert_close(b @ a, ((u[:, :3] * s[:3]) @ vh[:3]) / scale.sqrt())


def test_threshold_ranks_is_the_smallest_threshold_that_fits():
    sizes = {"a": (10, 10), "b": (10, 10)}  # dense 100 each; rank r costs 20 r
    table = {"a": [(1, 9.0), (2, 5.0), (4, 2.0)], "b": [(1, 3.0), (2, 2.5), (4, 1.0)]}
    assert threshold_ranks(table, sizes, room=200) == {"a": None, "b": 4}  # tau = 1.0: dense 100 + 80
    assert threshold_ranks(table, sizes, room=130) == {"a": 4, "b": 2}  # tau = 2.5: 80 + 40
    assert threshold_ranks(table, sizes, room=60) == {"a": 2, "b": 1}  # tau = 5.0: 40 + 20
    with pytest.raises(ValueError, match="cost more than the room"):
        threshold_ranks(table, sizes, room=30)


# (size, parameters with a 2048-token vocabulary, blocks, key/value heads)
SIZES = [("tiny", 1_311_872, 4, 2), ("small", 20_978_176, 6, 4)]


@pytest.mark.parametrize("size, params, blocks, kv", SIZES)
def test_doc_llama_sizes(size, params, blocks, kv):
    from transformers import LlamaForCausalLM

    config = lm.doc_llama_config(2048, size)
    assert (config.num_hidden_layers, config.num_key_value_heads) == (blocks, kv)
    assert config.num_attention_heads > config.num_key_value_heads  # grouped-query attention
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("kwargs, match", [({"size": "huge"}, "size='huge'"), ({"lr": -1.0}, "lr=-1.0"),
                                           ({"steps": 0}, "steps")])
def test_train_doc_llama_names_a_bad_argument_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.train_doc_llama(cache_dir=None, **kwargs)
