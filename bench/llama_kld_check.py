"""Cross-check bitcliff's KL divergence and same-top-token share against llama.cpp's.

    python -m bench.llama_kld_check --bin LLAMA_CPP_BIN --base F32.gguf --quantized Q.gguf \\
        [--text wiki] [--ctx 512] [--chunks 16] [--no-repack] [--out bench/results/llama-kld-check.json]

llama.cpp's ``llama-perplexity`` saves the base model's log-probabilities
(``--kl-divergence-base``) and then reports the quantized model's KL divergence from them
(``--kl-divergence``).  It scores, in each chunk of ``--ctx`` tokens, only the predictions of the
second half (positions ``ctx/2 .. ctx-2``, each predicting the next token).  This script reads the
tokens llama.cpp evaluated from its base file, loads both GGUF files through transformers
(dequantized to fp32: the same weights), and computes the same figures with bitcliff's definitions
(``bitcliff.divergence.token_divergence``) on the same positions.  Agreement within a few per cent
says the definitions match.  Where they differ by design: llama.cpp stores the base
log-probabilities in 16 bits and leaves out tokens whose base log-probability is below -16; bitcliff
uses the full fp32 distributions.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.provenance import commit, now

#: llama-perplexity's summary lines, as it prints them with --kl-divergence.
PATTERNS = {"kl_mean": r"Mean\s+KLD:\s+([-\d.]+)", "same_top_pct": r"Same top p:\s+([-\d.]+)",
            "kl_median": r"Median\s+KLD:\s+([-\d.]+)", "kl_p99": r"99\.0%\s+KLD:\s+([-\d.]+)"}


def read_base_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_chunk, tokens int32 [n_chunk, n_ctx]) from llama-perplexity's base file."""
    with path.open("rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity log-probability file")
        n_ctx, _n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        tokens = np.frombuffer(f.read(4 * int(n_ctx) * int(n_chunk)), dtype=np.int32)
    return int(n_ctx), int(n_chunk), tokens.reshape(int(n_chunk), int(n_ctx))


def llama_figures(binary: Path, base: Path, quantized: Path, text: Path, window: tuple[int, int],
                  work: Path, extra: list[str]) -> tuple[dict, Path, str]:
    """llama.cpp's figures for ``quantized`` against ``base`` on ``window`` = ``(ctx, chunks)``, the
    base file, and its log; ``extra``: more llama-perplexity arguments."""
    ctx, chunks = window
    kld = work / "base.kld"
    common = ["-c", str(ctx), "-b", str(ctx), "-t", "2", *extra]
    subprocess.run([str(binary), "-m", str(base), "-f", str(text), "--kl-divergence-base", str(kld),
                    "--chunks", str(chunks), *common], check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary), "-m", str(quantized), "--kl-divergence-base", str(kld), "--kl-divergence",
                             *common], check=True, capture_output=True, text=True)
    log = result.stdout + result.stderr
    figures = {}
    for key, pattern in PATTERNS.items():
        match = re.search(pattern, log)
        if match is None:
            raise RuntimeError(f"llama-perplexity printed no {key!r} line:\n{log[-2000:]}")
        figures[key] = float(match.group(1))
    return figures, kld, log


def bos_token(gguf_path: Path) -> int | None:
    """The BOS id llama.cpp puts first in every chunk, or None where the model adds none."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key):
        field = fields.get(key)
        return None if field is None else field.parts[field.data[0]][0]

    return int(value("tokenizer.ggml.bos_token_id")) if value("tokenizer.ggml.add_bos_token") else None


@torch.inference_mode()
def bitcliff_figures(base: Path, quantized: Path, tokens: np.ndarray, add_bos: int | None, device: str) -> dict:
    """bitcliff's figures on the same tokens and positions (llama.cpp's second half of each chunk)."""
    from transformers import AutoModelForCausalLM

    from bitcliff.divergence import token_divergence

    models = [AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).to(device).eval()
              for p in (base, quantized)]
    n_ctx = tokens.shape[1]
    first = n_ctx // 2
    kl, same = [], []
    for chunk in tokens:
        ids = torch.from_numpy(chunk.astype(np.int64)).unsqueeze(0)
        if add_bos is not None:
            ids[0, 0] = add_bos
        fp_logits, q_logits = (m(input_ids=ids.to(device)).logits[0, first:n_ctx - 1].float().cpu() for m in models)
        k, s = token_divergence(fp_logits, q_logits)
        kl.append(k)
        same.append(s)
    kl, same = torch.cat(kl).double(), torch.cat(same).double()
    return {"kl_mean": float(kl.mean()), "kl_median": float(kl.median()),
            "kl_p99": float(torch.quantile(kl, 0.99)), "same_top_pct": 100 * float(same.mean()),
            "tokens": int(kl.numel())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, required=True, help="the folder holding llama-perplexity")
    parser.add_argument("--base", type=Path, required=True, help="the full-precision GGUF (F32)")
    parser.add_argument("--quantized", type=Path, required=True, help="a quantized GGUF of the same model")
    parser.add_argument("--text", default="wiki", help="an embedded text name or a file")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/llama-kld-check.json"))
    parser.add_argument("--no-repack", action="store_true",
                        help="pass --no-repack to llama-perplexity (its repacked CPU path crashes on some machines)")
    parser.add_argument("--device", default="cpu", help="where transformers runs the two GGUF models (cpu, cuda, cuda:N)")
    args = parser.parse_args(argv)
    binary = args.bin / "llama-perplexity"
    for path, flag in ((binary, "--bin"), (args.base, "--base"), (args.quantized, "--quantized")):
        if not path.is_file():
            parser.error(f"{flag}: {path} is not a file")
    if args.ctx < 4 or args.chunks < 1:
        parser.error("--ctx must be at least 4 and --chunks at least 1")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose another file")
    from bitcliff.assets import load_text
    from bitcliff.device import DeviceError, resolve_device

    try:
        device = str(resolve_device(args.device))
    except DeviceError as error:
        parser.error(f"--device: {error}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = work / "text.txt"
        text.write_text(load_text(args.text))
        extra = ["--no-repack"] if args.no_repack else []
        theirs, kld, _log = llama_figures(binary, args.base, args.quantized, text, (args.ctx, args.chunks), work, extra)
        _, _, tokens = read_base_tokens(kld)
        add_bos = bos_token(args.quantized)
        ours = bitcliff_figures(args.base, args.quantized, tokens, add_bos, device)
    record = {"llama_cpp": theirs, "bitcliff": ours, "base": args.base.name, "quantized": args.quantized.name,
              "text": args.text, "ctx": args.ctx, "chunks": args.chunks, "bos": add_bos,
              "llama_perplexity_args": extra,
              "device": device, "relative_difference": {k: ours[k] / theirs[k] - 1 for k in theirs if theirs[k]},
              "commit": commit(short=True), "date": now(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("llama_cpp", "bitcliff", "relative_difference")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
