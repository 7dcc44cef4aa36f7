"""How well this machine's cores run work side by side: a one-thread matmul loop (the shapes of a
SmolLM2 layer's Hessian and MLP products) timed alone, then as two processes at once.

    python -m bench.parallel_ceiling

Prints the seconds of each process per round (two rounds of each).  Equal times alone and side
by side mean two ranks can reach 0.5x; slower side-by-side times raise that floor.
"""

from __future__ import annotations

import multiprocessing
import time

ROUNDS = 60


def _loop(results) -> None:
    import torch

    torch.set_num_threads(1)
    x, hessian, weight = torch.randn(4096, 576), torch.zeros(576, 576), torch.randn(1536, 576)
    start = time.perf_counter()
    for _ in range(ROUNDS):
        hessian.addmm_(x.t(), x)
        (x @ weight.t()).sum()
    results.put(time.perf_counter() - start)


def main() -> int:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    for n in (1, 2, 1, 2):
        processes = [context.Process(target=_loop, args=(results,)) for _ in range(n)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        print(f"{n} at once: " + ", ".join(f"{results.get():.2f} s" for _ in range(n)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
