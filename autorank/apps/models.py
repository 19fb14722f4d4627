"""Model spec strings: what ``autorank optimize MODEL`` and sweep configs name a model by.

:func:`load_model` resolves a spec into a :class:`ModelSpec` (the model and its example inputs):

* a registered name (``"mnist_cnn"``: the trained MNIST CNN of :mod:`autorank.apps.zoo`;
  add your own with :func:`register_model`);
* ``"torchvision:<name>"``: an untrained torchvision model on a 1x3x224x224 input;
* ``"pkg.module:fn"``: ``fn()`` returns a module (or ``(module, example_inputs)``),
  optionally with weights from ``checkpoint`` (safetensors or a ``torch.save``'d state_dict).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .._util import require

__all__ = ["ModelSpec", "register_model", "available_models", "load_model"]


@dataclass
class ModelSpec:
    """A loaded model with what a sweep needs to run it.

    example_inputs: the inputs FLOPs are counted on (one sample for the zoo models).
    latency_inputs: the inputs latency is timed on (a realistic batch); defaults to example_inputs.
    """

    model: nn.Module
    example_inputs: Any
    latency_inputs: Any = None

    def __post_init__(self) -> None:
        if self.latency_inputs is None:
            self.latency_inputs = self.example_inputs


Builder = Callable[[], ModelSpec]
_MODELS: dict[str, Builder] = {}


def register_model(name: str, builder: Builder) -> Builder:
    """Register ``builder() -> ModelSpec`` under ``name`` (replacing one of the same name)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"model name must be a non-empty str without ':', got {name!r}")
    if not callable(builder):
        raise TypeError(f"model builder must be callable, got {type(builder).__name__}")
    _MODELS[name] = builder
    return builder


def available_models() -> list[str]:
    return sorted(_MODELS)


def _mnist_cnn() -> ModelSpec:
    from .zoo import load_mnist, train_mnist_cnn

    _, test = load_mnist()
    model = train_mnist_cnn()
    return ModelSpec(model, test[:1][0], test[:64][0])


register_model("mnist_cnn", _mnist_cnn)


def _load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # SafetensorError, UnpicklingError, RuntimeError, EOFError, ...: all mean "not readable"
        kind = "safetensors" if path.suffix == ".safetensors" else "torch.save (loaded with weights_only=True)"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"checkpoint {str(path)!r} is not a readable {kind} file: {first}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state_dict (got {type(state).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {first}") from None


def load_model(spec: str, checkpoint: str | os.PathLike | None = None,
               input_shape: list[int] | tuple[int, ...] | None = None,
               shape_hint: str = "set input_shape = [...] in the config") -> ModelSpec:
    """Resolve a model spec string (see the module docstring) into a :class:`ModelSpec`.

    ``input_shape`` overrides the example input (a ``torch.randn`` of that shape, seed 0);
    ``shape_hint`` is how the caller's user sets it (the CLI says ``--input-shape``).
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a non-empty spec string, got {spec!r}")
    if spec in _MODELS:
        out = _MODELS[spec]()
    elif spec.startswith("torchvision:"):
        tvm = require("torchvision.models", f"model {spec!r}")
        name = spec.split(":", 1)[1]
        try:
            builder = tvm.get_model_builder(name)
        except ValueError:
            raise ValueError(f"model {spec!r}: torchvision has no model {name!r}") from None
        out = ModelSpec(builder(weights=None).eval(), torch.randn(1, 3, 224, 224,
                                                                 generator=torch.Generator().manual_seed(0)))
    elif ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
            raise ValueError(f"model {spec!r}: cannot import {fn_name!r} from {mod_name!r} "
                             f"({type(exc).__name__}: {exc})") from None
        try:
            built = fn()
        except Exception as exc:  # the user's builder failed: say so, keep the cause for -v tracebacks
            raise ValueError(f"model {spec!r}: {fn_name}() raised {type(exc).__name__}: {exc}") from exc
        if isinstance(built, ModelSpec):
            out = built
        elif isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
            out = ModelSpec(*built)
        elif isinstance(built, nn.Module):
            example = built.example() if callable(getattr(built, "example", None)) else None
            out = ModelSpec(built, example)
        else:
            raise ValueError(f"model {spec!r}: {fn_name}() returned {type(built).__name__}, not an nn.Module")
    else:
        raise ValueError(f"unknown model {spec!r}; use one of {available_models()}, "
                         "'torchvision:<name>' or 'pkg.module:function'")
    if checkpoint is not None:
        _load_checkpoint(out.model, checkpoint)
    if input_shape is not None:
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
        out = ModelSpec(out.model, x)
    if out.example_inputs is None:
        raise ValueError(f"model {spec!r} has no example inputs; {shape_hint}")
    out.model.eval()
    return out
