"""Causal language models on real text, offline: corpus, tokenizer, perplexity and a trained small Llama.

* :func:`module_corpus` -- real English prose from the docstrings of installed packages,
  each paragraph labelled with its source module; :func:`split_by_module` splits it so that
  no source module is on both sides (training / calibration text versus evaluation text).
* :func:`train_bpe` -- a byte-level BPE tokenizer trained here (``tokenizers``), nothing
  downloaded; :func:`token_stream` / :func:`windows` -- one token stream cut into fixed-length
  windows; :func:`lm_batches` -- those windows as ``{"input_ids", "attention_mask"}`` batches,
  usable as ``example_inputs`` and ``calibration=`` of :func:`autorank.optimize`.
* :func:`perplexity` -- ``exp`` of the mean token negative log-likelihood of a causal LM on
  token windows; padding and the first token of each window carry no loss (:func:`token_nll`).
* :func:`train_doc_llama` -- a small ``LlamaForCausalLM`` (grouped-query attention, RoPE,
  gate/up/down MLP) trained once on that corpus and cached as safetensors, like
  :func:`autorank.apps.zoo.train_mnist_cnn`.

``transformers`` and ``tokenizers`` are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util import user_cache_dir
from ..nested import to_device
from ..validate import check_count
from .text import package_docstrings, prose_paragraphs

__all__ = [
    "DOC_PACKAGES", "module_corpus", "split_by_module", "train_bpe", "token_stream", "windows",
    "lm_batches", "lm_logits", "token_nll", "perplexity", "DocLlama", "DOC_LLAMA_SIZES", "DOC_LLAMA_RECIPES", "doc_llama_config", "train_doc_llama",
]

logger = logging.getLogger(__name__)

# Installed packages whose docstrings are the text (about 47,000 paragraphs, 1.0 M words).
DOC_PACKAGES = ("numpy", "scipy", "torch", "pandas", "sympy", "networkx", "matplotlib")


# ---- text ----------------------------------------------------------------------------------

def source_module(home: str, depth: int = 2) -> str:
    """The first ``depth`` parts of a dotted module name: ``scipy.stats._continuous`` -> ``scipy.stats``."""
    check_count("depth", depth)
    return ".".join(home.split(".")[:depth])


def module_corpus(packages: Sequence[str] = DOC_PACKAGES, min_words: int = 4,
                  max_words: int = 200) -> list[tuple[str, str]]:
    """``(source module, paragraph)`` for every prose paragraph of the docstrings of ``packages``.

    The walk and the paragraph filter are those of :func:`autorank.apps.text.docstring_paragraphs`;
    the source module is the first two parts of the home module of the documented object
    (:func:`source_module`).  Duplicate paragraphs are dropped (the first is kept), so the list
    is deterministic for given package versions.
    """
    import warnings

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    with warnings.catch_warnings():  # deprecated attributes warn when their docstring is read
        warnings.simplefilter("ignore")
        for home, doc in package_docstrings(list(packages)):
            for para in prose_paragraphs(doc, min_words, max_words):
                if para not in seen:
                    seen.add(para)
                    out.append((source_module(home), para))
    return out


def is_eval_module(module: str, eval_percent: int = 10) -> bool:
    """Whether ``module`` is on the evaluation side: ``crc32(module) mod 100 < eval_percent``."""
    return zlib.crc32(module.encode()) % 100 < eval_percent


def split_by_module(corpus: Iterable[tuple[str, str]], eval_percent: int = 10) -> tuple[list[str], list[str]]:
    """``(train texts, eval texts)``: a source module's paragraphs all go to one side (:func:`is_eval_module`).

    The sides share no source module, so evaluation text is held out by module, not only by
    paragraph.  Each side keeps the corpus order.
    """
    if not 0 < eval_percent < 100:
        raise ValueError(f"eval_percent must be in 1..99, got {eval_percent!r}")
    train: list[str] = []
    held: list[str] = []
    for module, text in corpus:
        (held if is_eval_module(module, eval_percent) else train).append(text)
    if not train or not held:
        raise ValueError(f"split_by_module put every text on one side (train {len(train)}, eval {len(held)})")
    return train, held


# ---- tokens --------------------------------------------------------------------------------

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Sequence[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; ids 0 and 1 are ``<|endoftext|>`` and ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_count("vocab_size", vocab_size, low=260)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """The texts tokenised and joined into one 1-D int64 stream, each text followed by ``<|endoftext|>``."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, length: int, stride: int | None = None) -> torch.Tensor:
    """``(N, length)``: windows of ``stream`` starting every ``stride`` tokens (default: ``length``, no overlap).

    A tail shorter than ``length`` is dropped.
    """
    check_count("length", length, low=2)
    stride = length if stride is None else stride
    check_count("stride", stride)
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if stream.numel() < length:
        raise ValueError(f"stream has {stream.numel()} tokens, fewer than one window of {length}")
    return stream.unfold(0, length, stride).contiguous()


def lm_batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``rows`` (N, T) as ``{"input_ids", "attention_mask"}`` batches of ``batch_size`` (the last may be smaller)."""
    check_count("batch_size", batch_size)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows.split(batch_size)]


# ---- perplexity ----------------------------------------------------------------------------

def lm_logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits`` (Hugging Face), the first item of a tuple, or the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _as_batch(batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError(f"a batch must be an (B, T) id tensor or a dict with 'input_ids', got {type(batch).__name__}")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return batch, mask


@torch.no_grad()
def token_nll(model: nn.Module, batches: Iterable[Any], skip: int = 0) -> tuple[float, int]:
    r"""``(sum of token NLL, number of scored tokens)`` of a causal LM on token windows.

    Each row of a batch is one window.  Token :math:`t` of a window is scored by the logits at
    :math:`t-1`, :math:`-\log \mathrm{softmax}(z_{t-1})[x_t]`, when it and the token before it
    are real (``attention_mask`` 1) and :math:`t \ge \max(1, \text{skip})`: padding and the
    first token of each window carry no loss, and with overlapping windows ``skip`` leaves out
    the positions a previous window already scored.  Sums are float64.
    """
    check_count("skip", skip, low=0)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            batch, mask = _as_batch(batch)
            ids = batch["input_ids"]
            logits = lm_logits(model(**to_device(batch, device))).float()
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"logits of shape {tuple(logits.shape)} do not match input_ids {tuple(ids.shape)}")
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:].to(logp.device)
            nll = -logp.gather(-1, target[..., None])[..., 0]
            keep = (mask[:, 1:] & mask[:, :-1]).to(logp.device)
            if skip > 1:
                keep[:, : skip - 1] = False
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, data: Any, window: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> float:
    r"""Perplexity :math:`\exp(\frac{1}{N}\sum_t -\log p(x_t \mid x_{<t}))` of a causal LM.

    ``data`` is either token batches (an ``(B, T)`` id tensor or a dict with ``input_ids`` and
    ``attention_mask``, or a list of them), each row one window, or a 1-D token stream, which
    is cut into windows of ``window`` tokens every ``stride`` (default ``window``): with
    ``stride < window`` each window after the first scores only its last ``stride`` tokens
    (the others are its context).  Padding and the first token of each window carry no loss
    (:func:`token_nll`).
    """
    skip = 0
    if isinstance(data, torch.Tensor) and data.dim() == 1:
        if window is None:
            raise ValueError("perplexity of a 1-D token stream needs window=")
        stride = window if stride is None else stride
        if stride > window:
            raise ValueError(f"stride={stride} must not exceed window={window} (tokens would be skipped)")
        rows = windows(data, window, stride)
        first, rest = rows[:1], rows[1:]
        total, count = token_nll(model, [first])
        if len(rest):
            t, c = token_nll(model, lm_batches(rest, batch_size), skip=window - stride)
            total, count = total + t, count + c
    else:
        if window is not None or stride is not None:
            raise ValueError("window= and stride= apply to a 1-D token stream; batches are windows already")
        if isinstance(data, (torch.Tensor, dict)):
            data = [data]
        total, count = token_nll(model, data, skip=skip)
    if count == 0:
        raise ValueError("no token was scored (every window is shorter than 2 real tokens)")
    return math.exp(total / count)


# ---- a small Llama trained on package docs -------------------------------------------------

@dataclass(frozen=True)
class DocLlama:
    """The trained model, its tokenizer and the token windows of the benchmark (disjoint by module).

    ``train``: windows of the training side (the calibration text is drawn from it);
    ``held_out``: windows of the evaluation side, whose source modules the model never saw.
    """

    model: nn.Module
    tokenizer: Any
    train: torch.Tensor
    held_out: torch.Tensor
    log: tuple[dict[str, float], ...]


# Bump when the architecture, the corpus or the recipe changes, so stale weights are not loaded.
_DOC_LLAMA_VERSION = 1
DOC_LLAMA_WINDOW = 128


# The shapes of :func:`doc_llama_config`: width, MLP width, blocks, heads, key/value heads (GQA).
DOC_LLAMA_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 384, 4, 4, 2),     # 1.31 M parameters with the default vocabulary; trains in about a minute
    "small": (512, 1536, 6, 8, 4),   # 21.0 M parameters (18.9 M in the 42 block Linears); tens of minutes
}
# The training recipe of each size when train_doc_llama is not told: (steps, batch_size, peak lr).
DOC_LLAMA_RECIPES: dict[str, tuple[int, int, float]] = {"tiny": (600, 8, 2e-3), "small": (1000, 16, 1e-3)}


def doc_llama_config(vocab_size: int, size: str = "tiny") -> Any:
    """The ``LlamaConfig`` of ``size`` (:data:`DOC_LLAMA_SIZES`): heads of 32 (tiny) or 64 (small), half as many key/value heads (GQA), untied head."""
    from transformers import LlamaConfig

    if size not in DOC_LLAMA_SIZES:
        raise ValueError(f"size={size!r} is not one of {sorted(DOC_LLAMA_SIZES)}")
    hidden, inter, layers, heads, kv = DOC_LLAMA_SIZES[size]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2 * DOC_LLAMA_WINDOW,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _doc_data(vocab_size: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    train_texts, eval_texts = split_by_module(module_corpus())
    tok = train_bpe(train_texts, vocab_size)
    train = windows(token_stream(tok, train_texts), DOC_LLAMA_WINDOW)
    held = windows(token_stream(tok, eval_texts), DOC_LLAMA_WINDOW)
    return tok, train, held


def train_doc_llama(cache_dir: str | os.PathLike | None | bool = True, steps: int | None = None,
                    batch_size: int | None = None, lr: float | None = None, seed: int = 0, vocab_size: int = 2048,
                    force: bool = False, size: str = "tiny") -> DocLlama:
    """A ``LlamaForCausalLM`` (:func:`doc_llama_config` of ``size``: "tiny", 1.31 M parameters, or "small", 21.0 M) trained on :data:`DOC_PACKAGES` docs.

    Text: :func:`module_corpus` split by :func:`split_by_module` (about 10 % of the source modules
    held out); a byte-level BPE of ``vocab_size`` trained on the training side; windows of 128
    tokens.  Training: ``steps`` AdamW steps (betas 0.9/0.95, weight decay 0.1) of ``batch_size``
    random training windows (unset: :data:`DOC_LLAMA_RECIPES` of ``size``; tiny: 600 steps of 8 at
    2e-3, small: 1000 steps of 16 at 1e-3), peak ``lr`` after 5 % linear warm-up then cosine to 10 %, gradients
    clipped to norm 1, seeded by ``seed``.  The loss and the held-out perplexity are logged and kept
    in ``log``.  The weights, the tokenizer and the log are cached in ``cache_dir`` (``True``: the
    user cache folder, :func:`autorank._util.user_cache_dir`, ``$AUTORANK_CACHE`` to override it)
    under a name that encodes the recipe, so a later call loads them; ``force`` retrains,
    ``cache_dir=None`` (or ``False``) never caches.  Returns the model on CPU in eval mode.
    """
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    doc_llama_config(vocab_size, size)  # names a bad size before any work
    default = DOC_LLAMA_RECIPES[size]
    steps = default[0] if steps is None else steps
    batch_size = default[1] if batch_size is None else batch_size
    lr = default[2] if lr is None else lr
    for name, v in (("steps", steps), ("batch_size", batch_size), ("vocab_size", vocab_size)):
        check_count(name, v)
    check_count("seed", seed, low=0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive finite number")
    shape = "" if size == "tiny" else f"-{size}"
    stem = f"doc_llama-v{_DOC_LLAMA_VERSION}{shape}-V{vocab_size}-n{steps}-b{batch_size}-lr{lr:g}-s{seed}"
    folder = user_cache_dir() if cache_dir is True else None if cache_dir in (None, False) else Path(cache_dir)
    if folder is not None and (folder / f"{stem}.safetensors").is_file() and not force:
        tok = Tokenizer.from_file(str(folder / f"{stem}.tokenizer.json"))
        _, train, held = _doc_data_with(tok)
        model = LlamaForCausalLM(doc_llama_config(tok.get_vocab_size(), size))
        model.load_state_dict(load_file(str(folder / f"{stem}.safetensors")))
        log = tuple(json.loads((folder / f"{stem}.log.json").read_text()))
        logger.info("loaded cached doc-Llama from %s", folder / f"{stem}.safetensors")
        return DocLlama(model.eval(), tok, train, held, log)

    logger.warning("training the %s doc-Llama (%d steps of %d windows; minutes on 2 CPU cores)%s", size, steps, batch_size,
                   f"; it will be cached in {folder}" if folder is not None else " (no cache: cache_dir=None)")
    tok, train, held = _doc_data(vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(doc_llama_config(tok.get_vocab_size(), size))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, steps // 20)

    def scale(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, scale)
    g = torch.Generator().manual_seed(seed)
    probe = held[:64]
    log: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0
    model.train()
    for step in range(1, steps + 1):
        ids = train[torch.randint(len(train), (batch_size,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % 100 == 0 or step == steps:
            n = 100 if step % 100 == 0 else step % 100
            entry = {"step": step, "train_loss": running / n, "seconds": time.perf_counter() - start}
            running = 0.0
            if step % 500 == 0 or step == steps:
                entry["held_out_ppl"] = perplexity(model, lm_batches(probe, 16))
                model.train()
            log.append(entry)
            logger.info("doc-Llama step %d: %s", step, entry)
    model.eval()
    logger.info("trained doc-Llama (%d params) for %d steps in %.0fs: held-out perplexity %.2f",
                sum(p.numel() for p in model.parameters()), steps, time.perf_counter() - start,
                log[-1]["held_out_ppl"])
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{stem}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tok.save(str(folder / f"{stem}.tokenizer.json"))
        (folder / f"{stem}.log.json").write_text(json.dumps(log, indent=1))
        os.replace(tmp, folder / f"{stem}.safetensors")
        logger.info("cached doc-Llama at %s", folder / f"{stem}.safetensors")
    return DocLlama(model, tok, train, held, tuple(log))


def _doc_data_with(tok: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    train_texts, eval_texts = split_by_module(module_corpus())
    return (tok, windows(token_stream(tok, train_texts), DOC_LLAMA_WINDOW),
            windows(token_stream(tok, eval_texts), DOC_LLAMA_WINDOW))
