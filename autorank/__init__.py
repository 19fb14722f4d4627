"""autorank: automatic per-layer low-rank compression of PyTorch models under a budget.

    result = autorank.optimize(model, budget=0.3, example_inputs=x)
    result.model, result.plan, print(result.summary())

The steps ``optimize`` is built from are public for experts: :func:`analyze`
(layer graph), :func:`build_curves` (local step), :func:`allocate` (global step),
:func:`realize` (modules), :func:`save` / :func:`load`.
"""

from . import measures
from .allocators import AllocationContext, allocate, available_allocators, register_allocator, solve_curves
from .api import optimize
from .config import Compression, CurveConfig, DataAware, Retrain, SolverConfig
from .curves import LayerCurves, build_curves
from .distill import EncoderDistill
from .finetune import Finetune
from .families import Family, available_families, get_family, register_family
from .graph import LayerGraph, LayerInfo, analyze, count_flops, count_params
from .io import load, load_plan, save
from .layers import LayerHandler, register_layer_handler
from .families.alds import GroupedLowRankConv, GroupedLowRankLinear
from .pipeline import CompressStep, Settings, make_plan
from .plan import LayerPlan, Plan
from .realize import densify, realize
from .refine import Refine
from .result import OptimizeResult

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "Compression",
    "DataAware",
    "Retrain",
    "Settings",
    "Finetune",
    "EncoderDistill",
    "Refine",
    "AllocationContext",
    "measures",
    "OptimizeResult",
    "allocate",
    "make_plan",
    "solve_curves",
    "CompressStep",
    "available_allocators",
    "register_allocator",
    "analyze",
    "build_curves",
    "realize",
    "densify",
    "save",
    "load",
    "load_plan",
    "CurveConfig",
    "SolverConfig",
    "Plan",
    "LayerPlan",
    "LayerCurves",
    "LayerGraph",
    "LayerInfo",
    "Family",
    "register_family",
    "get_family",
    "available_families",
    "LayerHandler",
    "register_layer_handler",
    "GroupedLowRankLinear",
    "GroupedLowRankConv",
    "count_params",
    "count_flops",
]


def __getattr__(name: str):
    """``autorank.errors``: the deprecated name of :mod:`autorank.measures` (warns)."""
    if name == "errors":
        import importlib
        import warnings

        warnings.warn("autorank.errors is deprecated: use autorank.measures", DeprecationWarning, stacklevel=2)
        return importlib.import_module("autorank.errors")
    raise AttributeError(f"module 'autorank' has no attribute {name!r}")
