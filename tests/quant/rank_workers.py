"""What the rank tests run in each process: gloo over loopback, one thread per rank, bounded waits."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from bitcliff.distributed import Ranks

TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, *args, timeout_s: float = 300.0) -> list[int]:
    """Run ``target(rank, world, port, *args)`` in ``world`` fresh processes; their exit codes
    (a process still running after ``timeout_s`` is killed and reported as None)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for p in processes:
        p.start()
    codes = []
    for p in processes:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def join(rank: int, world: int, port: int) -> Ranks:
    torch.set_num_threads(1)
    if world == 1:
        return Ranks.single()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=TIMEOUT_S))
    return Ranks(rank=rank, world=world, timeout_s=TIMEOUT_S)


def quantize_in_memory(rank, world, port, config, n_windows, batch_size, out: Path) -> None:
    """GPTQ of the tiny model over the ranks; every rank saves its quantized tensors."""
    from gptq_helpers import calib, quant_tensors, tiny_model

    import bitcliff

    ranks = join(rank, world, port)
    try:
        model = bitcliff.quantize(tiny_model(), config, progress=False, calib_ids=calib(n_windows),
                                  batch_size=batch_size, ranks=ranks)
        torch.save({"tensors": quant_tensors(model), "log": [e.to_dict() for e in model.bitcliff_log]},
                   out / f"rank{rank}.pt")
    finally:
        ranks.close()


def quantize_streaming(rank, world, port, source: Path, config, n_windows, batch_size, out: Path,
                       die_at_layer: int | None) -> None:
    """Streaming GPTQ over the ranks; with ``die_at_layer`` the last rank dies (as if killed) on
    entering that layer, and the others write the error they get to ``<out>.rank<r>.error``."""
    from gptq_helpers import calib

    from bitcliff.quant import gptq_stream

    ranks = join(rank, world, port)
    if die_at_layer is not None and rank == world - 1:
        step = gptq_stream.quantize_decoder_layer

        def dying(layer, name, *rest):
            if name.endswith(f".{die_at_layer}"):
                os._exit(9)
            return step(layer, name, *rest)

        gptq_stream.quantize_decoder_layer = dying
    try:
        gptq_stream.quantize_gptq_streaming(source, config, calib(n_windows), out, progress=False,
                                            batch_size=batch_size, ranks=ranks)
    except Exception as exc:  # noqa: BLE001 - any error is the finding; the test reads it
        Path(f"{out}.rank{rank}.error").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        os._exit(2)  # the process group cannot be left cleanly once a peer is gone
    ranks.close()


def repair_tiny(rank, world, port, plan, out: Path) -> None:
    """The repair walk of the tiny repair model over the ranks; every rank saves its result."""
    from repair_fixtures import repair_setup

    import bitcliff

    ranks = join(rank, world, port)
    try:
        fp, q, calib = repair_setup()
        result = bitcliff.repair(fp, q, calib, plan, batch_size=2, progress=False, ranks=ranks)
        torch.save({"state": q.state_dict(), "bits": result.record.bits}, out / f"repair{rank}.pt")
    finally:
        ranks.close()
