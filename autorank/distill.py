r"""Distil a compressed encoder back towards the original, on unlabelled inputs.

:class:`EncoderDistill` is the fine-tune that follows compression of an encoder whose
output is a sequence of token states (a ``transformers`` encoder, a sentence
embedder): no labels, only the original model as the teacher. It is a validated config
that, called as ``EncoderDistill(...)(student, teacher, batches)``, trains ``student``
in place under a wall-time budget, a step budget or both.

The loss of a batch, with :math:`h^s_{bt}, h^t_{bt}` the student's and teacher's last
token states (width :math:`d`), :math:`m_{bt}` the attention mask, :math:`T` the real
tokens of the batch and :math:`\bar h_b = \sum_t m_{bt} h_{bt} / \sum_t m_{bt}` the
mean-pooled embedding (what sentence-transformers uses for all-MiniLM-L6-v2):

.. math::

    L = \frac1B \sum_b \Big(1 - \cos(\bar h^s_b, \bar h^t_b)\Big)
      + \frac{1}{Bd} \sum_b \lVert \bar h^s_b - \bar h^t_b \rVert^2
      + \frac{1}{|T| d} \sum_{(b,t) \in T} \lVert h^s_{bt} - h^t_{bt} \rVert^2
      + \frac{\lambda}{L'} \sum_{l=1}^{L'} \frac{1}{|T| d} \sum_{(b,t) \in T}
        \lVert h^{s,l}_{bt} - h^{t,l}_{bt} \rVert^2

where the last term (``hidden_weight`` :math:`= \lambda`, off by default) matches the
:math:`L'` intermediate layers' token states (``output_hidden_states=True``, without
the embeddings' and the last layer's). Padding never counts.

**Dropout is off by default** (``dropout=False``: the student trains in eval mode).
The teacher is deterministic, so dropout only adds noise to a regression target. On
all-MiniLM-L6-v2 at 58 % of its Linear parameters, 900 steps of this loss on the same
compressed model and text reached a mean cosine of 0.9717 to the original's embeddings
with dropout off and 0.9649 with it on; a step without dropout is also about a quarter
cheaper on the CPU (``docs/data_aware.md`` §9, ``benchmarks/bench_minilm.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._util import seeded_rng
from .progress import Progress
from .finetune import module_device
from .nested import to_device
from .validate import check_bool, check_count, check_int, check_nonnegative, check_positive, check_range

__all__ = ["EncoderDistill", "mean_pool", "last_hidden", "lr_scale", "budget_fraction"]

logger = logging.getLogger(__name__)

Target = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]
"""The teacher's outputs for one batch: token states at the real tokens, pooled embeddings, intermediate states."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of ``hidden`` (``B x T x d``) over the tokens where ``mask`` (``B x T``) is set."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def lr_scale(frac: float, warmup: float) -> float:
    r"""The learning-rate factor at the elapsed fraction ``frac`` of the budget.

    A linear warm-up over the first ``warmup`` of the budget, then a cosine decay to
    zero at its end: :math:`f/w` for :math:`f < w`, else
    :math:`\tfrac12\big(1 + \cos(\pi (f - w)/(1 - w))\big)`.
    """
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup:
        return frac / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (frac - warmup) / (1.0 - warmup)))


def budget_fraction(elapsed_s: float, steps: int, budget_s: float | None, max_steps: int | None) -> float:
    """How much of the budget is spent: the larger of the time and step fractions given."""
    fracs = [elapsed_s / budget_s] if budget_s is not None else []
    if max_steps is not None:
        fracs.append(steps / max_steps)
    if not fracs:
        raise ValueError("budget_fraction needs budget_s, max_steps or both, got neither")
    return max(fracs)


def _check_models(student: nn.Module, teacher: nn.Module) -> None:
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if student is teacher:
        raise ValueError("student and teacher are the same module; distil a copy")
    teacher_params = {id(p): n for n, p in teacher.named_parameters()}
    for name, p in student.named_parameters():
        if id(p) in teacher_params:
            raise ValueError(f"the student's parameter {name!r} is the teacher's {teacher_params[id(p)]!r}; "
                             "training would change the teacher: distil a deep copy")


def _check_batches(batches: Any) -> None:
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Sequence):
        raise TypeError(f"batches must be a sequence of dict batches, got {type(batches).__name__}")
    if len(batches) == 0:
        raise ValueError("batches is empty")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise TypeError(f"batches[{i}] must be a dict of tensors, got {type(batch).__name__}")
        if "attention_mask" not in batch:
            raise ValueError(f"batches[{i}] has no 'attention_mask'; its keys are {sorted(batch)}")


def _trainable(model: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """The parameters to train; with ``freeze_embeddings``, every ``nn.Embedding``'s weight is set frozen first."""
    frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()} \
        if freeze_embeddings else set()
    params = []
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    if not params:
        where = " outside its nn.Embedding tables" if freeze_embeddings else ""
        raise ValueError(f"the student has no parameters with requires_grad=True{where}; nothing to train")
    return params


def _hidden_states(out: Any, who: str) -> tuple[torch.Tensor, ...]:
    """The intermediate layers' states of an ``output_hidden_states=True`` output (not the first or last)."""
    states = getattr(out, "hidden_states", None)
    if states is None or len(states) < 3:
        raise ValueError(f"hidden_weight > 0 needs a {who} that returns hidden_states (with output_hidden_states="
                         f"True) of at least one intermediate layer, got {None if states is None else len(states)}")
    return tuple(states[1:-1])


def last_hidden(out: Any) -> torch.Tensor:
    """The last token states of an encoder's output: ``last_hidden_state``, else its first element."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass(frozen=True)
class EncoderDistill:
    """Distil ``student`` towards ``teacher`` on unlabelled batches; ``EncoderDistill(...)(student, teacher, batches)``.

    Attributes:
        minutes: Wall-time budget, the teacher's forward passes included; ``None`` for none.
        max_steps: Step budget; ``None`` for none. At least one of the two budgets is
            needed; with both, training stops at the first one reached and the learning
            rate follows whichever is further along.
        lr: Peak learning rate of AdamW (no weight decay).
        warmup: Fraction of the budget spent on a linear warm-up from zero, in ``[0, 1)``
            (so with a warm-up the first step changes nothing); then a cosine decay to zero
            at the end of the budget (:func:`lr_scale`).
        dropout: Train with the model's dropout on. Off by default: the target is a
            deterministic teacher (see the module docstring for the measured effect).
        hidden_weight: Weight ``lambda >= 0`` of the intermediate layers' token-state MSE;
            ``> 0`` calls both models with ``output_hidden_states=True``.
        freeze_embeddings: Leave every ``nn.Embedding`` of the student as it is
            (compression usually leaves them dense and exact).
        cache_teacher: Keep the teacher's outputs of each batch after its first visit, in
            float32 (memory: the batches' real tokens x width x 4 bytes, times 1 + the
            intermediate layers matched, plus the pooled embeddings).
        seed: Seed of the batch order and of dropout; the global random state is left as
            it was.
        progress: ``True`` a tqdm bar, ``False`` nothing, ``None`` the enclosing
            ``optimize(progress=...)``, else a bar on a terminal and log lines otherwise
            (:mod:`autorank.progress`).
    """

    minutes: float | None = None
    max_steps: int | None = None
    lr: float = 2e-4
    warmup: float = 0.0
    dropout: bool = False
    hidden_weight: float = 0.0
    freeze_embeddings: bool = True
    cache_teacher: bool = True
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.minutes is None and self.max_steps is None:
            raise ValueError("EncoderDistill needs a budget: minutes=, max_steps= or both, got neither")
        check_positive("EncoderDistill.minutes", self.minutes, optional=True)
        check_count("EncoderDistill.max_steps", self.max_steps, optional=True, allow_numpy=True)
        check_positive("EncoderDistill.lr", self.lr)
        check_range("EncoderDistill.warmup", self.warmup, 0.0, 1.0)
        check_nonnegative("EncoderDistill.hidden_weight", self.hidden_weight)
        for name in ("dropout", "freeze_embeddings", "cache_teacher"):
            check_bool(f"EncoderDistill.{name}", getattr(self, name))
        check_int("EncoderDistill.seed", self.seed, low=0, allow_numpy=True)
        check_bool("EncoderDistill.progress", self.progress, optional=True)

    def fit(self, model: nn.Module, context: Any) -> dict[str, float]:
        """The fine-tune protocol (``optimize(..., finetune=EncoderDistill(...))``): distil ``model``
        towards the original model on the calibration batches."""
        if context.calibration is None:
            raise ValueError("EncoderDistill as finetune= distils on the calibration batches: pass calibration=... "
                             "(keyword-argument batches with an attention_mask) to optimize")
        return self(model, context.teacher, list(context.calibration))

    def __call__(self, student: nn.Module, teacher: nn.Module,
                 batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Train ``student`` in place towards ``teacher``; return a summary of the run.

        Args:
            student: The compressed model, sharing no parameter with ``teacher``. It trains
                on its own device and is left in eval mode, with every ``requires_grad``
                as it was, also if training fails.
            teacher: The original model; it runs in eval mode under ``no_grad`` (every
                module's training mode is restored afterwards) and is never changed.
            batches: A sequence of keyword-argument batches with an ``attention_mask``
                (e.g. :func:`autorank.apps.text.tokenize_batches`), visited in a seeded random
                order each epoch.

        Returns:
            ``{"steps", "epochs", "time_s", "mean_loss", "final_loss"}``.
        """
        _check_models(student, teacher)
        _check_batches(batches)
        device = module_device(student)
        hidden = self.hidden_weight > 0
        budget_s = None if self.minutes is None else 60.0 * self.minutes
        grads = {p: p.requires_grad for p in student.parameters()}
        modes = {m: m.training for m in teacher.modules()}
        order_gen = torch.Generator().manual_seed(self.seed)
        cache: dict[int, Target] = {}
        steps = 0
        loss_sum, last = 0.0, float("nan")
        bar = None
        try:
            params = _trainable(student, self.freeze_embeddings)
            bar = Progress("distil", total=self.max_steps, progress=self.progress, unit="step")
            with seeded_rng(self.seed, device):
                opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
                teacher.eval()
                student.train(self.dropout)
                start = time.perf_counter()
                while budget_fraction(time.perf_counter() - start, steps, budget_s, self.max_steps) < 1:
                    for i in torch.randperm(len(batches), generator=order_gen).tolist():
                        frac = budget_fraction(time.perf_counter() - start, steps, budget_s, self.max_steps)
                        if frac >= 1:
                            break
                        for group in opt.param_groups:
                            group["lr"] = self.lr * lr_scale(frac, self.warmup)
                        batch = to_device(dict(batches[i]), device)
                        target = cache[i] if i in cache else self._teacher_outputs(teacher, batch, hidden)
                        if self.cache_teacher:
                            cache[i] = target
                        loss = self._loss(student, batch, target, hidden)
                        last = float(loss.detach())
                        if not math.isfinite(last):
                            raise FloatingPointError(
                                f"distillation diverged at step {steps} (loss {last}, lr={self.lr:g}); the "
                                "student keeps the weights of the step before")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        loss_sum += last
                        steps += 1
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            student.eval()
            for module, mode in modes.items():
                module.training = mode
            for p, g in grads.items():
                p.requires_grad_(g)
        elapsed = time.perf_counter() - start
        mean = loss_sum / steps if steps else float("nan")
        logger.info("distillation: %d steps, %.2f epochs, %.1fs, mean loss %.4g, final loss %.4g",
                    steps, steps / len(batches), elapsed, mean, last)
        return {"steps": steps, "epochs": steps / len(batches), "time_s": elapsed, "mean_loss": mean,
                "final_loss": last}

    @staticmethod
    def _teacher_outputs(teacher: nn.Module, batch: dict[str, torch.Tensor], hidden: bool) -> Target:
        """The teacher's last token states at the real tokens, pooled embeddings and intermediate states, in float32."""
        keep = batch["attention_mask"].bool()
        inputs = to_device(batch, module_device(teacher))
        with torch.no_grad():
            out = teacher(**inputs, output_hidden_states=True) if hidden else teacher(**inputs)
        last = last_hidden(out).to(keep.device, torch.float32)
        mid = [h.to(keep.device, torch.float32)[keep] for h in _hidden_states(out, "teacher")] if hidden else []
        return last[keep], mean_pool(last, batch["attention_mask"]), mid

    def _loss(self, student: nn.Module, batch: dict[str, torch.Tensor], target: Target, hidden: bool) -> torch.Tensor:
        """The loss of the module docstring for one batch."""
        t_tokens, t_pooled, t_mid = target
        keep = batch["attention_mask"].bool()
        out = student(**batch, output_hidden_states=True) if hidden else student(**batch)
        last = last_hidden(out).float()
        pooled = mean_pool(last, batch["attention_mask"])
        loss = (1 - F.cosine_similarity(pooled, t_pooled, dim=-1)).mean() + F.mse_loss(pooled, t_pooled) \
            + F.mse_loss(last[keep], t_tokens)
        if hidden:
            mid = _hidden_states(out, "student")
            if len(mid) != len(t_mid):
                raise ValueError(f"the student returns {len(mid)} intermediate hidden states, the teacher {len(t_mid)}")
            loss = loss + self.hidden_weight * sum(F.mse_loss(h.float()[keep], t) for h, t in zip(mid, t_mid)) / len(mid)
        return loss
