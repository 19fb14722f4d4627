"""Validators of user-given settings (layer 0: imports only numpy).

Every ``check_*`` takes ``name``, the setting as the user knows it (``"Finetune.lr"``
for a config field, ``"repeats"`` for a function argument), and the value; it returns
nothing and raises ``ValueError`` or ``TypeError`` with a message that names both:
``Finetune.lr must be a positive finite number, got 0``.  Bools never count as numbers.
The ``is_*`` predicates are the tests they are built from.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

__all__ = [
    "is_int", "is_real", "is_positive_finite", "check_int", "check_count", "check_positive",
    "check_nonnegative", "check_range", "check_bool", "check_choice",
]


def is_int(value: Any, allow_numpy: bool = True) -> bool:
    """An ``int`` (or, with ``allow_numpy``, a NumPy integer), not a ``bool``."""
    kinds = (int, np.integer) if allow_numpy else int
    return isinstance(value, kinds) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (``int``, ``float``, NumPy scalar, ...), not a ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_positive_finite(value: Any) -> bool:
    """A real number in ``(0, inf)``."""
    return is_real(value) and math.isfinite(value) and value > 0


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


def check_int(name: str, value: Any, low: int | None = None, optional: bool = False,
              allow_numpy: bool = False) -> None:
    """``TypeError`` unless ``value`` is an int (``optional``: or None); ``ValueError`` if it is below ``low``.

    ``CurveConfig.max_groups must be an int, got 2.5`` / ``... must be >= 1, got 0``.
    """
    if optional and value is None:
        return
    if not is_int(value, allow_numpy):
        raise TypeError(f"{name} must be an int{_or_none(optional)}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def check_count(name: str, value: Any, low: int = 1, optional: bool = False, allow_numpy: bool = False) -> None:
    """``ValueError`` unless ``value`` is an int ``>= low`` (``optional``: or None); a wrong type is a ValueError too.

    ``batch_size must be a positive int, got 0`` (``low=1``); ``step must be an int >= 0, got -1``.
    """
    if optional and value is None:
        return
    if not (is_int(value, allow_numpy) and value >= low):
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}{_or_none(optional)}, got {value!r}")


def check_positive(name: str, value: Any, optional: bool = False) -> None:
    """``ValueError`` unless ``value`` is a positive finite number (``optional``: or None)."""
    if optional and value is None:
        return
    if not is_positive_finite(value):
        raise ValueError(f"{name} must be a positive finite number{_or_none(optional)}, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a finite number ``>= 0``."""
    if not (is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_range(name: str, value: Any, low: float, high: float, closed: bool = False) -> None:
    """``ValueError`` unless ``value`` is a number in ``[low, high)`` (``closed``: ``[low, high]``)."""
    inside = is_real(value) and low <= value and (value <= high if closed else value < high)
    if not inside:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}{']' if closed else ')'}, got {value!r}")


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    """``TypeError`` unless ``value`` is ``True`` or ``False`` (``optional``: or None)."""
    if optional and value is None:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be {'True, False or None' if optional else 'a bool'}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...], require_str: bool = False) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``; with ``require_str`` a non-str is a ``TypeError``."""
    if require_str and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
