"""Decoder language models from Hugging Face transformers, as they are (issue #16, item 1).

Tiny random-init configs (nothing is downloaded) of LlamaForCausalLM (grouped-query
attention, RoPE, gate/up/down MLP), Qwen2ForCausalLM (q/k/v biases, tied head),
MistralForCausalLM and GPT2LMHeadModel (Conv1D, tied head): analysed, compressed on
``input_ids`` + ``attention_mask`` batches, run, matched at full rank, saved and loaded
bit-identically; a tied ``lm_head`` is left dense and reported in the plan.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autorank
from autorank.families.alds import GroupedLowRankLinear

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 96, 32, 48, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _llama_like(config_cls, model_cls, tied: bool, **extra):
    def build(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        cfg = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=tied, pad_token_id=0, **extra)
        return model_cls(cfg).eval()
    return build


def _gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


# arch: (builder, head is tied, {suffix of a Linear in block i: (out_features, in_features)})
LLAMA_LINEARS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
GPT2_LINEARS = {"attn.c_attn": (3 * HIDDEN, HIDDEN), "attn.c_proj": (HIDDEN, HIDDEN),
                "mlp.c_fc": (4 * HIDDEN, HIDDEN), "mlp.c_proj": (HIDDEN, 4 * HIDDEN)}
ARCHS = {
    "llama-gqa": (_llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, tied=False),
                  False, "model.layers", LLAMA_LINEARS),
    "qwen2-tied": (_llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, tied=True),
                   True, "model.layers", LLAMA_LINEARS),
    "mistral": (_llama_like(transformers.MistralConfig, transformers.MistralForCausalLM, tied=False,
                            sliding_window=None), False, "model.layers", LLAMA_LINEARS),
    "gpt2": (_gpt2, True, "transformer.h", GPT2_LINEARS),
}


def token_batch(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids right-padded (with 0) to ``length``; row 0 is never padded, every other row may be."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def real(batch: dict, y: torch.Tensor) -> torch.Tensor:
    return y[batch["attention_mask"].bool()]


CALIBRATION = [token_batch(4, 12, seed=s) for s in range(1, 3)]
EXAMPLE = token_batch(3, 10, seed=0)
# The default data-aware recipe runs output probes and a sequential refit: a few seconds per call on
# a busy machine.  The default suite runs it on the GQA Llama; the other archs are in the slow suite.
CALIBRATED = [pytest.param(a, marks=() if a == "llama-gqa" else pytest.mark.slow) for a in ARCHS]


@pytest.mark.parametrize("arch", ARCHS)
def test_analyser_finds_every_block_linear_with_its_geometry_and_reports_a_tied_head(arch):
    build, tied, blocks, linears = ARCHS[arch]
    model = build()
    g = autorank.analyze(model, EXAMPLE)
    expected = {f"{blocks}.{i}.{s}": shape for i in range(LAYERS) for s, shape in linears.items()}
    found = {n for n in g.layers if n != "lm_head"}
    assert found == set(expected)
    for name, (f, c) in expected.items():
        info = g.layers[name]
        assert (info.out_features, info.in_channels) == (f, c), name
        assert info.positions == EXAMPLE["input_ids"].numel()  # every position, padded ones included
    if tied:
        assert "lm_head" not in g.layers and "tied" in g.skipped["lm_head"]
    else:
        assert (g.layers["lm_head"].out_features, g.layers["lm_head"].in_channels) == (VOCAB, HIDDEN)


@pytest.mark.parametrize("arch", CALIBRATED)
def test_data_aware_compression_meets_budget_runs_and_keeps_a_tied_head_dense(arch):
    build, tied, _, _ = ARCHS[arch]
    model = build()
    result = autorank.optimize(model, 0.6, EXAMPLE, calibration=CALIBRATION, progress=False)
    before, after = autorank.count_params(model), autorank.count_params(result.model)
    assert after <= 0.6 * before and result.plan.totals["params"] == after
    compressed = [n for n, lp in result.plan.layers.items() if lp.compressed]
    assert compressed and all(isinstance(result.model.get_submodule(n), GroupedLowRankLinear) for n in compressed)
    other = token_batch(2, 7, seed=9)  # another shape and padding than the calibration
    y0, y1 = logits(model, other), logits(result.model, other)
    assert y1.shape == (2, 7, VOCAB) and torch.isfinite(y1).all()
    assert not torch.allclose(real(other, y0), real(other, y1))  # it really is compressed
    head = result.model.get_output_embeddings()
    if tied:
        assert "tied" in result.plan.skipped["lm_head"]
        assert head.weight is result.model.get_input_embeddings().weight  # still tied, still dense
        assert isinstance(head, nn.Linear)


@pytest.mark.parametrize("arch,data_aware", [(a, False) for a in ARCHS] + [
    pytest.param(a, True, marks=() if a == "llama-gqa" else pytest.mark.slow) for a in ARCHS])
def test_full_rank_budget_reproduces_the_logits(arch, data_aware):
    build, _, _, _ = ARCHS[arch]
    model = build()
    kw = {"calibration": CALIBRATION} if data_aware else {}
    result = autorank.optimize(model, 1.0, EXAMPLE, progress=False, **kw)
    other = token_batch(2, 7, seed=9)
    torch.testing.assert_close(real(other, logits(result.model, other)), real(other, logits(model, other)),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_into_a_fresh_model_gives_bit_identical_logits(arch, tmp_path):
    build, tied, _, _ = ARCHS[arch]
    model = build(seed=0)
    # weight-only keeps the default suite fast; what is saved (factors, plan) is the same kind either way
    result = autorank.optimize(model, 0.5, EXAMPLE, progress=False)
    autorank.save(result.model, result.plan, tmp_path / "c")
    fresh = build(seed=1)  # same config, other weights: every weight must come from the file
    assert not torch.equal(logits(fresh, EXAMPLE), logits(model, EXAMPLE))
    loaded = autorank.load(tmp_path / "c", fresh)
    other = token_batch(2, 7, seed=9)
    assert torch.equal(logits(loaded, other), logits(result.model, other))
    assert autorank.count_params(loaded) == result.plan.totals["params"]
    if tied:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
