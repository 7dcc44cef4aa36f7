"""Running the main job's steps: in order in this process, or several at a time in worker processes.

The steps form a small graph: every width's RTN evaluation stands alone, and its GPTQ step feeds
its diagnosis, which feeds its repair.  On a GPU they run one after another in this process.  On
the CPU a step spends part of its time on one core (the GPTQ column loop, the analyses' many
small operations), so with two or more cores the steps run two at a time, each worker process on
its share of the cores: the same work finishes sooner.  The numbers do not change: every step
reads its inputs from the run folder and the CPU paths are pinned (:mod:`bitcliff.numerics`:
by the command, and the workers inherit the pin), so a step gives the same bytes on one thread
or several.

Steps that are ready start longest chain first, so that the three GPTQ -> diagnosis -> repair
chains start early and the short RTN steps fill the gaps.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    """One step of the job: its name, the steps it needs, and how many steps hang from it."""

    name: str
    needs: tuple[str, ...] = ()
    chain: int = 1  # this step and the steps after it on the longest path: the start order
    after: list[str] = field(default_factory=list)


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(device: torch.device, steps: int, cores: int | None = None) -> int:
    """How many steps run at once: one on a GPU (they share it) or a single core; else two."""
    cores = usable_cores() if cores is None else cores
    if device.type != "cpu" or cores < 2 or steps < 2:
        return 1
    return 2


def order(steps: list[Step], done: dict[str, dict]) -> list[Step]:
    """``steps`` with ``chain`` and ``after`` filled in; raises ``ValueError`` on a need that is
    neither a step nor ``done``."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        for need in s.needs:
            if need in by_name:
                by_name[need].after.append(s.name)
            elif need not in done:
                raise ValueError(f"step {s.name} needs {need}, which is neither a step of the job nor done")

    def chain(name: str) -> int:
        return 1 + max((chain(a) for a in by_name[name].after), default=0)

    for s in steps:
        s.chain = chain(s.name)
    return steps


def run_steps(
    steps: list[Step],
    done: dict[str, dict],
    compute: Callable[[str, dict], dict],
    record: Callable[[str, dict], None],
    *,
    workers: int = 1,
    initializer: Callable | None = None,
    initargs: tuple = (),
    threads: int = 1,
) -> None:
    """Compute every step not in ``done``, each once its needs are done.

    Args:
        steps: the job (:class:`Step`, needs by name).
        done: finished steps' results by name (grown as steps finish).
        compute: ``compute(name, done)`` -> the step's result, ``done`` holding at least the
            results of its needs; with ``workers > 1`` a picklable module-level function, run in
            a worker process after ``initializer(*initargs)``.
        record: called in this process with each finished step's name and result, as it finishes.
        workers: steps at a time (1: in this process, in order).
        threads: intra-op threads of each worker.
    """
    steps = order(steps, done)
    todo = {s.name: s for s in steps if s.name not in done}
    if workers <= 1:
        for s in sorted(todo.values(), key=_topological(steps)):
            result = compute(s.name, done)
            done[s.name] = result
            record(s.name, result)
        return
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(threads, initializer, initargs))
    running: dict[Future, str] = {}
    try:
        while todo or running:
            ready = [s for s in todo.values() if all(n in done for n in s.needs)]
            for s in sorted(ready, key=lambda s: -s.chain)[: workers - len(running)]:
                running[pool.submit(compute, s.name, {n: done[n] for n in s.needs})] = s.name
                del todo[s.name]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                result = future.result()  # a step's error ends the job here, its finished steps kept
                done[name] = result
                record(name, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(threads: int, initializer: Callable | None, initargs: tuple) -> None:
    """In a new worker: its intra-op threads (the threads it starts later inherit them), then the
    caller's initializer."""
    torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def _topological(steps: list[Step]):
    position = {s.name: i for i, s in enumerate(steps)}
    return lambda s: position[s.name]
