"""The multiple-choice knapsack that mixed precision and the repair allocator share, against brute
force."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from bitcliff.knapsack import allocate, lower_hull


@dataclass(frozen=True)
class Option:
    cost: float
    error: float


def _random_options(rng: random.Random, n_modules: int) -> dict[str, list[Option]]:
    options = {}
    for m in range(n_modules):
        size = rng.choice([4, 8, 12])
        opts = []
        for bits in (2, 3, 4):
            for group in (32, 64, 128):
                cost = size * (bits + 18 / group) * rng.uniform(0.9, 1.1)
                opts.append(Option(cost, rng.uniform(0.1, 1.0) * size * 4.0 ** -bits))
        options[f"m{m}"] = opts
    return options


def _best_by_brute_force(options: dict[str, list[Option]], budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(o.cost for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocate_stays_in_budget_and_is_near_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = _random_options(rng, 4)
    largest_step = max(h[i].error - h[i + 1].error for h in map(lower_hull, options.values()) for i in range(len(h) - 1))
    low = sum(min(o.cost for o in opts) for opts in options.values())
    high = sum(max(o.cost for o in opts) for opts in options.values())
    for fraction in (0.0, 0.2, 0.5, 0.8, 1.0):
        budget = low + fraction * (high - low)
        choice = allocate(options, budget)
        spent = sum(o.cost for o in choice.values())
        assert spent <= budget * (1 + 1e-12)
        error = sum(o.error for o in choice.values())
        best = _best_by_brute_force(options, budget)
        # The greedy on convex hulls reaches the LP relaxation's optimum (at most the integer one)
        # up to the one hull step it could not take: never worse than that by more than the
        # largest loss a single hull step removes.
        assert best - 1e-12 <= error <= best + largest_step + 1e-12
    # At the top of the range every module gets its least-error option.
    top = allocate(options, high)
    assert all(top[name].error == min(o.error for o in opts) for name, opts in options.items())


def test_allocate_refuses_a_budget_below_the_cheapest_choice():
    options = _random_options(random.Random(0), 3)
    low = sum(min(o.cost for o in opts) for opts in options.values())
    with pytest.raises(ValueError, match="less than the cheapest setting"):
        allocate(options, low * 0.99)


def test_lower_hull_drops_dominated_and_concave_points():
    points = [Option(1.0, 10.0), Option(2.0, 9.5), Option(3.0, 3.0), Option(3.5, 4.0), Option(5.0, 2.5)]
    hull = lower_hull(points)
    # (2, 9.5) lies above the segment (1, 10) -> (3, 3); (3.5, 4) is dominated by (3, 3).
    assert [(o.cost, o.error) for o in hull] == [(1.0, 10.0), (3.0, 3.0), (5.0, 2.5)]


