"""bitcliff checkpoints loaded the ways other tools load them, against bitcliff's own loader.

    python -m bench.peer_transformers --peer-python "$PEER/bin/python" CHECKPOINT [CHECKPOINT ...] \\
        [--json bench/results/peer_transformers.json]

``$PEER`` is the environment of ``bench/peer_gptqmodel.py`` (GPTQModel 7.6 on the CPU build of
torch) with ``optimum`` and ``peft`` added.  For every checkpoint folder, two readers:

* ``transformers``: ``AutoModelForCausalLM.from_pretrained(folder)``, which hands a
  ``quant_method: gptq`` config to GPTQModel through optimum (and fails without both installed);
* ``gptqmodel``: ``GPTQModel.load(folder)``, with the LoRA adapter beside the weights passed as
  ``adapter=Lora(path=...)`` when there is one (a repaired checkpoint: restored modules in
  ``quantization_config.dynamic``, corrected biases, low-rank factors).

Both load the model in fp16 (GPTQModel's CPU kernel takes no float32 model); their logits for the
same token windows are compared with ``bitcliff.load``'s float32 ones (relative L2 and max abs,
so fp16 rounding through every layer is part of the difference), or the error is recorded.  Prints a table and writes it as JSON with the
versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "peer_transformers.json"


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _compare(reference, logits, without=None) -> dict:
    diff = (logits - reference).float()
    row = {"rel_l2": float(diff.norm() / reference.norm()), "max_abs": float(diff.abs().max())}
    if without is not None:
        row["rel_l2_to_checkpoint_without_adapter"] = float((logits - without).norm() / without.norm())
    return row


def check(folder: Path, ids) -> list[dict]:
    import torch

    import bitcliff

    reference = _logits(bitcliff.load(folder), ids)
    # With an adapter, also the distance to the same checkpoint without it: a reader that silently
    # skipped the adapter would sit near this one instead of near the reference.
    without = None
    if (folder / "adapter_config.json").is_file():
        from bitcliff.quant.qlinear import QuantLinear

        bare = bitcliff.load(folder)
        for module in bare.modules():
            if isinstance(module, QuantLinear):
                module.set_lowrank(None, None)
        without = _logits(bare, ids)
    rows = []
    try:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", dtype=torch.float16)
        rows.append({"reader": "transformers", "dtype": "float16", **_compare(reference, _logits(model, ids), without)})
    except Exception as exc:  # noqa: BLE001 - report, keep checking
        rows.append({"reader": "transformers", "error": f"{type(exc).__name__}: {exc}"[:400],
                     "trace": traceback.format_exc(limit=3)[-600:]})
    try:
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.adapter.adapter import Lora

        kwargs = {}
        if (folder / "adapter_config.json").is_file():
            config = json.loads((folder / "adapter_config.json").read_text())
            kwargs["adapter"] = Lora(path=str(folder), rank=config["r"])
        model = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16, **kwargs)
        rows.append({"reader": "gptqmodel", "dtype": "float16", "adapter": bool(kwargs),
                     **_compare(reference, _logits(model.model, ids), without)})
    except Exception as exc:  # noqa: BLE001
        rows.append({"reader": "gptqmodel", "error": f"{type(exc).__name__}: {exc}"[:400],
                     "trace": traceback.format_exc(limit=3)[-600:]})
    return [{"checkpoint": folder.name, **row} for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--peer-python", help="python of an environment with gptqmodel and optimum; re-runs there")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    if args.peer_python:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
        cmd = [args.peer_python, "-m", "bench.peer_transformers", *map(str, args.checkpoints), "--json", args.json]
        return subprocess.run(cmd, cwd=REPO, env=env).returncode

    import importlib.metadata as md

    import torch

    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    rows = [row for folder in args.checkpoints for row in check(folder.resolve(), ids)]
    versions = {}
    for name in ("gptqmodel", "optimum", "peft", "transformers", "torch"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    for row in rows:
        outcome = row.get("error") or f"rel L2 {row['rel_l2']:.2e}, max abs {row['max_abs']:.2e}" + (
            f" (to the checkpoint without its adapter: {row['rel_l2_to_checkpoint_without_adapter']:.2e})"
            if "rel_l2_to_checkpoint_without_adapter" in row else "")
        print(f"{row['checkpoint']:>28} {row['reader']:>12}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
