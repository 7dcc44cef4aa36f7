"""GPTQ over N ranks against one process: wall time, time in exchanges, and checkpoint equality.

    python -m bench.gptq_ranks --bits 4 3 2 --nproc 1 2 --out bench/results/gptq-ranks.jsonl

For every width, ``bitcliff quantize --model default --method gptq`` runs once per rank count
(``--nproc N``; N = 1 without torchrun), every process with one thread (``OMP_NUM_THREADS=1``),
so N ranks use N cores and the one-process run one.  A row per run is appended to ``--out`` as
it finishes (a row already there is not run again): the command's wall time, the GPTQ time it
prints, rank 0's time in exchanges, and whether the checkpoint's tensors equal the one-process
checkpoint's bit for bit (else how many differ).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import commit, now
from bitcliff.rows import append_row, done_keys


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-ranks"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    done = done_keys(args.out, ("model", "bits", "nproc"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for bits in args.bits:
        for nproc in sorted(args.nproc):
            if (args.model, bits, nproc) in done:
                continue
            folder = args.work / f"{args.model}-w{bits}g{args.group_size}-n{nproc}"
            command = [sys.executable, "-m", "bitcliff", "quantize", "--model", args.model, "--method", "gptq",
                       "--bits", str(bits), "--group-size", str(args.group_size), "--out", str(folder), "--overwrite"]
            if nproc > 1:
                command += ["--nproc", str(nproc)]
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            wall = time.perf_counter() - start
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return run.returncode
            gptq_s = float(re.search(r" in ([\d.]+) s ->", run.stdout).group(1))
            exchange = re.search(r"spent ([\d.]+) s in exchanges", run.stdout)
            row = {"model": args.model, "bits": bits, "group_size": args.group_size, "nproc": nproc,
                   "threads_per_rank": 1, "wall_s": round(wall, 1), "gptq_s": gptq_s,
                   "exchange_s_rank0": float(exchange.group(1)) if exchange else 0.0}
            reference = args.work / f"{args.model}-w{bits}g{args.group_size}-n1"
            if nproc > 1 and reference.is_dir():
                a, b = _tensors(reference), _tensors(folder)
                differ = sorted(k for k in a if k not in b or not torch.equal(a[k], b[k]))
                row.update(tensors=len(a), tensors_differing=len(differ), bit_identical=not differ and a.keys() == b.keys())
            row.update(torch=torch.__version__, cpus=os.cpu_count(), commit=commit(short=True), date=now())
            append_row(args.out, row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
