"""End-to-end decode speed: tokens/s of a model in fp16 and with W4/W3/W2 ``QuantLinear`` layers.

    python -m bench.decode [--model default [MODEL ...]] [--bits 4 3 2] [--group 128] [--new-tokens 128]
                           [--batch 1] [--compile] [--device cuda|cpu] [--bf16] [--prefill-tokens 512]
                           [--unembedding bf16 [fp32]] [--out DIR]

On ``--device cpu`` the model stays fp32 (the baseline row is then ``fp32``; ``--bf16`` adds the
bf16 model) and the quantized layers run the CPU path (``bitcliff.kernels.cpu``); the quantized
models decode their unembedding from a bf16 copy, as ``bitcliff.load`` does (``--unembedding
bf16 fp32`` times each quantized width both ways, side by side).  Each row also
times prefill: one forward over ``--prefill-tokens`` tokens (0: skip), as tokens/s, and splits an
eager token's time into the linear layers, the unembedding and everything else.

Greedy generation of ``--new-tokens`` tokens after a short prompt, timed after a warm-up run
(which also builds the kernel layouts and tunes the kernels), median of ``--reps`` runs.  The
decode rate (``tokens_per_s``) leaves out the prompt's prefill and the first token: a one-token
generation is timed too and subtracted, as llama-bench's ``-p 0 -n N`` counts decode.  With
``--compile`` it also times ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) over a static
KV cache; a variant that fails to compile is reported, not fatal.

Each model is ``bitcliff.assets.resolve_model(name)`` (default: the embedded SmolLM2-135M), or a
random-weight model built from a config, with no download: ``random`` (SmolLM2-135M's architecture,
also the fallback where the asset cannot be prepared) and ``llama3-8b-layers`` (Llama-3-8B's decoder
layers, 4 of them, with a small vocabulary so that the layers, not the embedding, set the speed).
Decode speed depends on the shapes, not the values, and the JSON says which was used.
Quantization is RTN on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.kernels import RESULTS, environment, require_cuda, results_path

# SmolLM2-135M's architecture (Llama): the shapes that set its decode speed.
SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)


# Llama-3-8B's decoder layer (hidden 4096, MLP 14336, GQA 32/8 heads), a stack of four.
LLAMA3_8B_LAYERS = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=1024, max_position_embeddings=8192, rope_theta=500000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-5,
)
RANDOM_MODELS = {"random": (SMOLLM2_SHAPE, "random weights, SmolLM2-135M shape"),
                 "llama3-8b-layers": (LLAMA3_8B_LAYERS, "random weights, 4 Llama-3-8B decoder layers")}


def load_model(name: str):
    """(fp32 CPU model, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name in RANDOM_MODELS:
        torch.manual_seed(0)
        shape, description = RANDOM_MODELS[name]
        return LlamaForCausalLM(LlamaConfig(**shape)).eval(), description
    if name != "random":
        try:
            from bitcliff.assets import resolve_model

            path = resolve_model(name)
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except TypeError:  # older transformers
                model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
            return model.eval(), f"{name} ({Path(path).name})"  # the asset, not where this machine caches it
        except Exception as exc:  # noqa: BLE001 - any failure to prepare the asset: fall back
            print(f"decode: model {name!r} unavailable ({type(exc).__name__}: {exc}); "
                  "using the SmolLM2-135M architecture with random weights", file=sys.stderr)
    return load_model("random")


@torch.inference_mode()
def time_generate(model, prompt, new_tokens: int, reps: int, static: bool) -> dict:
    """Decode speed: tokens/s of the ``new_tokens - 1`` tokens after the first, as llama-bench's
    ``-p 0 -n N`` counts it.  A generation of one token (the prompt's prefill and the first token)
    is timed beside one of ``new_tokens`` and subtracted, so that the prompt's prefill, which runs
    the many-row path, is not counted as decode.  Medians of ``reps`` runs, after a warm-up
    (layouts, tuning, compilation); ``generate_tokens_per_s`` is the whole generation's rate."""
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decode apart from the prompt, got {new_tokens}")
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)

    def median_seconds(tokens: int) -> float:
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if static:
            kwargs["cache_implementation"] = "static"
        model.generate(prompt, **kwargs)  # warm-up
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            sync()
            times.append(time.perf_counter() - start)
        assert out.shape[1] == prompt.shape[1] + tokens
        return sorted(times)[len(times) // 2]

    whole, first = median_seconds(new_tokens), median_seconds(1)
    batch = prompt.shape[0]
    return {"seconds": whole, "first_token_seconds": first,
            "generate_tokens_per_s": batch * new_tokens / whole,
            "tokens_per_s": batch * (new_tokens - 1) / max(whole - first, 1e-9)}


@torch.inference_mode()
def time_prefill(model, prompt, reps: int) -> float:
    """Tokens/s of one forward over ``prompt`` (median of ``reps`` after a warm-up)."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    model(prompt)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        model(prompt)
        sync()
        times.append(time.perf_counter() - start)
    return prompt.numel() / sorted(times)[len(times) // 2]


@torch.inference_mode()
def time_split(model, prompt, new_tokens: int) -> dict:
    """Milliseconds per generated token in the linear layers, in the unembedding, and in
    everything else, from timing hooks on every linear module during one greedy generation
    (the hooks add a few microseconds per call; the split, not the total, is the point)."""
    from bitcliff.quant.qlinear import QuantLinear

    head = model.get_output_embeddings()
    spent = {"linears": 0.0, "unembedding": 0.0}
    started = {}

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        spent["unembedding" if module is head else "linears"] += time.perf_counter() - started.pop(id(module))

    handles = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, QuantLinear)):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    per_token = {key: 1e3 * value / new_tokens for key, value in spent.items()}
    per_token["everything_else"] = 1e3 * total / new_tokens - sum(per_token.values())
    return {f"ms_per_token_{key}": value for key, value in per_token.items()}


def time_model(name: str, args) -> dict:
    """Every variant of one model: fp16 (fp32 on CPU) and each width, eager and compiled."""
    from bitcliff import QuantConfig, quantize
    from bitcliff.quant.unembedding import DecodeUnembedding, read_unembedding_in_bf16

    base, description = load_model(name)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (args.batch, args.prompt_tokens), generator=gen)
    prompt = prompt.to(args.device)
    long_prompt = torch.randint(0, base.config.vocab_size, (1, args.prefill_tokens), generator=gen).to(args.device)
    baseline = "fp16" if args.device == "cuda" else "fp32"
    extra = ["bf16"] if args.bf16 and args.device == "cpu" else []
    rows = []
    heads = args.unembedding if args.device == "cpu" else ["fp32"]
    variants = [(None, "fp32"), *[(extra_dtype, "fp32") for extra_dtype in extra],
                *[(bits, head) for bits in args.bits for head in heads]]
    for bits, head in variants:
        model = copy.deepcopy(base)
        if isinstance(bits, int):
            quantize(model, QuantConfig(bits=bits, group_size=args.group), progress=False)
            if head == "bf16":
                read_unembedding_in_bf16(model)  # as bitcliff.load does on the CPU
        if args.device == "cuda":
            model = model.cuda().half()
        elif bits == "bf16":
            model = model.to(torch.bfloat16)
        label = baseline if bits is None else bits if bits == "bf16" else f"w{bits}g{args.group}"
        if isinstance(bits, int) and len(heads) > 1:
            label += f"/{head}-head"
        modes = [("eager", False)] + ([("compiled", True)] if args.compile else [])
        for mode, compiled in modes:
            row = {"variant": label, "mode": mode,
                   "unembedding": "bf16 decode" if isinstance(model.get_output_embeddings(), DecodeUnembedding)
                   else str(model.get_output_embeddings().weight.dtype).removeprefix("torch.")}
            try:
                if compiled:
                    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                row.update(time_generate(model, prompt, args.new_tokens, args.reps, static=compiled))
                if args.prefill_tokens and not compiled:
                    row["prefill_tokens_per_s"] = time_prefill(model, long_prompt, args.reps)
                if not compiled:
                    row.update(time_split(model, prompt, args.new_tokens))
            except Exception as exc:  # noqa: BLE001 - report, keep measuring the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            speed = f"{row['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in row else row["error"]
            print(f"{name:>16} {label:>15} {mode:>8}: {speed}", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    base_speed = {r["mode"]: r.get("tokens_per_s") for r in rows if r["variant"] == baseline}
    for r in rows:
        if r.get("tokens_per_s") and base_speed.get(r["mode"]):
            r[f"speedup_vs_{baseline}"] = r["tokens_per_s"] / base_speed[r["mode"]]
    return {"name": name, "model": description, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["default"],
                        help=f"asset names or paths, or random-weight shapes: {', '.join(RANDOM_MODELS)}")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile + CUDA graphs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--bf16", action="store_true", help="on the CPU, also time the bf16 model")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="tokens of the timed prefill (0: none)")
    parser.add_argument("--unembedding", nargs="+", choices=["bf16", "fp32"], default=["bf16"],
                        help="on the CPU, the quantized models' unembedding at decode: bf16 (as bitcliff.load "
                             "reads it), fp32, or both (a row each)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.reps < 1 or args.batch < 1 or args.prefill_tokens < 0:
        parser.error("--new-tokens must be at least 2 (decode is timed apart from the first token); --reps and "
                     "--batch positive; --prefill-tokens not negative")
    if args.device == "cuda":
        require_cuda()
    env = environment(args.device)
    models = [time_model(name, args) for name in args.model]
    baseline = "fp16" if args.device == "cuda" else "fp32"
    result = {"environment": env, "batch": args.batch, "group": args.group,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "reps": args.reps,
              "models": models}
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, env, "decode-")
    path.write_text(json.dumps(result, indent=1))
    key = f"speedup_vs_{baseline}"
    lines = [f"{'model':>16} {'variant':>15} {'mode':>8} {'tok/s':>9} {'vs ' + baseline:>8} {'prefill/s':>10}"]
    for m in models:
        for r in m["rows"]:
            tps = f"{r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else f"{'failed':>9}"
            sp = f"{r[key]:8.2f}" if key in r else f"{'':>8}"
            pf = f"{r['prefill_tokens_per_s']:10.1f}" if "prefill_tokens_per_s" in r else f"{'':>10}"
            lines.append(f"{m['name']:>16} {r['variant']:>15} {r['mode']:>8} {tps} {sp} {pf}")
    (args.out / f"decode-{args.device}-summary.txt").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {path}\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
