"""Input statistics of a layer's linears over calibration tokens, and their sums over ranks.

GPTQ's Hessian, the repairs' covariance and mean input: each is a sum over calibration tokens,
so a run split over ranks (:mod:`bitcliff.distributed`) gives every rank the whole sum by sending
partial sums to one owner rank, which adds them in rank order and sends the total back.

* :class:`HessianAccumulator`: ``Σ x xᵀ`` in float32, summed pairwise (``hessian()`` is
  ``2 Σ x xᵀ / n``, GPTQ's H; half of it is the covariance ``E[x xᵀ]``).
* :class:`MeanAccumulator`: ``Σ x`` in float64 over every position but the first (the attention
  sink, :data:`bitcliff.layers.FIRST_TOKEN`, whose huge activations would set the mean alone).
* :func:`summed_over_ranks` / :meth:`MeanAccumulator.summed_over_ranks`: the sums over every rank.
"""

from __future__ import annotations

import torch

from bitcliff.layers import FIRST_TOKEN

# The Hessian is symmetric, so from this width on it is accumulated as a lower block staircase:
# the blocks above the diagonal are skipped (3/8 of the product with 4 blocks, 7/16 with 8).
# One core, 4096 tokens per add: K=576 full 29 ms, 4 blocks 20 ms; K=1536 4 blocks 141 ms,
# 8 blocks 129 ms.  Below STAIRCASE_MIN_K the smaller matmuls no longer pay.
STAIRCASE_MIN_K = 512
STAIRCASE_WIDE_K = 1024  # from here on 8 blocks instead of 4


def staircase_blocks(in_features: int) -> int:
    """Row blocks of the lower-staircase Hessian accumulation (1: the full product)."""
    if in_features >= STAIRCASE_WIDE_K:
        return 8
    return 4 if in_features >= STAIRCASE_MIN_K else 1


class HessianAccumulator:
    """Running ``Σ x xᵀ`` over calibration tokens, in float32, for one layer input.

    ``add`` takes activations ``[..., K]`` (any float dtype; all leading dims are tokens);
    :meth:`hessian` returns ``H = 2 Σ x xᵀ / n`` with ``n`` the number of tokens seen.

    The products of the adds are summed in *pairwise* order, like a binary counter: two partial
    sums over the same number of adds are merged, earlier plus later.  That order is what lets a
    run split over ranks (:mod:`bitcliff.distributed`) reproduce one process's Hessian bit for
    bit: when every rank holds the same power-of-two number of batches, each rank's partial sum is
    a whole subtree of the one-process tree, and :meth:`merge` of the ranks' :meth:`parts` in rank
    order rebuilds that tree.  (A running sum would add the same numbers in another order.)
    Pairwise sums are also more accurate (rounding error grows with log n, not n), at the cost of
    holding up to ``log2(adds) + 1`` partial ``[K, K]`` matrices instead of one.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.device = torch.device(device)
        self.count = 0
        self._parts: list[tuple[int, torch.Tensor]] = []  # (adds summed, float32 [K, K] partial sum)
        self._blocks = staircase_blocks(in_features)

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activations have {x.shape[-1]} features, the accumulator expects {self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return
        product = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        if self._blocks > 1:
            step = -(-self.in_features // self._blocks)
            for a0 in range(0, self.in_features, step):
                a1 = min(a0 + step, self.in_features)
                product[a0:a1, :a1].addmm_(x[:, a0:a1].t(), x[:, :a1])
        else:
            product.addmm_(x.t(), x)
        self._push(1, product)
        self.count += x.shape[0]

    def _push(self, adds: int, partial: torch.Tensor) -> None:
        self._parts.append((adds, partial))
        while len(self._parts) >= 2 and self._parts[-1][0] == self._parts[-2][0]:
            (later_adds, later), (earlier_adds, earlier) = self._parts.pop(), self._parts.pop()
            self._parts.append((earlier_adds + later_adds, earlier.add_(later)))

    def parts(self) -> list[tuple[int, torch.Tensor]]:
        """The partial sums, oldest first: ``(adds summed, float32 [K, K])`` each (the upper
        triangle beyond the block staircase is not filled).  What a rank sends to the owner."""
        return list(self._parts)

    def merge(self, parts: list[tuple[int, torch.Tensor]], count: int) -> None:
        """Append the :meth:`parts` and token ``count`` of an accumulator that saw the batches
        after this one's (the next rank's share)."""
        for adds, partial in parts:
            self._push(adds, partial.to(device=self.device, dtype=torch.float32))
        self.count += count

    def release(self) -> None:
        """Free the accumulated sums (the token count stays for reporting)."""
        self._parts = []

    def hessian(self) -> torch.Tensor:
        """float32 ``[K, K]`` symmetric ``2 Σ x xᵀ / n``; raises ``ValueError`` before any ``add``."""
        if self.count == 0:
            raise ValueError("no calibration tokens were accumulated: the Hessian is undefined")
        s = self._parts[-1][1]
        for _, partial in reversed(self._parts[:-1]):  # the smallest partial sums first
            s = partial + s
        if self._blocks > 1:
            s = torch.tril(s) + torch.tril(s, -1).t()
        return s * (2.0 / self.count)


def summed_over_ranks(acc: HessianAccumulator, ranks, owner: int, what: str) -> HessianAccumulator:
    """``acc`` summed over every rank's batches, the same on every rank: ``owner`` merges the
    ranks' :meth:`~HessianAccumulator.parts` in rank order (the one-process order when the shares
    are whole subtrees) and sends the merged parts back.  ``ranks``: a
    :class:`bitcliff.distributed.Ranks`; with one rank, ``acc`` itself.  ``acc`` is emptied."""
    if not ranks.distributed:
        return acc
    gathered = ranks.gather([n for n, _ in acc.parts()] + [acc.count], [p for _, p in acc.parts()], owner,
                            f"summing the input covariance of {what}")
    acc.release()
    message = (None, None)
    if gathered is not None:
        total = HessianAccumulator(acc.in_features, acc.device)
        for header, partials in gathered:
            total.merge(list(zip(header[:-1], partials)), header[-1])
        message = ([n for n, _ in total.parts()] + [total.count], [p for _, p in total.parts()])
    header, partials = ranks.broadcast(*message, src=owner, what=f"sending the input covariance of {what}")
    shared = HessianAccumulator(acc.in_features, acc.device)
    shared.merge(list(zip(header[:-1], partials)), header[-1])
    return shared


class MeanAccumulator:
    """Running ``Σ x`` over calibration tokens (position :data:`FIRST_TOKEN` on), in float64."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Activations ``[B, T, K]``."""
        x = x[:, FIRST_TOKEN:]
        self.count += x.shape[0] * x.shape[1]
        self.total += x.detach().reshape(-1, x.shape[-1]).double().sum(0).to(self.total.device)

    def summed_over_ranks(self, ranks, owner: int, what: str) -> torch.Tensor:
        """float32 ``[K]``: the mean over every rank's tokens (summed by ``owner`` in rank order)."""
        total, count = self.total, self.count
        if ranks.distributed:
            gathered = ranks.gather(count, [total], owner, f"summing the mean input of {what}")
            message = (None, None)
            if gathered is not None:
                message = (sum(c for c, _ in gathered), [sum((t for _, (t,) in gathered[1:]), gathered[0][1][0])])
            count, (total,) = ranks.broadcast(*message, src=owner, what=f"sending the mean input of {what}")
        return (total / max(count, 1)).float()
