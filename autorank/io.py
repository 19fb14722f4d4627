"""Saving and loading compressed models: a JSON plan plus safetensors weights."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .plan import Plan
from .realize import realize

__all__ = ["save", "load", "PLAN_FILE", "WEIGHTS_FILE"]

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def save(model: nn.Module, plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan.json`` and ``model.safetensors`` (the compressed model's weights) into ``path``."""
    from safetensors.torch import save_model

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save into {str(out)!r}: it exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(plan.to_json())
    save_model(model, str(out / WEIGHTS_FILE))
    return out


def load_plan(path: str | os.PathLike) -> Plan:
    """Read the plan saved in directory ``path``."""
    f = Path(path) / PLAN_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no {PLAN_FILE} in {str(path)!r}; was it written by autorank.save?")
    return Plan.from_json(f.read_text())


def load(path: str | os.PathLike, model: nn.Module, inplace: bool = False, **safetensors_kwargs: Any) -> nn.Module:
    """Rebuild a saved compressed model from the original architecture.

    ``model`` is an instance of the original (dense) architecture; its weights do not
    matter.  The factorised modules named in the plan are put in place and every
    weight is loaded from ``model.safetensors``, so outputs are bit-identical to the
    saved model's.
    """
    from safetensors.torch import load_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = load_plan(path)
    out = realize(model if inplace else copy.deepcopy(model), plan, inplace=True, init=False)
    device = next((p.device for p in out.parameters()), "cpu")
    load_model(out, str(Path(path) / WEIGHTS_FILE), strict=True, device=str(device), **safetensors_kwargs)
    return out
