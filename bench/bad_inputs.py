"""A new user's pass over every command with bad inputs: each case runs as its own ``bitcliff``
process on the embedded model and text, and its outcome (exit status, the first line of the
error, seconds) is written to ``docs/bad-inputs.md``.

    python -m bench.bad_inputs [--out docs/bad-inputs.md]

A case passes when the command exits with a status other than 0 (a refusal), prints no
traceback, and says what is wrong in one line; the run fails (exit 1) when any case does not.
Cases that need a checkpoint share one RTN W4 checkpoint of the default model, made first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.provenance import commit, now

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One bad input: what a user might type (``{tmp}``, ``{ckpt}``... are filled in) and why it is bad."""

    what: str
    argv: list[str]


def _cases() -> list[Case]:
    c = Case
    return [
        c("a width bitcliff does not support", ["cliff", "--bits", "5"]),
        c("the same width twice", ["cliff", "--bits", "3", "3"]),
        c("a negative repair budget", ["cliff", "--budget", "-1"]),
        c("a budget that is not a number", ["cliff", "--budget", "nan"]),
        c("no worker", ["cliff", "--workers", "0"]),
        c("a run folder that is a file", ["cliff", "--out", "{file}"]),
        c("a model folder that does not exist", ["cliff", "--model", "./no-such-model"]),
        c("a text file that does not exist", ["cliff", "--text-file", "missing.txt"]),
        c("no evaluation window", ["cliff", "--windows", "0"]),
        c("too few diagnosis examples", ["cliff", "--diagnosis-examples", "2"]),
        c("a group size that is not a multiple of 16", ["cliff", "--group-size", "7"]),
        c("a GPU this machine lacks", ["cliff", "--device", "cuda:3"]),
        c("an option assets does not have", ["assets", "--bogus"]),
        c("1-bit quantization", ["quantize", "--bits", "1", "--out", "{tmp}/q"]),
        c("no output folder", ["quantize", "--bits", "3"]),
        c("a method bitcliff does not have", ["quantize", "--method", "awq", "--bits", "3", "--out", "{tmp}/q"]),
        c("group size 0", ["quantize", "--bits", "3", "--group-size", "0", "--out", "{tmp}/q"]),
        c("dampening above 1", ["quantize", "--method", "gptq", "--bits", "3", "--damp", "2", "--out", "{tmp}/q"]),
        c("--streaming with RTN", ["quantize", "--bits", "3", "--streaming", "--out", "{tmp}/q"]),
        c("no process", ["quantize", "--method", "gptq", "--bits", "3", "--nproc", "0", "--out", "{tmp}/q"]),
        c("an output under a file", ["quantize", "--bits", "3", "--out", "{file}/q"]),
        c("--overwrite on a folder of the user's files", ["quantize", "--bits", "3", "--out", "{mine}", "--overwrite"]),
        c("--restart without --streaming", ["quantize", "--bits", "3", "--restart", "--out", "{tmp}/q"]),
        c("both --bits and --avg-bits", ["quantize", "--bits", "3", "--avg-bits", "3.5", "--out", "{tmp}/q"]),
        c("--avg-bits below any setting", ["quantize", "--avg-bits", "1.5", "--out", "{tmp}/q"]),
        c("--avg-bits with --group-size", ["quantize", "--avg-bits", "3.5", "--group-size", "64", "--out", "{tmp}/q"]),
        c("a model folder without config.json", ["quantize", "--model", "{mine}", "--bits", "3", "--out", "{tmp}/q"]),
        c("a text that is not UTF-8", ["quantize", "--method", "gptq", "--bits", "3", "--text-file", "{binary}",
                                       "--out", "{tmp}/q"]),
        c("negative refit rounds", ["quantize", "--method", "gptq", "--bits", "3", "--refit-rounds", "-1",
                                    "--out", "{tmp}/q"]),
        c("a checkpoint that does not exist", ["eval", "{tmp}/nothing-here"]),
        c("a folder that is not a model", ["eval", "{mine}"]),
        c("a checkpoint whose scales hold NaN", ["eval", "{nan}"]),
        c("windows longer than the model's context", ["eval", "default", "--seq-len", "9000", "--windows", "1"]),
        c("no evaluation window (eval)", ["eval", "default", "--windows", "0"]),
        c("--json naming a folder", ["eval", "default", "--json", "{tmp}"]),
        c("a checkpoint without its weights", ["eval", "{noweights}"]),
        c("a checkpoint with truncated weights", ["eval", "{truncated}"]),
        c("group size 0 in a sweep", ["sweep", "--group-sizes", "0"]),
        c("a sweep folder that is a file", ["sweep", "--out-dir", "{file}"]),
        c("an unsupported width in a sweep", ["sweep", "--bits", "7"]),
        c("diagnose with neither --quantized nor --bits", ["diagnose", "--out", "{tmp}/d"]),
        c("diagnose a folder that is not a checkpoint", ["diagnose", "--quantized", "{mine}", "--out", "{tmp}/d"]),
        c("no diagnosis example", ["diagnose", "--bits", "3", "--examples", "0", "--out", "{tmp}/d"]),
        c("an unknown comparison", ["diagnose", "--quantized", "{ckpt}", "--compare", "foo:3:64", "--out", "{tmp}/d"]),
        c("both --quantized and --bits", ["diagnose", "--quantized", "{ckpt}", "--bits", "3", "--out", "{tmp}/d"]),
        c("a negative repair budget (repair)", ["repair", "--quantized", "{ckpt}", "--budget", "-0.5", "--out",
                                                "{tmp}/r"]),
        c("a repair that does not exist", ["repair", "--quantized", "{ckpt}", "--methods", "magic", "--out", "{tmp}/r"]),
        c("rank 0", ["repair", "--quantized", "{ckpt}", "--rank", "0", "--out", "{tmp}/r"]),
        c("low-rank factors at a width that is not stored", ["repair", "--quantized", "{ckpt}", "--factor-bits", "8",
                                                              "--out", "{tmp}/r"]),
        c("an allocator that does not exist", ["repair", "--quantized", "{ckpt}", "--allocator", "greedy", "--out",
                                               "{tmp}/r"]),
        c("no calibration window (repair)", ["repair", "--quantized", "{ckpt}", "--calib-samples", "0", "--out",
                                             "{tmp}/r"]),
        c("a diagnosis that is not JSON", ["repair", "--quantized", "{ckpt}", "--diagnosis", "{binary}", "--out",
                                           "{tmp}/r"]),
        c("a full-precision model as the quantized one", ["repair", "--quantized", "{mine}", "--out", "{tmp}/r"]),
        c("a budget no repair fits in", ["repair", "--quantized", "{ckpt}", "--methods", "restore", "--budget",
                                         "0.0001", "--diagnosis", "{diagnosis}", "--out", "{tmp}/r"]),
        c("a study group size that is not a multiple of 16", ["study", "sweep", "--group-sizes", "10", "--out",
                                                              "{tmp}/s"]),
        c("fit an empty folder", ["study", "fit", "{tmp}"]),
        c("fit a row edited by hand", ["study", "fit", "{badrows}"]),
        c("predict from a file that is not JSON", ["study", "predict", "{binary}", "--model", "default", "--method",
                                                   "rtn", "--bits", "3"]),
        c("predict a model the law never saw", ["study", "predict", "{law}", "--model", "unknown", "--method", "rtn",
                                                "--bits", "3"]),
        c("a GPTQ prediction without its calibration size", ["study", "predict", "{law}", "--model", "default",
                                                             "--method", "gptq", "--bits", "3"]),
    ]


def _bitcliff(argv: list[str], timeout: float = 600) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitcliff", *argv], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr, time.perf_counter() - start


def _fixtures(tmp: Path) -> dict[str, str]:
    """The files and folders the cases name: a user's file and folder, a checkpoint and damaged
    copies of it, a diagnosis, a law and a damaged sweep."""
    from safetensors.torch import load_file, save_file

    (tmp / "a-file").write_text("the user's file\n")
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's notes\n")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 4)
    ckpt = tmp / "ckpt"
    status, err, _ = _bitcliff(["quantize", "--bits", "4", "--out", str(ckpt)])
    if status:
        raise SystemExit(f"could not make the checkpoint the cases share: {err}")
    nan = tmp / "nan"
    shutil.copytree(ckpt, nan)
    tensors = load_file(nan / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(".scales"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    noweights = tmp / "noweights"
    shutil.copytree(ckpt, noweights)
    (noweights / "model.safetensors").unlink()
    truncated = tmp / "truncated"
    shutil.copytree(ckpt, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    diagnosis = tmp / "diagnosis"
    status, err, _ = _bitcliff(["diagnose", "--quantized", str(ckpt), "--fast", "--out", str(diagnosis)])
    if status:
        raise SystemExit(f"could not diagnose the shared checkpoint: {err}")
    root = REPOSITORY / "bench" / "results"
    badrows = tmp / "badrows"
    badrows.mkdir()
    lines = (root / "study-rows.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["effective_bits"] = "3.3"
    lines[3] = json.dumps(row)
    lines[6] = lines[6][:40]  # cut short, as by a crash
    (badrows / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return {"tmp": str(tmp), "file": str(tmp / "a-file"), "mine": str(mine), "binary": str(tmp / "binary.bin"),
            "ckpt": str(ckpt), "nan": str(nan), "noweights": str(noweights), "truncated": str(truncated),
            "diagnosis": str(diagnosis / "diagnosis.json"), "badrows": str(badrows),
            "law": str(root / "study-law.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/bad-inputs.md")
    args = parser.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="bitcliff-bad-inputs-") as work:
        tmp = Path(work)
        places = _fixtures(tmp)
        empty = tmp / "empty"
        empty.mkdir()
        places["tmp"] = str(empty)
        for case in _cases():
            argv = [a.format(**places) for a in case.argv]
            status, err, seconds = _bitcliff(argv)
            lines = [line for line in err.strip().splitlines() if line.strip() and "Loading weights" not in line]
            message = lines[-1] if lines else ""
            ok = status not in (0,) and "Traceback" not in err and bool(message)
            failed += not ok
            shown = " ".join("…" + a[len(str(tmp)):] if a.startswith(str(tmp)) else a for a in argv)
            shown = shown.replace(f"{REPOSITORY}/", "")  # files of the checkout, as a reader's clone names them
            message = message.replace(str(tmp), "…")
            rows.append(f"| {case.what} | `bitcliff {shown}` | {status} | {seconds:.1f} | {message.replace('|', '/')} |"
                        + ("" if ok else " **FAILED** |"))
            print(f"{'ok ' if ok else 'BAD'} {status:3d} {seconds:5.1f}s {case.what}: {message[:120]}", flush=True)
    import platform

    import torch

    text = [
        "# A new user's bad inputs",
        "",
        f"Written by `python -m bench.bad_inputs` at commit {commit(short=True)} on {now()[:10]} (CPU, Python "
        f"{platform.python_version()}, torch {torch.__version__}): each case is one "
        "`bitcliff` process on the embedded model and text; `…` is the run's scratch folder, holding a user's file "
        "(`a-file`), a user's folder (`mine`), a binary file, an RTN W4 checkpoint of the default model (`ckpt`) and "
        "damaged copies of it (NaN scales, no weights, weights cut in half), its diagnosis, and a sweep with a row "
        "edited by hand and one cut short.",
        "",
        f"{len(rows) - failed} of {len(rows)} cases end in a one-line error with no traceback "
        "(exit status 2: a refusal; 1: a failure of the machine).  Seconds include starting Python and torch "
        "(about 3 s), so a refusal after a few seconds came before any work.",
        "",
        "| bad input | command | exit | seconds | what it says |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print(f"{len(rows) - failed}/{len(rows)} cases held -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
