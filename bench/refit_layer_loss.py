"""How much the scale refit lowers GPTQ's layer output error, module by module.

Captures the Hessians of one decoder layer's linears on the FP model (the first
``--calib-samples`` calibration windows), then quantizes each linear by GPTQ with 0, 1, 2 and 3
refit rounds and prints ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (the calibration output error GPTQ
minimizes) relative to plain GPTQ, with the seconds each takes.

Usage::

    python bench/refit_layer_loss.py --model default --layer 6 --bits 4 3 2 --group-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="refit rounds to try beyond plain GPTQ")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows
    from bitcliff.layers import find_decoder_layers
    from bitcliff.quant.config import QuantConfig
    from bitcliff.quant.gptq import gptq_quantize, proxy_loss
    from bitcliff.statistics import HessianAccumulator

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tokenizer, load_text("wiki"), args.calib_samples, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, layers = find_decoder_layers(model)
    if not 0 <= args.layer < len(layers):
        p.error(f"--layer must lie in [0, {len(layers)}), got {args.layer}")
    layer = layers[args.layer]
    linears = {n: m for n, m in layer.named_modules() if type(m) is torch.nn.Linear}
    accs = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: accs[n].add(a[0])) for n, m in linears.items()]
    with torch.no_grad():
        for batch in calib.split(8):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()

    rows = []
    print(f"{args.model} layer {args.layer}, g{args.group_size}{' static' if args.static_groups else ''}, "
          f"{calib.shape[0]} windows x {calib.shape[1]}: output error relative to plain GPTQ")
    print(f"{'bits':>4s} {'module':22s} {'plain':>10s} " + " ".join(f"{f'r={r}':>14s}" for r in range(1, args.rounds + 1)))
    for bits in args.bits:
        base = QuantConfig(bits=bits, group_size=args.group_size, method="gptq", static_groups=args.static_groups)
        for name, linear in linears.items():
            w, h = linear.weight.detach(), accs[name].hessian()
            losses, seconds = [], []
            for rounds in range(args.rounds + 1):
                start = time.perf_counter()
                result = gptq_quantize(w, h, dataclasses.replace(base, refit_rounds=rounds), name)
                seconds.append(time.perf_counter() - start)
                losses.append(proxy_loss(w, result.qweight.dequantize(), h))
            rows.append({"bits": bits, "module": name, "loss": losses, "seconds": seconds})
            cells = " ".join(f"{100 * (x / losses[0] - 1):+6.1f}% {s:5.2f}s" for x, s in zip(losses[1:], seconds[1:]))
            print(f"{bits:>4d} {name:22s} {losses[0]:10.4g} {cells}  (plain {seconds[0]:.2f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "layer": args.layer, "group_size": args.group_size,
                       "static_groups": args.static_groups, "calib": list(calib.shape),
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
