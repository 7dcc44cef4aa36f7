"""Low-rank compensation stored beside a checkpoint as a PEFT LoRA adapter.

The convention GPTQModel's EoRA and vLLM use: ``adapter_config.json`` (``peft_type: LORA``, the
largest rank as ``r`` with every module's own rank in ``rank_pattern``, ``lora_alpha`` equal to the
rank so that the LoRA scaling ``alpha / r`` is 1) and ``adapter_model.safetensors`` holding, per
module ``<name>``, ``base_model.model.<name>.lora_A.weight`` (fp16 ``[r, K]``) and
``base_model.model.<name>.lora_B.weight`` (fp16 ``[N, r]``).  A layer then computes
``y = Ŵ x + B (A x)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.finite import non_finite

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that does not fit the checkpoint beside it."""


def adapter_tensors(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` for the fp16 low-rank terms of ``model``'s ``QuantLinear`` s, or
    ``({}, {})`` when there are none (quantized factors are stored by ``bitcliff.quant.factors``)."""
    ranks, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.lora_A is not None and module.lowrank_factors is None:
            ranks[name] = module.rank
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().cpu().to(torch.float16).contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().cpu().to(torch.float16).contiguous()
    if not ranks:
        return {}, {}
    top = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    return config, tensors


def has_adapter(directory: Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def read_adapter(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's factors in ``directory`` by module name: fp16 ``A [r, K]`` and ``B [N, r]``.

    Raises:
        AdapterError: unreadable files, non-finite factors, a module lacking one factor, or a LoRA
            scaling other than 1.
    """
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{directory / CONFIG_FILE} could not be read: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{directory / CONFIG_FILE}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"{path} could not be read: {exc}") from exc
    for key, tensor in tensors.items():
        if non_finite(tensor):
            raise AdapterError(f"{path}: tensor {key} holds NaN or Inf values: the adapter is damaged; "
                               "repair the checkpoint again")
    names = sorted({k[len(_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(_PREFIX)})
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors = {}
    for name in names:
        a, b = tensors.get(f"{_PREFIX}{name}.lora_A.weight"), tensors.get(f"{_PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            raise AdapterError(f"{path}: {name} lacks its lora_A or lora_B factor")
        rank = ranks.get(name, config.get("r"))
        alpha = alphas.get(name, config.get("lora_alpha", rank))
        if rank != a.shape[0] or alpha != rank:
            raise AdapterError(f"{path}: {name} has rank {a.shape[0]} (config {rank}) and alpha {alpha}; bitcliff "
                               "reads adapters with alpha equal to the rank (scaling 1)")
        factors[name] = (a, b)
    return factors


def load_adapter(model: nn.Module, directory: Path) -> int:
    """Attach the adapter in ``directory`` to ``model``'s ``QuantLinear`` s; returns how many.

    Raises:
        AdapterError: what :func:`read_adapter` refuses, a module the model lacks or that is not
            quantized, or factors whose shapes do not fit their module.
    """
    path = Path(directory) / WEIGHTS_FILE
    modules = dict(model.named_modules())
    factors = read_adapter(directory)
    for name, (a, b) in factors.items():
        module = modules.get(name)
        if not isinstance(module, QuantLinear):
            raise AdapterError(f"{path}: the adapter has factors for {name}, which is not a quantized linear of the model")
        try:
            module.set_lowrank(a, b)
        except ValueError as exc:
            raise AdapterError(f"{path}: {exc}") from exc
    return len(factors)
