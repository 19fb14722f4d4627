"""The global step against brute force on small random instances."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autorank.solver import Infeasible, network_bound, solve_minmax, solve_sum_dp, solve_sum_lagrangian


@st.composite
def instances(draw):
    """Layers with a dense candidate (error 0, the largest cost) and a few cheaper ones."""
    n_layers = draw(st.integers(1, 4))
    errors, costs = [], []
    for _ in range(n_layers):
        n = draw(st.integers(1, 5))
        dense = draw(st.integers(5, 40))
        e = [0.0] + [draw(st.floats(0.001, 1.0)) for _ in range(n)]
        c = [dense] + [draw(st.integers(1, dense)) for _ in range(n)]
        errors.append(np.array(e))
        costs.append(np.array(c, dtype=float))
    lowest = sum(c.min() for c in costs)
    highest = sum(c.max() for c in costs)
    budget = draw(st.floats(lowest, highest))
    return errors, costs, budget


def brute(errors, costs, budget, objective):
    best = None
    for choice in itertools.product(*(range(len(e)) for e in errors)):
        cost = sum(c[i] for c, i in zip(costs, choice))
        if cost > budget:
            continue
        errs = [e[i] for e, i in zip(errors, choice)]
        val = max(errs) if objective == "max" else float(np.log1p(errs).sum())
        if best is None or val < best:
            best = val
    return best


def evaluate(errors, costs, choice):
    errs = [float(e[i]) for e, i in zip(errors, choice)]
    return sum(c[i] for c, i in zip(costs, choice)), max(errs), float(np.log1p(errs).sum())


@settings(max_examples=300, deadline=None)
@given(instances(), st.booleans())
def test_minmax_is_optimal(inst, fill):
    errors, costs, budget = inst
    choice, tau = solve_minmax(errors, costs, budget, fill=fill)
    cost, worst, _ = evaluate(errors, costs, choice)
    assert cost <= budget + 1e-9
    assert worst == pytest.approx(tau)
    assert worst <= brute(errors, costs, budget, "max") + 1e-12


@settings(max_examples=200, deadline=None)
@given(instances())
def test_fill_never_hurts_the_sum(inst):
    errors, costs, budget = inst
    plain, _ = solve_minmax(errors, costs, budget, fill=False)
    filled, _ = solve_minmax(errors, costs, budget, fill=True)
    assert evaluate(errors, costs, filled)[2] <= evaluate(errors, costs, plain)[2] + 1e-12


@settings(max_examples=200, deadline=None)
@given(instances())
def test_sum_solvers_feasible_and_near_optimal(inst):
    errors, costs, budget = inst
    opt = brute(errors, costs, budget, "sum")
    for choice in (solve_sum_lagrangian(errors, costs, budget), solve_sum_dp(errors, costs, budget, bins=4000)):
        cost, _, total = evaluate(errors, costs, choice)
        assert cost <= budget + 1e-9
        assert total >= opt - 1e-12  # cannot beat the optimum


@settings(max_examples=200, deadline=None)
@given(instances())
def test_dp_is_exact_on_integer_costs(inst):
    """With one bin per unit of cost, rounding is exact and the DP is optimal."""
    errors, costs, budget = inst
    budget = float(np.floor(budget))
    if budget < sum(c.min() for c in costs):
        return
    choice = solve_sum_dp(errors, costs, budget, bins=int(budget))
    assert evaluate(errors, costs, choice)[2] == pytest.approx(brute(errors, costs, budget, "sum"), abs=1e-9)


@pytest.mark.parametrize("solve", [
    lambda e, c, b: solve_minmax(e, c, b),
    solve_sum_lagrangian,
    solve_sum_dp,
], ids=["minmax", "lagrangian", "dp"])
def test_infeasible_reports_smallest_cost(solve):
    errors = [np.array([0.0, 0.5]), np.array([0.0, 0.2])]
    costs = [np.array([10.0, 4.0]), np.array([10.0, 3.0])]
    with pytest.raises(Infeasible) as info:
        solve(errors, costs, 6.0)
    assert info.value.minimum == 7.0
    assert "smallest reachable total cost is 7" in str(info.value)


def test_minmax_prefers_cheapest_under_threshold():
    errors = [np.array([0.0, 0.1, 0.3]), np.array([0.0, 0.2])]
    costs = [np.array([10.0, 6.0, 2.0]), np.array([10.0, 5.0])]
    choice, tau = solve_minmax(errors, costs, 11.0, fill=False)
    assert tau == pytest.approx(0.2) and choice == [1, 1]


def test_network_bound():
    assert network_bound(np.array([0.1, 0.2])) == pytest.approx(1.1 * 1.2 - 1)
    assert network_bound(np.array([])) == 0.0


def test_mismatched_inputs_rejected():
    with pytest.raises(ValueError, match="equal non-empty"):
        solve_minmax([np.array([0.0, 1.0])], [np.array([1.0])], 1.0)
