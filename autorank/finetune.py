"""Built-in fine-tuning loop for classification models.

:class:`Finetune` is the retraining step of a compress -> fine-tune schedule:
a validated config that, when called on a model, trains it in place for a
(possibly fractional) number of epochs and reports what it did. It can also
distil from a teacher (usually the uncompressed model) with
:func:`distillation_loss`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._util import seeded_rng
from .progress import Progress
from .nested import to_device
from .validate import (
    check_bool, check_choice, check_count, check_int, check_nonnegative, check_positive, check_range,
)

__all__ = ["Finetune", "FinetuneContext", "run_finetuner", "check_finetuner", "distillation_loss"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""Knowledge-distillation term of Hinton et al. (2015).

    .. math::

        L_{KD} = T^2 \cdot \frac{1}{N} \sum_{n=1}^{N}
                 \mathrm{KL}\big(\mathrm{softmax}(t_n / T) \,\|\, \mathrm{softmax}(s_n / T)\big)

    where ``s`` are the student logits, ``t`` the teacher logits, ``T`` the
    temperature and the class dimension is the last one. Leading dimensions
    other than the last are flattened into ``N`` rows, so per-token logits of
    shape ``(B, L, C)`` average over all ``B * L`` positions. The ``T^2``
    factor keeps the gradient scale independent of ``T``.

    Gradients flow into ``student_logits`` only; ``teacher_logits`` are detached.
    The result is a non-negative scalar, zero when the two distributions match.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() == 0:
        raise ValueError("logits must have at least one (class) dimension, got a scalar")
    check_positive("temperature", temperature)
    num_classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, num_classes) / temperature
    teacher = teacher_logits.detach().reshape(-1, num_classes).to(student.dtype) / temperature
    kl = F.kl_div(
        F.log_softmax(student, dim=-1),
        F.log_softmax(teacher, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * (temperature * temperature)


@dataclass
class Finetune:
    """Fine-tune a classifier in place; call it as ``Finetune(...)(model, step, teacher)``.

    Attributes:
        train_loader: Any re-iterable of ``(inputs, targets)`` batches (a
            ``DataLoader``, a list of tuples, ...). A ``torch.utils.data.Dataset``
            is wrapped into a ``DataLoader`` with ``batch_size`` and a shuffle
            seeded from ``seed`` and ``step``.
        epochs: Passes over ``train_loader``; fractional values train on the
            first ``ceil(epochs * len(train_loader))`` batches in total. A
            loader without ``len()`` needs ``max_steps`` instead.
        lr: Peak learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (ignored by Adam and AdamW), in ``[0, 1)``.
        weight_decay: L2 penalty (decoupled for AdamW), ``>= 0``.
        lr_schedule: ``"constant"``, ``"cosine"`` (to zero) or ``"linear"`` (to
            zero), applied per iteration over the planned number of steps.
        distill: Add a distillation term against the teacher passed to the call.
        temperature: Softening temperature ``T`` of the distillation term.
        alpha: Weight of the distillation term:
            ``loss = (1 - alpha) * task_loss + alpha * distillation_loss(s, t, T)``.
        device: Where to train; ``None`` keeps the model's current device. The
            model is left on this device afterwards.
        seed: Base seed; the effective seed mixes in the scheduler ``step``.
            ``None`` leaves randomness to the global generators.
        max_steps: Upper bound on the number of optimiser steps.
        progress: ``True`` a tqdm bar, ``False`` nothing, ``None`` the enclosing
            ``optimize(progress=...)``, else a bar on a terminal and log lines otherwise
            (:mod:`autorank.progress`).
        loss_fn: ``loss_fn(logits, targets) -> scalar``; cross-entropy if ``None``.
        batch_size: Batch size used only when ``train_loader`` is a ``Dataset``.
    """

    train_loader: Any
    epochs: float = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    distill: bool = False
    temperature: float = 4.0
    alpha: float = 0.5
    device: str | torch.device | None = None
    seed: int | None = 0
    max_steps: int | None = None
    progress: bool | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        loader = self.train_loader
        if loader is None:
            raise ValueError("Finetune.train_loader is required, got None")
        if isinstance(loader, (str, bytes)) or not (
            isinstance(loader, Dataset) or isinstance(loader, Iterable)
        ):
            raise TypeError(
                "Finetune.train_loader must be a Dataset or an iterable of "
                f"(inputs, targets) batches, got {type(loader).__name__}"
            )
        check_positive("Finetune.epochs", self.epochs)
        check_positive("Finetune.lr", self.lr)
        check_choice("Finetune.optimizer", self.optimizer, OPTIMIZERS, require_str=True)
        check_range("Finetune.momentum", self.momentum, 0.0, 1.0)
        check_nonnegative("Finetune.weight_decay", self.weight_decay)
        check_choice("Finetune.lr_schedule", self.lr_schedule, LR_SCHEDULES, require_str=True)
        check_bool("Finetune.distill", self.distill)
        check_positive("Finetune.temperature", self.temperature)
        check_range("Finetune.alpha", self.alpha, 0.0, 1.0, closed=True)
        if self.device is not None:
            if not isinstance(self.device, (str, torch.device)):
                raise TypeError(
                    f"Finetune.device must be a str, torch.device or None, got {self.device!r}"
                )
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"Finetune.device is not a valid device, got {self.device!r}") from exc
        check_int("Finetune.seed", self.seed, low=0, optional=True, allow_numpy=True)
        check_count("Finetune.max_steps", self.max_steps, optional=True, allow_numpy=True)
        check_bool("Finetune.progress", self.progress, optional=True)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"Finetune.loss_fn must be callable or None, got {self.loss_fn!r}")
        check_count("Finetune.batch_size", self.batch_size, allow_numpy=True)

    def __call__(self, model: nn.Module, step: int = 0, teacher: nn.Module | None = None) -> dict:
        """Train ``model`` in place and return a summary of the run.

        Args:
            model: The model to train. It is moved to ``device`` (and stays
                there) and is left in eval mode, also if training fails.
            step: Index of the compress -> fine-tune round; it only varies the
                seed and labels the log lines.
            teacher: Model to distil from; required when ``distill`` is set and
                ignored otherwise. It runs in eval mode under ``no_grad`` on its
                own device, and its training mode is restored afterwards.

        Returns:
            ``{"steps", "epochs", "final_loss", "mean_loss", "time_s"}``: the
            number of optimiser steps, the epochs they amount to (``nan`` for a
            loader without ``len()``), the loss of the last batch, the mean loss
            over all batches and the wall-clock time.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_count("step", step, low=0, allow_numpy=True)
        if self.distill:
            if teacher is None:
                raise ValueError("Finetune(distill=True) needs a teacher model, got teacher=None")
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        else:
            teacher = None

        device = torch.device(self.device) if self.device is not None else module_device(model)
        seed = None if self.seed is None else _mix_seed(self.seed, step)
        loader = self._loader(seed)
        batches_per_epoch = _safe_len(loader)
        total_steps = self._planned_steps(batches_per_epoch)

        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters with requires_grad=True to fine-tune")

        teacher_was_training = teacher.training if teacher is not None else False
        loss_fn = self.loss_fn if self.loss_fn is not None else F.cross_entropy

        logger.info(
            "finetune round %d: %d steps on %s (lr=%g, %s, %s schedule%s)",
            step, total_steps, device, self.lr, self.optimizer, self.lr_schedule,
            f", distill T={self.temperature:g} alpha={self.alpha:g}" if teacher is not None else "",
        )
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        last_loss = torch.full((), float("nan"), dtype=torch.float64, device=device)
        done = 0
        try:
            with seeded_rng(seed, device):
                model.to(device)
                optimizer = self._optimizer([p for p in model.parameters() if p.requires_grad])
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, _schedule(self.lr_schedule, total_steps)
                )
                model.train()
                if teacher is not None:
                    teacher.eval()
                bar = Progress(f"finetune round {step}", total=total_steps, progress=self.progress, unit="step")
                batches = _cycle(loader)
                try:
                    for _ in range(total_steps):
                        batch = next(batches, None)
                        if batch is None:
                            break
                        loss = self._batch_loss(model, batch, device, loss_fn, teacher)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        last_loss = loss.detach().to(torch.float64)
                        loss_sum += last_loss
                        done += 1
                        bar.update(1)
                finally:
                    batches.close()
                    bar.close(done == total_steps)
        finally:
            model.eval()
            if teacher is not None:
                teacher.train(teacher_was_training)

        elapsed = time.perf_counter() - start
        if done == 0:
            raise ValueError("Finetune.train_loader yielded no batches")
        final_loss = float(last_loss)
        mean_loss = float(loss_sum) / done
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"fine-tuning diverged in round {step}: mean loss {mean_loss} over {done} steps "
                f"(lr={self.lr:g}); the model weights are no longer usable"
            )
        if done < total_steps:
            logger.warning(
                "finetune round %d: train_loader ran out after %d of %d planned steps",
                step, done, total_steps,
            )
        logger.info(
            "finetune round %d: %d steps in %.1fs, mean loss %.4f, final loss %.4f",
            step, done, elapsed, mean_loss, final_loss,
        )
        return {
            "steps": done,
            "epochs": done / batches_per_epoch if batches_per_epoch else float("nan"),
            "final_loss": final_loss,
            "mean_loss": mean_loss,
            "time_s": elapsed,
        }

    def fit(self, model: nn.Module, context: "FinetuneContext") -> dict:
        """The fine-tune protocol (:func:`run_finetuner`): train ``model``, distilling from the original if asked."""
        return self(model, context.step, teacher=context.teacher if self.distill else None)

    def _batch_loss(
        self,
        model: nn.Module,
        batch: Any,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        teacher: nn.Module | None,
    ) -> torch.Tensor:
        """Task loss of one batch, mixed with the distillation term when a teacher is given."""
        inputs, targets = _split_batch(batch)
        logits = model(to_device(inputs, device))
        loss = loss_fn(logits, to_device(targets, device))
        if teacher is None:
            return loss
        with torch.no_grad():
            teacher_logits = teacher(to_device(inputs, module_device(teacher)))
        kd = distillation_loss(logits, teacher_logits.to(logits.device), self.temperature)
        return (1.0 - self.alpha) * loss + self.alpha * kd

    def _loader(self, seed: int | None) -> Iterable:
        """The batches to train on: ``train_loader`` itself, or a DataLoader over a Dataset."""
        data = self.train_loader
        if not isinstance(data, Dataset):
            return data
        if isinstance(data, IterableDataset):
            return DataLoader(data, batch_size=self.batch_size)
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=generator)

    def _planned_steps(self, batches_per_epoch: int | None) -> int:
        """Number of optimiser steps: ``ceil(epochs * len(loader))``, capped by ``max_steps``."""
        if batches_per_epoch is None:
            if self.max_steps is None:
                raise ValueError(
                    "Finetune.train_loader has no len(), so epochs cannot be converted to "
                    "steps; set Finetune.max_steps"
                )
            return self.max_steps
        if batches_per_epoch == 0:
            raise ValueError("Finetune.train_loader is empty (len() == 0)")
        steps = max(1, math.ceil(self.epochs * batches_per_epoch - 1e-9))
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        return steps

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``module``; CPU if it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _schedule(name: str, total_steps: int) -> Callable[[int], float]:
    """Per-iteration learning-rate factor in ``[0, 1]`` for ``LambdaLR``."""
    if name == "constant":
        return lambda i: 1.0
    if name == "cosine":
        return lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, total_steps) / total_steps))
    return lambda i: max(0.0, 1.0 - i / total_steps)


def _mix_seed(seed: int, step: int) -> int:
    """Deterministic 63-bit seed from ``(seed, step)``; distinct pairs give unrelated streams."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "Finetune.train_loader must yield (inputs, targets) pairs, got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _safe_len(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _cycle(loader: Iterable) -> Iterator[Any]:
    """Batches of ``loader``, starting a new pass when one ends; stops after an empty pass."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


# ---- the one fine-tune protocol ----------------------------------------------------------------

@dataclass(frozen=True)
class FinetuneContext:
    """What a fine-tuner is told at one step of a compress -> fine-tune schedule.

    step:           the step, from 1.
    teacher:        the original model (a distillation teacher; never modify it).
    calibration:    the calibration batches given to ``optimize``, or None.
    example_inputs: the example inputs given to ``optimize``.
    """

    step: int
    teacher: nn.Module
    calibration: Any = None
    example_inputs: Any = None


def run_finetuner(finetune: Any, model: nn.Module, context: FinetuneContext) -> dict[str, Any]:
    """Run one fine-tuning step of ``model`` (in place); the summary it returns, else ``{}``.

    The protocol: an object with a ``fit(model, context)`` method (:class:`Finetune`,
    :class:`autorank.EncoderDistill`, or your own class that needs the teacher or the data)
    is called with the :class:`FinetuneContext`; any other callable as ``finetune(model, step)``.
    """
    fit = getattr(finetune, "fit", None)
    out = fit(model, context) if callable(fit) else finetune(model, context.step)
    return dict(out) if isinstance(out, Mapping) else {}


def check_finetuner(finetune: Any) -> None:
    """TypeError unless ``finetune`` is None or follows the protocol of :func:`run_finetuner`."""
    if finetune is not None and not callable(finetune) and not callable(getattr(finetune, "fit", None)):
        raise TypeError(
            "finetune must be None, an autorank.Finetune or a callable finetune(model, step) -> None "
            f"(or an object with fit(model, context), such as autorank.EncoderDistill), got {type(finetune).__name__}"
        )
