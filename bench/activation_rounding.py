"""What rounding the activations costs in perplexity: the CPU kernel's integer decode, measured.

    python -m bench.activation_rounding [CHECKPOINT ...] [--bits 4 2] [--levels 16319 127]
                                        [--windows 16] [--device cpu] [--out FILE]

At decode the compiled CPU kernel rounds each row's activations per weight group to integers of at
most ``ACT_LEVELS`` (16319, 15 bits) before it multiplies the weights
(``cpu_packed.rounded_activations`` is its reference), and an AVX-512 build does so at every row
count.  This runs a perplexity evaluation with the kernel's own rounding off
(``exact_activations``) and every quantized layer's input rounded exactly as the kernel would (the reference applied to each ``QuantLinear``'s input, with the
layer's own groups and act-order positions), for each of ``--levels`` (127: 8-bit activations,
llama.cpp's way), beside the unrounded evaluation, on the embedded Wikipedia sample.  Models: the
checkpoints given, else RTN g64 of the embedded SmolLM2 at each of ``--bits``.  One JSON file.
The rounding belongs to the compiled CPU kernel, so ``--device`` takes ``cpu`` only (the GPU
kernels keep their activations as they are).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from bench.kernels import RESULTS, environment


@contextlib.contextmanager
def rounded_inputs(levels: int):
    """Every ``QuantLinear`` forward in the block sees its input rounded as the kernel's integer
    variant rounds it (with ``levels``)."""
    from bitcliff.kernels import cpu_packed  # noqa: PLC0415
    from bitcliff.quant.qlinear import QuantLinear  # noqa: PLC0415

    forward = QuantLinear.forward

    def rounded_forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        rounded = cpu_packed.rounded_activations(rows, self.kernel_layout(), levels)
        return forward(self, rounded.view(x.shape).to(x.dtype))

    QuantLinear.forward = rounded_forward
    try:
        yield
    finally:
        QuantLinear.forward = forward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="bitcliff checkpoints (default: RTN of SmolLM2)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 3, 4])
    parser.add_argument("--levels", type=int, nargs="+", default=[16319, 127])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu: the kernel whose rounding this measures")
    parser.add_argument("--out", type=Path, default=RESULTS / "activation-rounding.json")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error(f"--device {args.device}: the integer decode is the CPU kernel's; only cpu is measured")
    if args.out.is_dir() or not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: must be a file in an existing folder")
    if args.windows < 1 or any(level < 1 for level in args.levels):
        parser.error("--windows and --levels must be positive")
    for path in args.checkpoints:
        if not (path / "config.json").is_file():
            parser.error(f"checkpoint {path}: no config.json there")

    import bitcliff  # noqa: PLC0415
    from bitcliff.assets import resolve_model  # noqa: PLC0415
    from bitcliff.eval import evaluate_text  # noqa: PLC0415
    from bitcliff.kernels.cpu import exact_activations  # noqa: PLC0415
    from bitcliff.kernels.cpu_build import native_ops  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if native_ops() is None:
        parser.error("the compiled CPU kernel did not build here; its rounding is what this measures")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    models = [(str(path), lambda path=path: bitcliff.load(path)) for path in args.checkpoints] or [
        (f"rtn-w{bits}g64", lambda bits=bits: bitcliff.quantize(
            AutoModelForCausalLM.from_pretrained(resolve_model("default")),
            bitcliff.QuantConfig(bits=bits, group_size=64, method="rtn"), progress=False))
        for bits in args.bits]
    rows = []
    for name, make in models:
        model = make()
        # fp32 activations in the kernel, so that the simulated rounding is the only one (an AVX-512
        # build rounds many rows itself)
        with torch.inference_mode(), exact_activations():
            plain = evaluate_text(model, tokenizer, "wiki", args.windows, 512)["ppl"]
            row = {"model": name, "ppl": plain}
            for levels in args.levels:
                with rounded_inputs(levels):
                    ppl = evaluate_text(model, tokenizer, "wiki", args.windows, 512)["ppl"]
                row[f"ppl_levels_{levels}"] = ppl
                row[f"change_pct_levels_{levels}"] = 100 * (ppl / plain - 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.write_text(json.dumps({"environment": environment("cpu"), "windows": args.windows, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
