"""autorank.validate: every check names the setting and the bad value, and lets good values through."""

from __future__ import annotations

import numpy as np
import pytest

from autorank import validate as v

# (id, call, accepted values, rejected values with the error and the exact message)
CASES = [
    ("int", lambda x: v.check_int("C.k", x, low=1), [1, 7], [
        (2.5, TypeError, "C.k must be an int, got 2.5"), (True, TypeError, "C.k must be an int, got True"),
        (np.int64(3), TypeError, f"C.k must be an int, got {np.int64(3)!r}"), (0, ValueError, "C.k must be >= 1, got 0")]),
    ("int-optional-numpy", lambda x: v.check_int("F.seed", x, low=0, optional=True, allow_numpy=True),
     [None, 0, np.int64(3)], [("0", TypeError, "F.seed must be an int or None, got '0'"),
                              (-1, ValueError, "F.seed must be >= 0, got -1")]),
    ("count", lambda x: v.check_count("batch_size", x), [1, 64], [
        (0, ValueError, "batch_size must be a positive int, got 0"),
        (2.5, ValueError, "batch_size must be a positive int, got 2.5"),
        (False, ValueError, "batch_size must be a positive int, got False")]),
    ("count-low-0", lambda x: v.check_count("step", x, low=0, allow_numpy=True), [0, np.int32(2)],
     [(-1, ValueError, "step must be an int >= 0, got -1")]),
    ("count-optional", lambda x: v.check_count("F.max_steps", x, optional=True), [None, 3],
     [(0, ValueError, "F.max_steps must be a positive int or None, got 0")]),
    ("positive", lambda x: v.check_positive("F.lr", x), [1e-3, 2], [
        (0, ValueError, "F.lr must be a positive finite number, got 0"),
        (float("inf"), ValueError, "F.lr must be a positive finite number, got inf"),
        ("1", ValueError, "F.lr must be a positive finite number, got '1'")]),
    ("positive-optional", lambda x: v.check_positive("E.minutes", x, optional=True), [None, 0.5],
     [(-1.0, ValueError, "E.minutes must be a positive finite number or None, got -1.0")]),
    ("nonnegative", lambda x: v.check_nonnegative("F.weight_decay", x), [0, 0.1],
     [(-1, ValueError, "F.weight_decay must be a finite number >= 0, got -1"),
      (float("nan"), ValueError, "F.weight_decay must be a finite number >= 0, got nan")]),
    ("range-open", lambda x: v.check_range("F.momentum", x, 0.0, 1.0), [0, 0.9],
     [(1.0, ValueError, "F.momentum must be a number in [0, 1), got 1.0")]),
    ("range-closed", lambda x: v.check_range("F.alpha", x, 0.0, 1.0, closed=True), [0, 1.0],
     [(1.5, ValueError, "F.alpha must be a number in [0, 1], got 1.5")]),
    ("bool", lambda x: v.check_bool("F.distill", x), [True, False],
     [(1, TypeError, "F.distill must be a bool, got 1")]),
    ("bool-optional", lambda x: v.check_bool("F.progress", x, optional=True), [None, True],
     [("yes", TypeError, "F.progress must be True, False or None, got 'yes'")]),
    ("choice", lambda x: v.check_choice("S.objective", x, ("max", "sum")), ["max"],
     [("min", ValueError, "S.objective must be one of ('max', 'sum'), got 'min'")]),
    ("choice-str", lambda x: v.check_choice("F.optimizer", x, ("adam",), require_str=True), ["adam"],
     [(3, TypeError, "F.optimizer must be a str, one of ('adam',), got 3")]),
]


@pytest.mark.parametrize("call, good, bad", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_checks(call, good, bad):
    for value in good:
        call(value)
    for value, error, message in bad:
        with pytest.raises(error) as info:
            call(value)
        assert str(info.value) == message


def test_predicates():
    assert v.is_int(3) and v.is_int(np.int8(3)) and not v.is_int(np.int8(3), allow_numpy=False)
    assert not v.is_int(True) and not v.is_int(3.0)
    assert v.is_real(2.5) and v.is_real(np.float32(1)) and not v.is_real(True) and not v.is_real("1")
    assert v.is_positive_finite(1e-9) and not v.is_positive_finite(0) and not v.is_positive_finite(float("inf"))
