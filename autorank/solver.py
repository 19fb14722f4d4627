r"""The global step: pick one candidate per layer under a cost budget.

Every function here is pure: it takes, per layer, a 1-D array of candidate
errors and a 1-D array of candidate costs (a "dense" candidate with error 0
should be among them) and returns one index per layer.

**Min-max (ALDS objective).**  ``minimise max_l eps_l  s.t.  sum_l cost_l <= B``.
For a threshold ``tau`` let every layer take its cheapest candidate with
``eps <= tau``; the total cost ``C(tau)`` does not increase with ``tau``, and
the optimum is attained at one of the finitely many candidate errors, so
bisection over the sorted distinct errors finds the smallest feasible ``tau``:
an exact solution, with no restarts.

**Sum objectives.**  ``minimise sum_l g(eps_l)  s.t.  sum_l cost_l <= B`` is a
multiple-choice knapsack.  With ``g(e) = log(1 + e)`` it minimises the ALDS
network bound ``prod_l (1 + eps_l) - 1``.  Solved by Lagrangian relaxation
(bisect ``lambda``; every layer minimises ``g + lambda * cost``; optimal on the
convex hull) followed by a greedy fill of the budget left, or by dynamic
programming over costs rounded *up* to a grid (so the result never exceeds the
budget).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "Infeasible",
    "min_total_cost",
    "solve_minmax",
    "solve_sum_lagrangian",
    "solve_sum_dp",
    "network_bound",
]


class Infeasible(ValueError):
    """The budget is below the cheapest reachable total cost."""

    def __init__(self, budget: float, minimum: float) -> None:
        super().__init__(f"budget {budget:g} is infeasible: the smallest reachable total cost is {minimum:g}")
        self.budget, self.minimum = budget, minimum


Arrays = Sequence[np.ndarray]


def _check(errors: Arrays, costs: Arrays) -> None:
    if len(errors) != len(costs):
        raise ValueError(f"got {len(errors)} error arrays and {len(costs)} cost arrays")
    for i, (e, c) in enumerate(zip(errors, costs)):
        if e.shape != c.shape or e.ndim != 1 or len(e) == 0:
            raise ValueError(f"layer {i}: errors {e.shape} and costs {c.shape} must be equal non-empty 1-D arrays")


def _check_feasible(errors: Arrays, costs: Arrays, budget: float) -> None:
    _check(errors, costs)
    lowest = min_total_cost(costs)
    if lowest > budget:
        raise Infeasible(budget, lowest)


def min_total_cost(costs: Arrays) -> float:
    """The cheapest reachable total: every layer at its cheapest candidate."""
    return float(sum(c.min() for c in costs))


def network_bound(errors: np.ndarray) -> float:
    """The ALDS network error bound ``prod_l (1 + eps_l) - 1`` of chosen layer errors."""
    return float(np.expm1(np.log1p(np.asarray(errors, dtype=np.float64)).sum()))


class _Staircase:
    """``cheapest candidate with error <= tau`` for one layer, in O(log n) per query."""

    def __init__(self, error: np.ndarray, cost: np.ndarray) -> None:
        order = np.lexsort((cost, error))  # by error, then cost
        e, c = error[order], cost[order]
        run = np.minimum.accumulate(c)
        new = np.ones(len(c), bool)
        new[1:] = c[1:] < run[:-1]  # strictly cheaper than everything with smaller error
        pos = np.maximum.accumulate(np.where(new, np.arange(len(c)), 0))
        self.err, self.cost, self.idx = e, run, order[pos]

    def at(self, tau: float) -> int:
        i = int(np.searchsorted(self.err, tau, side="right")) - 1
        return max(i, 0)


def solve_minmax(
    errors: Arrays, costs: Arrays, budget: float, fill: bool = True
) -> tuple[list[int], float]:
    """Exact ``min max_l eps_l  s.t.  sum cost <= budget``.

    Returns ``(choice, tau)``: the chosen index per layer and the optimal largest
    error.  Every layer takes its cheapest candidate with error ``<= tau``; with
    ``fill`` the budget left is then spent on ``sum_l log(1 + eps_l)`` among
    candidates with error ``<= tau`` (the largest error does not change).

    Raises:
        Infeasible: ``budget`` is below :func:`min_total_cost`.
    """
    _check_feasible(errors, costs, budget)
    stairs = [_Staircase(np.asarray(e, np.float64), np.asarray(c, np.float64)) for e, c in zip(errors, costs)]
    taus = np.unique(np.concatenate([s.err for s in stairs]))

    def total(tau: float) -> float:
        return sum(s.cost[s.at(tau)] for s in stairs)

    lo, hi = 0, len(taus) - 1  # total(taus[hi]) == lowest <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if total(taus[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = float(taus[lo])
    choice = [int(s.idx[s.at(tau)]) for s in stairs]
    if fill:
        allowed = [np.nonzero(np.asarray(e) <= tau)[0] for e in errors]
        sub_e = [np.asarray(e)[a] for e, a in zip(errors, allowed)]
        sub_c = [np.asarray(c)[a] for c, a in zip(costs, allowed)]
        start = [int(np.nonzero(a == ch)[0][0]) for a, ch in zip(allowed, choice)]
        picked = _greedy_fill(np.log1p, sub_e, sub_c, budget, start)
        choice = [int(a[p]) for a, p in zip(allowed, picked)]
    return choice, tau


def _pareto(obj: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the candidates not dominated in (cost, objective), by increasing cost."""
    order = np.lexsort((obj, cost))
    o = obj[order]
    best = np.minimum.accumulate(o)
    keep = np.ones(len(o), bool)
    keep[1:] = o[1:] < best[:-1]
    return order[keep]


def _greedy_fill(g, errors: Arrays, costs: Arrays, budget: float, start: Sequence[int]) -> list[int]:
    """Improve ``sum g(eps)`` from a feasible ``start`` by the best objective-per-cost upgrades that fit."""
    choice = list(start)
    fronts = []
    for e, c, s in zip(errors, costs, choice):
        obj = g(np.asarray(e, np.float64))
        fronts.append((_pareto(obj, np.asarray(c, np.float64)), obj, np.asarray(c, np.float64)))
    spent = sum(float(c[s]) for c, s in zip(costs, choice))
    while True:
        best, best_layer, best_idx = 0.0, -1, -1
        for l, (front, obj, cost) in enumerate(fronts):
            cur = choice[l]
            dc = cost[front] - cost[cur]
            do = obj[cur] - obj[front]
            ok = (do > 0) & (dc <= budget - spent)
            if not ok.any():
                continue
            ratio = np.where(ok, do / np.maximum(dc, 1e-12), -np.inf)
            i = int(np.argmax(ratio))
            if ratio[i] > best:
                best, best_layer, best_idx = ratio[i], l, int(front[i])
        if best_layer < 0:
            return choice
        spent += float(fronts[best_layer][2][best_idx] - fronts[best_layer][2][choice[best_layer]])
        choice[best_layer] = best_idx


def solve_sum_lagrangian(
    errors: Arrays, costs: Arrays, budget: float, g=np.log1p, iters: int = 100
) -> list[int]:
    """``min sum_l g(eps_l)  s.t.  sum cost <= budget`` by Lagrangian bisection plus a greedy fill."""
    _check_feasible(errors, costs, budget)
    objs = [g(np.asarray(e, np.float64)) for e in errors]
    cs = [np.asarray(c, np.float64) for c in costs]

    def pick(lam: float) -> list[int]:
        # argmin of obj + lam*cost, ties broken towards the cheaper candidate
        return [int(np.lexsort((c, o + lam * c))[0]) for o, c in zip(objs, cs)]

    def spend(ch: list[int]) -> float:
        return sum(float(c[i]) for c, i in zip(cs, ch))

    best = pick(0.0)
    if spend(best) > budget:
        lo, hi = 0.0, 1.0
        while spend(pick(hi)) > budget and hi < 1e300:
            hi *= 4.0
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if spend(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        best = pick(hi)
        if spend(best) > budget:  # numerically at the hull's cheapest end
            best = [int(np.lexsort((o, c))[0]) for o, c in zip(objs, cs)]
    return _greedy_fill(g, errors, costs, budget, best)


def solve_sum_dp(
    errors: Arrays, costs: Arrays, budget: float, g=np.log1p, bins: int = 2000
) -> list[int]:
    """``min sum_l g(eps_l)  s.t.  sum cost <= budget`` by DP over costs rounded up to ``budget/bins``.

    Rounding up makes every DP-feasible choice truly feasible; the result is
    optimal for the rounded costs and within one bin per layer of the optimum.
    """
    _check_feasible(errors, costs, budget)
    choice = _dp_choice(errors, costs, budget, g, bins, slack=1e-9)
    if sum(float(np.asarray(c)[i]) for c, i in zip(costs, choice)) > budget:
        # the slack that absorbs float noise in cost/unit let a bin round down: redo it strictly
        choice = _dp_choice(errors, costs, budget, g, bins, slack=0.0)
    return choice


def _dp_choice(errors: Arrays, costs: Arrays, budget: float, g, bins: int, slack: float) -> list[int]:
    unit = budget / bins if budget > 0 else 1.0
    inf = np.inf
    dp = np.full(bins + 1, inf)
    dp[0] = 0.0
    back = []
    for e, c in zip(errors, costs):
        obj = g(np.asarray(e, np.float64))
        front = _pareto(obj, np.asarray(c, np.float64))
        w = np.ceil(np.asarray(c, np.float64)[front] / unit - slack).astype(np.int64)
        new = np.full(bins + 1, inf)
        arg = np.full(bins + 1, -1, np.int64)
        for idx, wi in zip(front, w):
            if wi > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[wi:] = dp[: bins + 1 - wi] + obj[idx]
            better = cand < new
            new[better] = cand[better]
            arg[better] = idx
        dp = new
        back.append((arg, dict(zip(front.tolist(), w.tolist()))))
    if not np.isfinite(dp).any():  # rounding made it infeasible: fall back to the cheapest choice
        return [int(np.argmin(c)) for c in costs]
    b = int(np.argmin(dp))
    choice = []
    for arg, weights in reversed(back):
        i = int(arg[b])
        choice.append(i)
        b -= weights[i]
    return choice[::-1]
