"""GPTQ for models larger than memory: one decoder layer in memory at a time, resumable.

:func:`quantize_gptq_streaming` reads a Hugging Face safetensors folder (one file or shards with
an index) tensor by tensor.  The model skeleton is built on the meta device (buffers such as
rotary frequencies are computed for real); the embeddings are materialized to compute the
first layer's inputs, then each decoder layer is materialized from the source, quantized with
the same code as the in-memory path (:func:`bitcliff.quant.gptq_layer.quantize_layer`),
written out and dropped.  Peak memory is about one layer plus the calibration activations.

Work happens in ``<out>.partial/`` beside the output folder:

- ``layer-00007.safetensors``: the finished tensors of layer 7, written once (temporary file,
  then rename) and never rewritten;
- ``inputs-00008.safetensors``: the calibration activations entering layer 8;
- ``progress.json``: settings and finished layers, replaced atomically after each layer.

An interrupted run (Ctrl-C, crash) started again with the same settings resumes after the last
finished layer and produces the same tensors as an uninterrupted run.  Only at the end are the
remaining tensors (embeddings, final norm, head), the index, ``config.json`` (with
``quantization_config``), the tokenizer files and ``gptq_log.json`` written, and the folder
renamed to ``out_dir``: a folder at ``out_dir`` is always a complete checkpoint, readable by
:func:`bitcliff.quant.checkpoint.load`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from bitcliff.kernels.pack import pack_qzeros
from bitcliff.quant.checkpoint import INDEX_FILE, SINGLE_FILE, quantization_config
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.convert import quantizable_linears
from bitcliff.quant.gptq import GPTQResult
from bitcliff.quant.gptq_layer import discover_groups, quantize_layer
from bitcliff.quant.gptq_model import (
    DEFAULT_BATCH_SIZE,
    capture_calibration_inputs,
    check_calib_ids,
    find_decoder_layers,
    layer_targets,
    write_gptq_log,
)
from bitcliff.quant.rtn import quantize_rtn

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
REST_FILE = "model-rest.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SourceTensors:
    """The tensors of a safetensors model folder, read one at a time (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index} is not a valid safetensors index: {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.folder}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
            self.weight_map = dict(weight_map)
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(str(self.folder / SINGLE_FILE), framework="pt") as f:
                self.weight_map = {key: SINGLE_FILE for key in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``, read from the file header only."""
        with safe_open(str(self.folder / self.weight_map[key]), framework="pt") as f:
            return _SAFETENSORS_DTYPES[f.get_slice(key).get_dtype()]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors.  Files are opened per call and closed again, so mapped
        pages of the source do not pile up in this process's resident memory."""
        missing = [k for k in keys if k not in self.weight_map]
        if missing:
            raise KeyError(
                f"{self.folder}: no tensor named {missing[0]!r} (the model's module names and the "
                "checkpoint's tensor names differ)"
            )
        out: dict[str, torch.Tensor] = {}
        for name in sorted({self.weight_map[k] for k in keys}):
            with safe_open(str(self.folder / name), framework="pt") as f:
                for key in keys:
                    if self.weight_map[key] == name:
                        out[key] = f.get_tensor(key)
        return out


def _sha256_ids(ids: torch.Tensor) -> str:
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _write_json_atomic(data, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _resolve_format(config: QuantConfig, requested: str) -> str:
    if requested == "auto":
        return "gptq" if config.sym else "gptq_v2"
    if requested not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'auto', 'gptq' or 'gptq_v2', got {requested!r}")
    if requested == "gptq" and not config.sym:
        raise ValueError(
            "checkpoint_format='gptq' (v1 stores zero-1) cannot hold the zero point 0 that asymmetric "
            "grids use; use 'gptq_v2' or 'auto'"
        )
    return requested


def _quant_tensors(name: str, result, bias: torch.Tensor | None, fmt: str) -> dict[str, torch.Tensor]:
    packed = result.qweight.packed()
    if fmt == "gptq":
        qw = result.qweight
        packed["qzeros"] = pack_qzeros((qw.zeros - 1) & (2**qw.bits - 1), qw.bits)
    tensors = {f"{name}.{k}": v for k, v in packed.items()}
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().to(torch.float16)
    return tensors


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _skeleton(src: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(src)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return hf_config, model.eval()


def _tied_keys(model: nn.Module, hf_config) -> dict[str, str]:
    """Tied tensor name -> the name it is tied to (``lm_head.weight`` -> the embeddings)."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return dict(tied)
    emb = model.get_input_embeddings()
    target = next(n for n, m in model.named_modules() if m is emb) + ".weight"
    return {key: target for key in tied}


def _start_work(work: Path, settings: dict, resume: bool) -> dict:
    progress = work / PROGRESS_FILE
    if work.exists() and resume and progress.is_file():
        state = json.loads(progress.read_text())
        if state.get("settings") != settings:
            old = state.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{work} holds a partial run with different settings ({', '.join(diff)}); "
                "remove it or pass resume=False to start over"
            )
        log.info("resuming from %s: %d layers already done", work, state["layers_done"])
        return state
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    state = {"settings": settings, "layers_done": 0, "log": []}
    _write_json_atomic(state, progress)
    return state


def quantize_gptq_streaming(
    src_folder: str | os.PathLike,
    config: QuantConfig,
    calib_ids: torch.Tensor,
    out_dir: str | os.PathLike,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    resume: bool = True,
    checkpoint_format: str = "auto",
    dtype: torch.dtype | None = None,
) -> Path:
    """GPTQ-quantize the model in ``src_folder`` layer by layer and write a GPTQ checkpoint.

    Args:
        src_folder: Hugging Face model folder: config.json, ``model.safetensors`` or shards
            with ``model.safetensors.index.json``, tokenizer files (copied along).
        config: a ``QuantConfig`` with ``method="gptq"``.
        calib_ids: int64 ``[n_windows, seq_len]`` calibration windows; the first
            ``config.calib_samples`` are used.
        out_dir: checkpoint folder to create; work goes to ``<out_dir>.partial`` meanwhile.
        progress: tqdm bar over the layers.
        batch_size: windows per layer forward (part of the resume settings).
        overwrite: replace an existing ``out_dir`` at the end.
        resume: continue a partial run with the same settings (else start over).
        checkpoint_format: "auto" (v1 "gptq" for symmetric grids, "gptq_v2" otherwise),
            "gptq" or "gptq_v2".
        dtype: dtype of the unquantized floating tensors (embeddings, norms, head); ``None``
            keeps the source's own (as :func:`bitcliff.quant.checkpoint.save` keeps the model's).
    Returns:
        ``out_dir``, holding the checkpoint and ``gptq_log.json``.
    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite`` (checked first).
        FileNotFoundError: the source folder lacks its weights, or shards listed in its index.
        ValueError: bad config or calibration data, a partial run with other settings, or a
            source whose tensor names do not match the model's modules.
    """
    if config.method != "gptq":
        raise ValueError(f"quantize_gptq_streaming needs config.method='gptq', got {config.method!r}")
    src, out_dir = Path(src_folder), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")
    calib_ids = check_calib_ids(calib_ids, config)
    fmt = _resolve_format(config, checkpoint_format)
    source = SourceTensors(src)
    hf_config, model = _skeleton(src)
    prefix, layers = find_decoder_layers(model)
    n_layers = len(layers)
    settings = {
        "config": config.to_dict(), "source": str(src.resolve()), "calib_sha256": _sha256_ids(calib_ids),
        "batch_size": batch_size, "checkpoint_format": fmt, "dtype": str(dtype), "num_layers": n_layers,
    }
    settings = json.loads(json.dumps(settings))  # the form it has once read back from progress.json
    work = out_dir.parent / f"{out_dir.name}.partial"
    state = _start_work(work, settings, resume)

    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    tied = _tied_keys(model, hf_config)
    head = {n for n, _ in quantizable_linears(model, config) if not n.startswith(prefix + ".")}
    for key in outside:  # only what the capture forward needs: leave the output head on meta
        if key in source and key.rpartition(".")[0] not in head and key not in tied:
            _assign(model, key, _cast(source.get(key), torch.float32))
    inputs = capture_calibration_inputs(model, layers, calib_ids, batch_size)
    start = state["layers_done"]
    hidden = inputs.hidden if start == 0 else _load_inputs(work, start, batch_size)
    for key in outside:  # the embeddings are no longer needed in memory
        if key.rpartition(".")[0] not in head and key not in tied and key in source:
            _assign(model, key, torch.empty(0, device="meta"))

    groups = None
    bar = tqdm(range(start, n_layers), desc=f"GPTQ {config.describe()}", disable=not progress, unit="layer",
               initial=start, total=n_layers)
    for i in bar:
        t0 = time.perf_counter()
        name = f"{prefix}.{i}"
        layer = layers[i]
        weights = source.get_many([f"{name}.{k}" for k in layer.state_dict()])
        stored = {k: weights.pop(f"{name}.{k}") for k in layer.state_dict()}
        layer.load_state_dict({k: _cast(v, torch.float32) for k, v in stored.items()}, strict=True, assign=True)
        targets, names = layer_targets(layer, name, config)
        if targets and (groups is None or {n for g in groups for n in g} != set(targets)):
            groups = discover_groups(layer, targets, hidden[0], inputs.calls[i][0])
        result = quantize_layer(layer, targets, hidden, inputs.calls[i], config, names, i, groups)
        tensors = {}
        for rel, res in result.results.items():
            tensors.update(_quant_tensors(names[rel], res, targets[rel].bias, fmt))
        quantized = set(result.results)
        for key, value in stored.items():
            if key.rpartition(".")[0] not in quantized:
                tensors[f"{name}.{key}"] = _cast(value, dtype)
        _save_atomic(tensors, work / f"layer-{i:05d}.safetensors")
        if i + 1 < n_layers:
            _save_atomic({"hidden": torch.cat(result.outputs)}, work / f"inputs-{i + 1:05d}.safetensors")
        state["layers_done"] = i + 1
        state["log"].extend(result.log)
        _write_json_atomic(state, work / PROGRESS_FILE)
        (work / f"inputs-{i:05d}.safetensors").unlink(missing_ok=True)
        layers[i] = layer.to("meta")
        hidden = result.outputs
        log.info("layer %d done in %.1f s", i, time.perf_counter() - t0)
    del hidden, inputs

    _finish(work, out_dir, source, model, hf_config, config, fmt, dtype, outside, tied, head, state, overwrite)
    return out_dir


def _rtn_outside(module_name: str, source: SourceTensors, weight_key: str, config: QuantConfig, fmt: str) -> dict:
    warnings.warn(
        f"{module_name} lies outside the decoder layers, where GPTQ gets no calibration inputs; "
        "quantizing it with RTN (add it to skip_modules to keep it in full precision)",
        RuntimeWarning,
        stacklevel=4,
    )
    qw = quantize_rtn(source.get(weight_key).float(), config, module_name)
    bias_key = f"{module_name}.bias"
    bias = source.get(bias_key) if bias_key in source else None
    return _quant_tensors(module_name, GPTQResult(qw, None, torch.zeros(0), None, "outside"), bias, fmt)


def _load_inputs(work: Path, layer: int, batch_size: int) -> list[torch.Tensor]:
    path = work / f"inputs-{layer:05d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the partial run in {work} cannot be resumed; pass resume=False")
    with safe_open(str(path), framework="pt") as f:
        return list(f.get_tensor("hidden").split(batch_size))


def _finish(work, out_dir, source, model, hf_config, config, fmt, dtype, outside, tied, head, state, overwrite) -> None:
    rest: dict[str, torch.Tensor] = {}
    rtn_log = []
    for key in outside:
        module_name = key.rpartition(".")[0]
        if module_name in head:
            if key.endswith(".weight"):
                rest.update(_rtn_outside(module_name, source, tied.get(key, key), config, fmt))
                rtn_log.append({"layer": None, "module": module_name, "group": [module_name], "loss": None,
                                "damp_percent": None, "fallback": "outside the decoder layers",
                                "refit_rows": None, "seconds": 0.0, "tokens": 0})
            continue  # a bias goes with its quantized weight
        if key in tied:
            continue  # stored once, under the tensor it is tied to
        rest[key] = _cast(source.get(key), dtype)
    _save_atomic(rest, work / REST_FILE)

    weight_map, total = {}, 0
    for path in sorted(work.glob("*.safetensors")):
        if path.name.startswith("inputs-"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = path.name
                t = f.get_slice(key)
                total += _slice_bytes(t)
    _write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, work / INDEX_FILE)

    model_config = hf_config.to_dict()
    model_config["quantization_config"] = quantization_config(config, fmt)
    embeddings = next((k for k in outside if k in source and k.endswith(".weight") and k not in tied), None)
    stored = dtype or (source.dtype(embeddings) if embeddings else torch.float32)
    model_config["dtype"] = str(stored).removeprefix("torch.")
    _write_json_atomic(model_config, work / "config.json")
    for name in TOKENIZER_FILES:
        if (source.folder / name).is_file():
            shutil.copy2(source.folder / name, work / name)
    write_gptq_log(state["log"] + rtn_log, work)
    (work / PROGRESS_FILE).unlink()
    for leftover in work.glob("inputs-*.safetensors"):
        leftover.unlink()

    old = None
    if out_dir.exists():
        if not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir} appeared during the run; the result stays in {work}")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _slice_bytes(tensor_slice) -> int:
    n = 1
    for d in tensor_slice.get_shape():
        n *= d
    return n * _SAFETENSORS_DTYPES[tensor_slice.get_dtype()].itemsize
