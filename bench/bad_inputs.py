"""A new user's pass over every command with bad inputs: each case runs as its own ``bitcliff``
process on the embedded model and text, and its outcome (exit status, the first line of the
error, seconds) is written to ``docs/bad-inputs.md``.

    python -m bench.bad_inputs [--out docs/bad-inputs.md]

A case passes when the command exits with a status other than 0 (a refusal), prints no
traceback, and says what is wrong in one line; the run fails (exit 1) when any case does not.
Cases that need a checkpoint share one RTN W4 checkpoint of the default model, made first.

Each case names the class of fault it guards against, what the command did before it was
refused (:data:`CLASSES`): data loss, silently wrong, traceback, late or unclear, or a plain
refusal of a bad value.
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


#: The class of fault a case guards against: what the command did before it refused.
CLASSES = ("data loss", "silently wrong", "traceback", "late or unclear", "refusal")

#: The places the cases name (``{tmp}``...), made by :func:`_fixtures`.
PLACES = frozenset({"tmp", "file", "mine", "binary", "ckpt", "nan", "noweights", "truncated", "diagnosis", "badrows",
                    "law", "usersweep", "nested", "link", "stray", "otherdiag", "short", "dynamic", "othermodel",
                    "emptytext"})


@dataclass
class Case:
    """One bad input: what a user might type (``{tmp}``, ``{ckpt}``... are filled in), why it is
    bad, and the class of fault it guards against (one of :data:`CLASSES`)."""

    what: str
    argv: list[str]
    kind: str = "refusal"


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
        # Issue 37: nothing lost, nothing silently wrong.
        c("eval --json onto a user's file", ["eval", "{ckpt}", "--windows", "1", "--json", "{file}"], "data loss"),
        c("sweep --out-dir onto a folder with a user's sweep.json", ["sweep", "--bits", "4", "--out-dir",
                                                                    "{usersweep}"], "data loss"),
        c("--overwrite on a checkpoint holding a diagnosis", ["quantize", "--bits", "3", "--out", "{nested}",
                                                              "--overwrite"], "data loss"),
        c("--out a symlink to a user's folder", ["quantize", "--bits", "3", "--out", "{link}", "--overwrite"],
          "data loss"),
        c("a side file copied from another checkpoint", ["eval", "{stray}", "--windows", "1"], "silently wrong"),
        c("a diagnosis of another model", ["repair", "--quantized", "{ckpt}", "--diagnosis", "{otherdiag}", "--out",
                                           "{tmp}/r"], "silently wrong"),
        c("a text too short for disjoint calibration and evaluation", ["eval", "{ckpt}", "--text-file", "{short}"],
          "silently wrong"),
        c("an infinite repair budget", ["cliff", "--budget", "inf"], "late or unclear"),
        c("windows of one token", ["eval", "default", "--seq-len", "1"], "traceback"),
        c("a hand-edited quantization_config.dynamic", ["eval", "{dynamic}", "--windows", "1"], "traceback"),
        # Flags the pass had not touched.
        c("no repair calibration window", ["cliff", "--repair-calib", "0"]),
        c("no trace example", ["cliff", "--trace-examples", "0"]),
        c("no calibration window (cliff)", ["cliff", "--calib-samples", "0"]),
        c("a device that is not a device", ["cliff", "--device", "tpu"]),
        c("a negative group size other than -1", ["quantize", "--bits", "3", "--group-size", "-2", "--out", "{tmp}/q"]),
        c("a checkpoint format bitcliff does not write", ["quantize", "--bits", "3", "--checkpoint-format", "awq",
                                                          "--out", "{tmp}/q"]),
        c("a window of one token (quantize)", ["quantize", "--method", "gptq", "--bits", "3", "--seq-len", "1",
                                               "--out", "{tmp}/q"]),
        c("no calibration window (quantize)", ["quantize", "--method", "gptq", "--bits", "3", "--calib-samples", "0",
                                               "--out", "{tmp}/q"]),
        c("a dampening that is not a number", ["quantize", "--method", "gptq", "--bits", "3", "--damp", "nan",
                                               "--out", "{tmp}/q"]),
        c("--avg-bits above full precision", ["quantize", "--avg-bits", "17", "--out", "{tmp}/q"]),
        c("a rank timeout of zero", ["quantize", "--method", "gptq", "--bits", "3", "--nproc", "2", "--rank-timeout",
                                     "0", "--out", "{tmp}/q"]),
        c("the output is the model folder itself", ["quantize", "--model", "{ckpt}", "--bits", "3", "--out", "{ckpt}",
                                                    "--overwrite"], "data loss"),
        c("--against a model of another source", ["eval", "{ckpt}", "--windows", "1", "--against", "{othermodel}"],
          "silently wrong"),
        c("--against a folder that is not a model", ["eval", "{ckpt}", "--windows", "1", "--against", "{mine}"]),
        c("--against windows beyond the context", ["eval", "{ckpt}", "--against", "default", "--seq-len", "9000",
                                                   "--windows", "1"]),
        c("--json into a checkpoint's own config", ["eval", "{ckpt}", "--windows", "1", "--json",
                                                    "{ckpt}/config.json"], "data loss"),
        c("a text file that is empty", ["eval", "default", "--text-file", "{emptytext}"]),
        c("a device index that is not a number", ["eval", "default", "--device", "cuda:x"]),
        c("a negative patching example count", ["diagnose", "--bits", "3", "--patch-examples", "-1", "--out",
                                                         "{tmp}/d"]),
        c("a diagnosis output onto a user's folder", ["diagnose", "--quantized", "{ckpt}", "--out", "{mine}",
                                                      "--overwrite"], "data loss"),
        c("a calibration window of one token (diagnose)", ["diagnose", "--bits", "3", "--method", "gptq",
                                                           "--calib-seq-len", "1", "--out", "{tmp}/d"]),
        c("a diagnosis file that does not exist", ["repair", "--quantized", "{ckpt}", "--diagnosis",
                                                   "{tmp}/missing.json", "--out", "{tmp}/r"]),
        c("negative refinement rounds", ["repair", "--quantized", "{ckpt}", "--refine-rounds", "-1", "--out",
                                         "{tmp}/r"]),
        c("an empty repair list", ["repair", "--quantized", "{ckpt}", "--methods", ",", "--out", "{tmp}/r"]),
        c("a repaired output onto the source model", ["repair", "--quantized", "{ckpt}", "--out", "{mine}",
                                                      "--overwrite"], "data loss"),
        c("no evaluation window (repair)", ["repair", "--quantized", "{ckpt}", "--windows", "0", "--out", "{tmp}/r"]),
        c("a sweep method bitcliff does not have", ["sweep", "--method", "awq", "--out-dir", "{tmp}/s"]),
        c("no evaluation window (sweep)", ["sweep", "--windows", "0", "--out-dir", "{tmp}/s"]),
        c("predict with no width", ["study", "predict", "{law}", "--model", "default", "--method", "rtn"]),
        c("a study method bitcliff does not have", ["study", "sweep", "--methods", "awq", "--out", "{tmp}/s"]),
        c("a stratum the study does not have", ["study", "sweep", "--strata", "nonsense", "--out", "{tmp}/s"]),
        c("an unsupported width in a study", ["study", "sweep", "--bits", "5", "--out", "{tmp}/s"]),
    ]


def _bitcliff(argv: list[str], timeout: float = 600) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitcliff", *argv], capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr, time.perf_counter() - start


def _fixtures(tmp: Path) -> dict[str, str]:
    """The files and folders the cases name: a user's file and folder, a checkpoint and damaged
    copies of it, a diagnosis, a law, a damaged sweep, another model and an empty text."""
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
    usersweep = tmp / "usersweep"
    usersweep.mkdir()
    (usersweep / "sweep.json").write_text('{"the user\'s": "results"}\n')
    nested = tmp / "nested"
    shutil.copytree(ckpt, nested)
    shutil.copytree(diagnosis, nested / "diagnosis")
    (tmp / "link").symlink_to(mine, target_is_directory=True)
    stray = tmp / "stray"
    shutil.copytree(ckpt, stray)
    (stray / "outliers.safetensors").write_bytes((noweights / "config.json").read_bytes())
    other = json.loads((diagnosis / "diagnosis.json").read_text())
    other["meta"]["fingerprints"] = {"fp": "0" * 64, "quantized": "0" * 64}  # as if made on another model
    (tmp / "other-diagnosis.json").write_text(json.dumps(other))
    from bitcliff.assets import load_text

    (tmp / "short.txt").write_text(load_text("wiki")[:40_000])
    dynamic = tmp / "dynamic"
    shutil.copytree(ckpt, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["quantization_config"]["dynamic"] = ["+:.*"]
    (dynamic / "config.json").write_text(json.dumps(config))
    from bitcliff.assets import resolve_model

    othermodel = tmp / "othermodel"  # the embedded model with other input embeddings: another source
    shutil.copytree(resolve_model("default"), othermodel)
    tensors = load_file(othermodel / "model.safetensors")
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, othermodel / "model.safetensors", metadata={"format": "pt"})
    (tmp / "empty.txt").write_text("")
    places = {"tmp": str(tmp), "file": str(tmp / "a-file"), "mine": str(mine), "binary": str(tmp / "binary.bin"),
              "ckpt": str(ckpt), "nan": str(nan), "noweights": str(noweights), "truncated": str(truncated),
              "diagnosis": str(diagnosis / "diagnosis.json"), "badrows": str(badrows),
              "law": str(root / "study-law.json"), "usersweep": str(usersweep), "nested": str(nested),
              "link": str(tmp / "link"), "stray": str(stray), "otherdiag": str(tmp / "other-diagnosis.json"),
              "short": str(tmp / "short.txt"), "dynamic": str(dynamic), "othermodel": str(othermodel),
              "emptytext": str(tmp / "empty.txt")}
    assert set(places) == PLACES, "PLACES lists what the cases may name"
    return places


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
            rows.append(f"| {case.what} | {case.kind} | `bitcliff {shown}` | {status} | {seconds:.1f} | "
                        f"{message.replace('|', '/')} |"
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
        "damaged copies of it (NaN scales, no weights, weights cut in half), its diagnosis, a sweep with a row "
        "edited by hand and one cut short, the embedded model with other input embeddings (`othermodel`) and an "
        "empty text file.  The *class* column names what the command did before it refused (data loss, silently "
        "wrong, traceback, late or unclear), or *refusal* for a bad value always refused.",
        "",
        f"{len(rows) - failed} of {len(rows)} cases end in a one-line error with no traceback "
        "(exit status 2: a refusal; 1: a failure of the machine).  Seconds include starting Python and torch "
        "(about 3 s), so a refusal after a few seconds came before any work.",
        "",
        ("The class is the fault a case guards against, what the command did before it refused: data loss, "
         "silently wrong, a traceback, late or unclear, or none (a plain refusal of a bad value)."),
        "",
        "| bad input | class | command | exit | seconds | what it says |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print(f"{len(rows) - failed}/{len(rows)} cases held -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
