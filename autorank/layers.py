"""Layer handlers: which module types are compressible, and how to read them.

A handler describes one module type as a matrix problem.  Register your own with
:func:`register_layer_handler`; lookup follows the class hierarchy, so subclasses
of ``nn.Linear`` are handled like ``nn.Linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["LayerHandler", "register_layer_handler", "get_layer_handler", "set_weight_matrix", "unsupported_reason"]


@dataclass(frozen=True)
class LayerHandler:
    """How autorank reads one module type.

    kind:
        short name used in plans and reports (``"linear"``, ``"conv2d"``, ...).
    geometry:
        ``module -> (out_features f, in_channels c, kernel tuple)``; the weight
        matrix is ``f x (c * prod(kernel))``.
    weight_matrix:
        ``module -> Tensor (f, c*prod(kernel))``, columns grouped by input channel.
    skip_reason:
        ``module -> str | None``; a reason why this instance cannot be factorised.
    """

    kind: str
    geometry: Callable[[nn.Module], tuple[int, int, tuple[int, ...]]]
    weight_matrix: Callable[[nn.Module], torch.Tensor]
    skip_reason: Callable[[nn.Module], str | None]


_HANDLERS: dict[type, LayerHandler] = {}


def register_layer_handler(module_type: type, handler: LayerHandler) -> None:
    """Register (or replace) the handler for ``module_type``."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    _HANDLERS[module_type] = handler


# Handlers for classes of optional libraries, keyed by "module.QualName", so that
# autorank never imports those libraries itself (``import autorank`` stays light).
_NAMED_HANDLERS: dict[str, LayerHandler] = {}


def get_layer_handler(module: nn.Module) -> LayerHandler | None:
    """The handler for ``module``'s type (nearest registered base class), or None."""
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
        named = _NAMED_HANDLERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if named is not None:
            return named
    return None


def _conv_skip(module: nn.Module) -> str | None:
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups})"
    return None


def _conv_geometry(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


def _conv_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.reshape(module.out_channels, -1)


register_layer_handler(
    nn.Linear,
    LayerHandler(
        kind="linear",
        geometry=lambda m: (m.out_features, m.in_features, ()),
        weight_matrix=lambda m: m.weight,
        skip_reason=lambda m: None,
    ),
)
for _cls, _kind in ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d")):
    register_layer_handler(
        _cls,
        LayerHandler(kind=_kind, geometry=_conv_geometry, weight_matrix=_conv_matrix,
                     skip_reason=_conv_skip),
    )


def _embedding_skip(module: nn.Embedding) -> str | None:
    if module.max_norm is not None:
        return f"embedding with max_norm={module.max_norm} (renormalises rows at lookup)"
    if module.sparse:
        return "embedding with sparse gradients"
    return None


register_layer_handler(
    nn.Embedding,
    LayerHandler(
        kind="embedding",
        # one-hot inputs: W = E^T maps num_embeddings "channels" to embedding_dim outputs
        geometry=lambda m: (m.embedding_dim, m.num_embeddings, ()),
        weight_matrix=lambda m: m.weight.T,
        skip_reason=_embedding_skip,
    ),
)

# Hugging Face's GPT-2-style Conv1D: y = x @ W + b with W of shape (in, out), i.e. a
# Linear whose weight is stored transposed.
_NAMED_HANDLERS["transformers.pytorch_utils.Conv1D"] = LayerHandler(
    kind="hf_conv1d",
    geometry=lambda m: (m.weight.shape[1], m.weight.shape[0], ()),
    weight_matrix=lambda m: m.weight.T,
    skip_reason=lambda m: None,
)

LINEAR_KINDS = ("linear", "hf_conv1d")


# Layer types with weights that no family factorises: they are listed as left dense, with the reason.
UNSUPPORTED: dict[type, str] = {
    nn.Conv3d: "Conv3d: no family factorises 3-D convolutions (only Linear, Conv1d, Conv2d, Embedding, Conv1D)",
    **{cls: f"{cls.__name__}: transposed convolutions are not supported (their weight is (in, out, *kernel) and "
            "they have no handler; register_layer_handler can add one)"
       for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``, a layer with weights but no handler, is left dense (None for other modules)."""
    if get_layer_handler(module) is not None:
        return None
    for cls in type(module).__mro__:
        if cls in UNSUPPORTED:
            return UNSUPPORTED[cls]
    return None


@torch.no_grad()
def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write ``matrix`` (``f x c*prod(kernel)``) into ``module``'s weights, in place.

    The handler's ``weight_matrix`` must return a view of the weights (a reshape
    or transpose, as for every built-in handler); anything else raises ``TypeError``.
    """
    handler = get_layer_handler(module)
    if handler is None:
        raise TypeError(f"no layer handler for {type(module).__name__}")
    view = handler.weight_matrix(module)
    if tuple(view.shape) != tuple(matrix.shape):
        raise ValueError(f"a {tuple(view.shape)} weight matrix is needed for {type(module).__name__}, "
                         f"got {tuple(matrix.shape)}")
    view.copy_(matrix.to(view.dtype))
    if not torch.equal(handler.weight_matrix(module), matrix.to(view.dtype)):
        raise TypeError(f"the weight_matrix of the {handler.kind!r} handler is not a view of the weights, "
                        "so they cannot be written through it")


def kernel_numel(kernel: tuple[int, ...]) -> int:
    """Number of taps of a kernel (1 for a Linear)."""
    return math.prod(kernel) if kernel else 1
