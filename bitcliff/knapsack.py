"""Choosing one option per item under a total cost: the multiple-choice knapsack that mixed
precision (each module's width) and the repair allocator (each module's repair) both solve.

Every item has options with a ``cost`` (bits stored) and an ``error`` (the loss it is estimated
to leave).  :func:`allocate` solves it greedily on each item's lower convex hull of
(cost, error): every item starts at its cheapest option, and the upgrade with the largest error
reduction per bit is taken while the budget allows.  On convex hulls this greedy is optimal up
to the last, partial step: its total is within one hull step of the best choice (tested against
brute force).
"""

from __future__ import annotations

import heapq
from typing import Protocol, TypeVar


class Choice(Protocol):
    """What the knapsack reads of an option."""

    cost: float
    error: float


C = TypeVar("C", bound=Choice)


def lower_hull(options: list[C]) -> list[C]:
    """The options on the lower convex hull of (cost, error), by ascending cost: the only ones a
    greedy upgrade path can stop at (the rest cost more for less, or lie above a line between
    two that do better on average)."""
    hull: list[C] = []
    for option in sorted(options, key=lambda o: (o.cost, o.error)):
        if hull and option.error >= hull[-1].error:
            continue  # costs as much or more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> option: drop it
            if (b.error - a.error) * (option.cost - a.cost) >= (option.error - a.error) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(options: dict[str, list[C]], budget: float) -> dict[str, C]:
    """One option per item, their summed cost at most ``budget``, their summed error as small as
    the greedy on convex hulls makes it (see the module docstring).

    Raises:
        ValueError: when even the cheapest option of every item costs more than ``budget``.
    """
    hulls = {name: lower_hull(opts) for name, opts in options.items()}
    position = dict.fromkeys(hulls, 0)
    spent = sum(h[0].cost for h in hulls.values())
    if spent > budget * (1 + 1e-12):
        raise ValueError(f"the budget of {budget:.0f} bits is less than the cheapest setting of every module "
                         f"({spent:.0f} bits)")
    heap = []

    def push(name: str) -> None:
        hull, i = hulls[name], position[name]
        if i + 1 < len(hull):
            gain = (hull[i].error - hull[i + 1].error) / (hull[i + 1].cost - hull[i].cost)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], position[name]
        step = hull[i + 1].cost - hull[i].cost
        if spent + step > budget * (1 + 1e-12):
            continue  # this item's next step does not fit; its later ones cost more still
        spent += step
        position[name] = i + 1
        push(name)
    return {name: hulls[name][i] for name, i in position.items()}
