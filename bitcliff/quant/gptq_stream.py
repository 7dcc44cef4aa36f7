"""GPTQ for models larger than memory: one decoder layer in memory at a time, resumable.

:func:`quantize_gptq_streaming` reads a Hugging Face safetensors folder (one file or shards with
an index) tensor by tensor.  The model skeleton is built on the meta device (buffers such as
rotary frequencies are computed for real); the embeddings are materialized to compute the
first layer's inputs, then each decoder layer is materialized from the source, quantized with
the same step as the in-memory path (:func:`bitcliff.quant.gptq_layer.quantize_decoder_layer`),
written out with the checkpoint writer's own pieces (:mod:`bitcliff.quant.checkpoint`) and
dropped.  Peak memory is about one layer plus the calibration activations.

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

Over several ranks (:mod:`bitcliff.distributed`) every rank reads each layer from the source,
runs it on its share of the calibration batches and takes part in the solves; rank 0 alone
writes: the layer files, the next layer's inputs (the ranks send it their shares) and the
progress.  Every rank must see the source folder and the work folder at the same path (one
machine, or a shared filesystem).  Inputs are stored for all windows, so a run resumes with any
number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from bitcliff.device import compute_dtype, resolve_device
from bitcliff.distributed import Ranks
from bitcliff.group_walk import capture_calibration_inputs, rank_share
from bitcliff.kernels.cpu import exact_activations
from bitcliff.layers import find_decoder_layers
from bitcliff.quant.checkpoint import (
    SAFETENSORS_DTYPES,
    TOKENIZER_FILES,
    checkpoint_tensors,
    config_json,
    read_weight_map,
    resolve_format,
    write_index,
)
from bitcliff.quant.config import QuantConfig
from bitcliff.quant.gptq_layer import ModuleLog, quantize_decoder_layer
from bitcliff.quant.gptq_model import (
    DEFAULT_BATCH_SIZE,
    check_calib_ids,
    quantize_outside_layers_rtn,
    report_layer,
    write_gptq_log,
)
from bitcliff.quant.surgery import quantizable_linears
from bitcliff.storage import check_replaceable, finish_folder, save_tensors, write_json

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
REST_FILE = "model-rest.safetensors"


class SourceTensors:
    """The tensors of a safetensors model folder, read one at a time (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.weight_map = read_weight_map(self.folder)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key``, read from the file header only."""
        with safe_open(str(self.folder / self.weight_map[key]), framework="pt") as f:
            return SAFETENSORS_DTYPES[f.get_slice(key).get_dtype()]

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


def _start_work(work: Path, settings: dict, resume: bool) -> dict:
    """The progress state of the run in ``work``: resumed, or started afresh."""
    progress = work / PROGRESS_FILE
    if work.exists() and not progress.is_file():
        raise FileExistsError(
            f"{work} exists but holds no {PROGRESS_FILE}: it is not a partial bitcliff run, so it is "
            "left alone; move it away to quantize into this output folder"
        )
    if work.exists() and resume:
        state = json.loads(progress.read_text())
        if state.get("settings") != settings:
            old = state.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{work} holds a partial run with different settings ({', '.join(diff)}); "
                "re-run with --restart (resume=False) to discard it and start over"
            )
        log.info("resuming from %s: %d layers already done", work, state["layers_done"])
        return state
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    state = {"settings": settings, "layers_done": 0, "log": []}
    write_json(work / PROGRESS_FILE, state, sort_keys=True)
    return state


def layers_done(work: Path) -> int | None:
    """How many layers the partial run in ``work`` has finished; None when there is no readable one."""
    try:
        return int(json.loads((work / PROGRESS_FILE).read_text())["layers_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_inputs(work: Path, layer: int, batch_size: int) -> list[torch.Tensor]:
    path = work / f"inputs-{layer:05d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the partial run in {work} cannot be resumed; pass --restart")
    with safe_open(str(path), framework="pt") as f:
        return list(f.get_tensor("hidden").split(batch_size))


# Its forwards feed GPTQ's solves, defined on exact products: with the kernel's integer
# activations (AVX-512 builds only) the codes it writes would depend on the machine's build.
@exact_activations()
def quantize_gptq_streaming(
    src_folder: str | os.PathLike,
    config: QuantConfig,
    calib_ids: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    resume: bool = True,
    checkpoint_format: str = "auto",
    dtype: torch.dtype | None = None,
    ranks: Ranks | None = None,
    device: str | torch.device = "cpu",
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
        overwrite: replace an existing checkpoint at ``out_dir`` (one bitcliff wrote) at the end.
        resume: continue a partial run with the same settings (else start over).
        checkpoint_format: "auto", "gptq" or "gptq_v2"
            (:func:`bitcliff.quant.checkpoint.resolve_format`).
        dtype: dtype of the unquantized floating tensors (embeddings, norms, head); ``None``
            keeps the source's (that of its embeddings).
        ranks: the processes sharing the work (see the module docstring); None for one.
        device: where each layer computes (:mod:`bitcliff.device`): the layer in hand, the
            embeddings for the capture and the calibration activations live there, in the device's
            dtype (fp32 on the CPU, the source's half precision on a GPU).
    Returns:
        ``out_dir``, holding the checkpoint and ``gptq_log.json``.
    Raises:
        FileExistsError: ``out_dir`` exists and may not be replaced (checked first).
        FileNotFoundError: the source folder lacks its weights, or shards listed in its index.
        ValueError: bad config or calibration data, a partial run with other settings, or a
            source whose tensor names do not match the model's modules.
    """
    if config.method != "gptq":
        raise ValueError(f"quantize_gptq_streaming needs config.method='gptq', got {config.method!r}")
    src, out_dir = Path(src_folder), Path(out_dir)
    ranks = ranks or Ranks.single()
    check_replaceable(out_dir, overwrite)
    calib_ids = check_calib_ids(calib_ids, config)
    n_windows = calib_ids.shape[0]
    fmt = resolve_format(checkpoint_format, config.sym)
    source = SourceTensors(src)
    hf_config, model = _skeleton(src)
    prefix, layers = find_decoder_layers(model)
    n_layers = len(layers)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    embeddings = next((k for k in outside if k in source and k.endswith(".weight")), None)
    stored_dtype = dtype or (source.dtype(embeddings) if embeddings else torch.float32)
    device = resolve_device(device)
    compute = compute_dtype(device, source.dtype(embeddings) if embeddings else None)
    for module in model.modules():  # the buffers computed for real (rotary frequencies) join the layers
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[key] = buffer.to(device)
    settings = {
        "config": config.to_dict(), "source": str(src.resolve()), "calib_sha256": _sha256_ids(calib_ids),
        "batch_size": batch_size, "checkpoint_format": fmt, "dtype": str(stored_dtype), "num_layers": n_layers,
        "compute_dtype": str(compute),
    }
    settings = json.loads(json.dumps(settings))  # the form it has once read back from progress.json
    work = out_dir.parent / f"{out_dir.name}.partial"
    state = ranks.on_writer("preparing the work folder", lambda: _start_work(work, settings, resume))
    calib_ids = rank_share(calib_ids, batch_size, ranks)
    share = ranks.share(-(-n_windows // batch_size))

    # Only what the capture forward needs: the output head (often the largest tensor) stays on meta.
    head = {n for n, _ in quantizable_linears(model, config) if not n.startswith(prefix + ".")}
    needed = [k for k in outside if k in source and k.rpartition(".")[0] not in head]
    for key in needed:
        _assign(model, key, source.get(key).to(device=device, dtype=compute))
    recorded = capture_calibration_inputs(model, layers, calib_ids, batch_size)
    start = state["layers_done"]
    hidden = recorded.inputs[0] if start == 0 else \
        [h.to(device) for h in _load_inputs(work, start, batch_size)[share.start: share.stop]]
    for key in needed:  # not needed again until the end
        _assign(model, key, torch.empty(0, device="meta"))

    groups = None
    bar = tqdm(range(start, n_layers), desc=f"GPTQ {config.describe()}", disable=not (progress and ranks.writes),
               unit="layer", initial=start, total=n_layers)
    for i in bar:
        t0 = time.perf_counter()
        name = f"{prefix}.{i}"
        layer = layers[i]
        stored = source.get_many([f"{name}.{k}" for k in layer.state_dict()])
        layer.load_state_dict({k.removeprefix(name + "."): v.to(device=device, dtype=compute) for k, v in stored.items()},
                              strict=True, assign=True)
        step = quantize_decoder_layer(layer, name, hidden, recorded.calls[i], config, groups, ranks)
        shares = None
        if i + 1 < n_layers:  # the next layer's inputs, every rank's share, for a resume
            shares = ranks.gather(None, [torch.cat(step.outputs)], 0, f"collecting the outputs of layer {i}")
        if ranks.writes:
            save_tensors(checkpoint_tensors(layer, fmt, stored_dtype, prefix=name + "."),
                         work / f"layer-{i:05d}.safetensors")
            if shares is not None:
                save_tensors({"hidden": torch.cat([t for _, (t,) in shares])}, work / f"inputs-{i + 1:05d}.safetensors")
            state["layers_done"] = i + 1
            state["log"].extend(e.to_dict() for e in step.log)
            write_json(work / PROGRESS_FILE, state, sort_keys=True)
            (work / f"inputs-{i:05d}.safetensors").unlink(missing_ok=True)
        layers[i] = layer.to("meta")
        hidden, groups = step.outputs, step.groups
        report_layer(bar, i, step, time.perf_counter() - t0)
    del hidden, recorded

    def finish() -> None:
        """The rest of the model (head by RTN), the last files, and the folder renamed: rank 0."""
        for key in outside:  # the rest of the model, for the head's RTN and the last file
            if key in source:
                _assign(model, key, source.get(key).float())
        model.tie_weights()
        absent = [k for k, v in model.state_dict().items() if v.is_meta and not k.startswith(prefix + ".")]
        if absent:
            raise ValueError(f"{src} has no tensor {absent[0]!r}, which the model needs outside its decoder layers")
        entries = [ModuleLog(**e) for e in state["log"]] + quantize_outside_layers_rtn(model, prefix, config)
        save_tensors(checkpoint_tensors(model, fmt, stored_dtype, exclude=prefix), work / REST_FILE)
        for leftover in work.glob("inputs-*.safetensors"):
            leftover.unlink()
        write_index(work)
        write_json(work / "config.json", config_json(hf_config.to_dict(), config, fmt, stored_dtype), sort_keys=True)
        for name in TOKENIZER_FILES:
            if (source.folder / name).is_file():
                shutil.copy2(source.folder / name, work / name)
        write_gptq_log(entries, work)
        (work / PROGRESS_FILE).unlink()
        finish_folder(work, out_dir, overwrite, kind="checkpoint")

    ranks.on_writer("writing the checkpoint", finish)
    return out_dir
