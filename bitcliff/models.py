"""Loading models by name: the embedded defaults, a local folder, a hub id, or a checkpoint.

Every way a model fails to load gets a message that names what is wrong: a folder whose
config.json is not JSON, a quantized checkpoint whose ``quantization_config`` was removed (its
weights would otherwise load as freshly initialised ones), weights missing from or unexpected
in a folder, a hub id while the hub is unreachable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitcliff.device import HOST, compute_dtype, resolve_device, trained_dtype


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be loaded as what was asked for."""


def read_config_json(folder: str | Path) -> dict:
    """A model folder's config.json as a dict.

    Raises:
        ModelLoadError: the file is missing or is not a JSON object (with the parser's position).
    """
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no config.json: it is not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def is_quantized_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose config.json declares a GPTQ quantization."""
    if not (Path(path) / "config.json").is_file():
        return False
    qc = read_config_json(path).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "gptq"


def _holds_gptq_tensors(folder: Path) -> str | None:
    """The first ``*.qweight`` tensor name in a folder's safetensors files, or None."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                found = next((k for k in f.keys() if k.endswith(".qweight")), None)
        except Exception:  # an unreadable file is reported by the loader itself
            continue
        if found:
            return found
    return None


def check_hub_reachable(repo_id: str) -> None:
    """Fail fast, with the way out, when ``repo_id`` is neither cached nor reachable."""
    import huggingface_hub

    if huggingface_hub.try_to_load_from_cache(repo_id, "config.json") is not None:
        return
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except Exception as exc:  # offline (DNS, timeout), unknown repo, gated...
        raise ModelLoadError(
            f"cannot load {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); the hub is "
            "unreachable or the id is unknown, and no local copy is cached. Pass a local model folder "
            "(--model PATH) or one of the embedded models (default, gemma3-270m)"
        ) from None


def load_fp_model(name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Full-precision model and tokenizer.

    Args:
        name: "default", "gemma3-270m", a local HF folder or a hub id (see ``bitcliff.assets``).
        dtype: parameter dtype; None: the device's (:func:`bitcliff.device.compute_dtype`: fp32 on
            the CPU, the model's half precision on a GPU).
        device: where the model computes (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch device).
    Returns:
        ``(model, tokenizer, resolved_path)``; the model in eval mode on ``device``.
    Raises:
        ModelLoadError: see the module docstring; also for a quantized checkpoint (this loads
            full-precision models only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bitcliff import hf_quantizer  # noqa: F401  - registers quant_method "bitcliff", whose loader says what to do
    from bitcliff.assets import resolve_model

    path = resolve_model(name)
    folder = Path(path)
    if folder.is_dir():
        if is_quantized_folder(folder):
            raise ModelLoadError(f"{name!r} is a quantized checkpoint; expected a full-precision model")
        packed = _holds_gptq_tensors(folder)
        if packed is not None:
            raise ModelLoadError(
                f"{folder} holds GPTQ-packed tensors ({packed}) but its config.json has no quantization_config: "
                "it is a quantized checkpoint whose quantization settings were removed, and loading it as a "
                "full-precision model would replace every quantized weight by random values; restore "
                "quantization_config in config.json"
            )
    else:
        check_hub_reachable(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = resolve_device(device)
    if dtype is None:
        dtype = compute_dtype(device, trained_dtype(AutoConfig.from_pretrained(path)))
    with torch.device(HOST):  # loaded on the host, moved once
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        parts = [f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}"
                 for k, v in problems.items() if v]
        raise ModelLoadError(f"{path}: the weights do not match the model's config ({'; '.join(parts)})")
    return model.to(device).eval(), tokenizer, path


def load_any(name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A quantized checkpoint folder (via ``bitcliff.load``) or a full-precision model, on
    ``device`` in ``dtype`` (None: the device's, as :func:`load_fp_model`).

    Returns:
        ``(model, tokenizer, resolved_path, quantized: bool)``.
    """
    if Path(name).is_dir() and is_quantized_folder(name):
        from bitcliff.quant.checkpoint import load, load_tokenizer

        return load(name, dtype=dtype, device=device), load_tokenizer(name), str(name), True
    model, tokenizer, path = load_fp_model(name, dtype, device)
    return model, tokenizer, path, False


def quantized_modules(q_model: torch.nn.Module) -> dict[str, dict]:
    """Name -> ``{"in", "out", "bits", "group_size"}`` of every ``QuantLinear``: what a repair plan
    needs to cost its choices without the model at hand."""
    from bitcliff.quant.qlinear import QuantLinear

    return {name: {"in": m.in_features, "out": m.out_features, "bits": m.bits, "group_size": m.group_size}
            for name, m in q_model.named_modules() if isinstance(m, QuantLinear)}


def fingerprints(fp_model: torch.nn.Module, q_model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of the FP model's input embeddings (``models.model_fingerprint``) and of every
    ``QuantLinear``'s packed codes and scales: a saved diagnosis is reused only for the models it
    was made on."""
    return {"fp": model_fingerprint(fp_model), "quantized": quantized_fingerprint(q_model)}


def quantized_fingerprint(q_model: torch.nn.Module) -> str:
    """SHA-256 of every ``QuantLinear``'s name, packed codes and scales."""
    import hashlib

    from bitcliff.quant.qlinear import QuantLinear  # the quantized layers import far more than this module

    digest = hashlib.sha256()
    for name, m in q_model.named_modules():
        if isinstance(m, QuantLinear):
            digest.update(name.encode())
            digest.update(m.qweight.cpu().numpy().tobytes())
            digest.update(m.scales.cpu().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model, digits: int = 64) -> str:
    """SHA-256 of the model's input embeddings (its first ``digits`` hex digits): tells two models
    apart under one name, and a saved diagnosis from the models it was not made on."""
    import hashlib

    weight = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    return hashlib.sha256(weight.tobytes()).hexdigest()[:digits]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``model``: names, dtypes, shapes and values (a model
    fine-tuned from another, or the same one in another dtype, is another model)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
