"""Walkers over nested model inputs and outputs (layer 0: imports only torch).

Models take a tensor, a tuple/list of positional inputs or a dict of keyword inputs,
and return a tensor or any nesting of tuples, lists, mappings and Hugging Face
``ModelOutput`` objects.  Every part of autorank that calls a model or reads its
output goes through these functions:

* :func:`run_model` -- call a model on inputs of any of the three forms;
* :func:`tensors` -- every tensor inside a nested object, depth-first, in order;
* :func:`map_tensors` / :func:`to_device` -- the same nesting with every tensor replaced;
* :func:`flat_output` -- every floating tensor of an output as one float64 vector;
* :func:`primary_tensor` -- the one output tensor that stands for the whole output;
* :func:`entry` -- a key of a dict batch (``attention_mask``), ``None`` for other batches;
* :class:`Call` -- a batch given as explicit positional and keyword arguments, with its mask
  (the inputs of one block of a model, captured by :mod:`autorank.stream`).

A mapping is walked in its own (insertion) order unless stated otherwise; a
``ModelOutput`` is a mapping, so its ``None`` fields are simply absent.  Objects
other than tensors, tuples, lists and mappings are leaves and are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Call", "run_model", "tensors", "map_tensors", "to_device", "flat_output", "primary_tensor", "entry"]


@dataclass(frozen=True, eq=False)
class Call:
    """One call's inputs, as they were passed: ``module(*args, **kwargs)``.

    ``mask`` is the ``(B, T)`` padding mask of the calibration batch the call came from
    (or None): :func:`entry` returns it for any key, so the streamed moments of a
    block's layers leave out padded positions as the whole-model moments do.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    mask: Any = None

    def with_first(self, first: Any) -> "Call":
        """The same call with its first positional argument replaced by ``first``."""
        return Call((first, *self.args[1:]), self.kwargs, self.mask)


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on example inputs: a tensor, a tuple/list of positional inputs, a dict of keyword
    inputs, or a :class:`Call`."""
    if isinstance(example_inputs, Call):
        return model(*example_inputs.args, **example_inputs.kwargs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def tensors(obj: Any, sort_keys: bool = False) -> list[torch.Tensor]:
    """Every tensor inside ``obj``, depth-first in order (``obj`` itself if it is a tensor).

    Walks mappings (their values, by sorted key with ``sort_keys``), tuples, lists and
    objects with a ``to_tuple()`` method (a ``ModelOutput`` that is not a mapping);
    anything else holds no tensor.  A tensor reached twice is listed twice.
    """
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, Call):
            stack.extend((o.kwargs, o.args))
        elif isinstance(o, Mapping):
            stack.extend(reversed([o[k] for k in sorted(o)] if sort_keys else list(o.values())))
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif hasattr(o, "to_tuple"):  # transformers ModelOutput
            stack.extend(reversed(o.to_tuple()))
    return out


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any], keep_types: bool = False) -> Any:
    """``obj`` with every tensor ``t`` inside it replaced by ``fn(t)``.

    Mappings, tuples and lists are rebuilt (as ``dict``, ``tuple`` and ``list``; with
    ``keep_types`` as their own type, a namedtuple field by field); other leaves are
    returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Call):
        return Call(map_tensors(obj.args, fn, keep_types), map_tensors(obj.kwargs, fn, keep_types),
                    None if obj.mask is None else map_tensors(obj.mask, fn, keep_types))
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn, keep_types) for k, v in obj.items()}
        return type(obj)(items) if keep_types else items
    if isinstance(obj, (tuple, list)):
        parts = [map_tensors(v, fn, keep_types) for v in obj]
        if not keep_types:
            return tuple(parts) if isinstance(obj, tuple) else parts
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple takes its fields one by one
            return type(obj)(*parts)
        return type(obj)(parts)
    return obj


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """``obj`` with every tensor moved to ``device``, keeping the type of every container (see :func:`map_tensors`)."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking), keep_types=True)


def flat_output(out: Any) -> torch.Tensor:
    """Every floating (or complex) tensor of a (nested) model output, detached, flattened and concatenated in float64.

    Raises ``ValueError`` when the output holds no such tensor.
    """
    parts = [t.detach().reshape(-1).to(torch.float64) for t in tensors(out) if t.is_floating_point() or t.is_complex()]
    if not parts:
        raise ValueError("the model output holds no floating-point tensor to score")
    return torch.cat(parts)


def primary_tensor(out: Any, hint: str = "") -> torch.Tensor:
    """The tensor that stands for a model's output.

    A tensor is itself; a mapping (a ``transformers`` ``ModelOutput`` too) gives its first
    floating-point tensor value (``last_hidden_state`` or ``logits``), a tuple or list its
    first floating-point tensor element (one level deep, not nested).  Anything else is a
    ``TypeError``, with ``hint`` (what the caller can do instead) appended to the message.
    """
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError(f"cannot find a floating-point output tensor in a {type(out).__name__}"
                    + (f"; {hint}" if hint else ""))


def entry(batch: Any, key: str) -> Any:
    """``batch[key]`` of a dict batch (``None`` when absent); a :class:`Call`'s mask; else ``None``."""
    if isinstance(batch, Call):
        return batch.mask
    return batch.get(key) if isinstance(batch, Mapping) else None
