"""Where bitcliff computes, and in which dtypes: the one device and dtype policy.

Device (``--device`` of every command, ``device=`` of the Python API):

* ``auto`` (the default): the CUDA device when one is available, else the CPU.  Under torchrun
  the rank's GPU is ``cuda:$LOCAL_RANK``, so every rank computes on its own GPU.
* ``cpu``, ``cuda`` (the current CUDA device; under torchrun the rank's) or ``cuda:N``: that
  device, or a clear error when it does not exist.

Dtypes (:func:`compute_dtype`):

* on a GPU, weights and activations in the model's own half-precision dtype: bf16 where the model
  was trained in bf16 (its ``config.json`` says so), fp16 otherwise; the Triton kernels take both;
* on the CPU, fp32: CPUs have no fast half-precision matmul, and every number in the docs was
  measured in fp32 on the CPU;
* on every device, the statistics and the solves stay in fp32 or fp64 whatever the model's
  dtype: Hessians and covariances (:mod:`bitcliff.statistics` accumulates in fp32, means in
  fp64), GPTQ's Cholesky and column loop (fp32), the scale refit and the repairs' solves (fp64).

A model is put on its device once, when it is loaded; the walks keep every activation where its
layer is, so nothing crosses between host and device inside a loop.
"""

from __future__ import annotations

import itertools
import os

import torch

#: Where models are assembled and host-side index and bookkeeping tensors are made, named
#: explicitly so that ``torch.set_default_device`` elsewhere changes nothing.
HOST = torch.device("cpu")
#: What ``--device`` accepts besides ``cuda:N``.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: The dtype of every statistic and solve, on every device.
STATISTICS_DTYPE = torch.float32


class DeviceError(ValueError):
    """A device that does not exist here, or a spelling bitcliff does not know."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names (module docstring); ``None`` means ``auto``.

    Raises:
        DeviceError: an unknown spelling, or a CUDA device this machine does not have (named,
            with the devices it has).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return _auto_device()
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise DeviceError(f"device {spec!r}: the CUDA index must be a number, as in cuda:0")
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: this machine has no CUDA device (torch {torch.__version__} "
                              f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); "
                              "use --device cpu or auto")
        count = torch.cuda.device_count()
        index = int(index_text) if index_text else _default_cuda_index()
        if index >= count:
            raise DeviceError(f"device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    raise DeviceError(f"device {spec!r}: expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def _auto_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _default_cuda_index())


def _default_cuda_index() -> int:
    """Under torchrun the rank's ``LOCAL_RANK`` GPU, else the current one."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return int(local) % torch.cuda.device_count()
    return torch.cuda.current_device()


def trained_dtype(config) -> torch.dtype | None:
    """The dtype a transformers config says the weights were saved in (``dtype`` or the older
    ``torch_dtype``), or None when it says nothing usable."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
            return getattr(torch, value.removeprefix("torch."))
    return None


def compute_dtype(device: torch.device, trained: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a model's weights and activations on ``device`` (module docstring): fp32 on
    the CPU; on a GPU bf16 when ``trained`` is bf16, else fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if trained == torch.bfloat16 else torch.float16


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter or buffer (QuantLinear keeps
    its weight in buffers); the CPU for a model with neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return HOST if tensor is None else tensor.device


def describe(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H200, 139 GiB)``, for logs and result files."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"{device} ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    """Start counting :func:`peak_memory` from now (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Bytes of GPU memory allocated at the peak since :func:`reset_peak_memory`; None on the CPU
    (where the operating system, not torch, knows the peak)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
