"""Tuning of the dequant-matmul kernels: candidate configurations, pruning, and the per-device cache.

``qmatmul.py`` hands these to ``triton.autotune``; the winner for each shape class is stored by
:class:`TuningCache` so that later runs launch it without tuning.  Triton's own
``autotune(cache_results=True)`` (present in 3.6 and 3.9) keys its disk cache by GPU *architecture* and its
kernel-source hash, so an H100 and an H200 (both sm_90, different bandwidth) would share
entries, and it lives in Triton's cache directory; this cache is keyed by device name and Triton
version, in the user's cache directory, and holds plain JSON a user can read or delete.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import torch
import triton

from bitcliff.storage import cache_root, write_json

GEMV_MAX_M = 4  # above this the tiled schedule shares each dequantized tile among BLOCK_M rows
DEQUANT_MIN_M = 512  # from here a plain launch times "tiled" against "dequant" once and keeps the faster
SPLIT_MAX_M = 64  # larger M has enough output tiles: no split-K, no workspace

# Small, fixed configurations for the interpreter (and the default when tuning is off).
DEFAULT_CONFIGS = {
    "gemv": {"BLOCK_N": 64, "BLOCK_U": 4, "SPLIT_K": 1, "num_warps": 2, "num_stages": 1},
    "tiled": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 4,
              "num_warps": 4, "num_stages": 2},
}


# (BLOCK_N, num_warps): two, four or eight columns per thread.  A thread reads 8, 16 or 32
# contiguous bytes of each plane row; more columns share each activation load and zero-point
# constant among more weights, fewer give more programs and warps to fill the GPU (two columns a
# thread: twice the resident warps of four for the same split, to hide load latency with).
_GEMV_SHAPES = ((64, 1), (128, 2), (256, 4), (128, 1), (256, 2), (512, 4), (256, 1), (512, 2), (1024, 4))
# One stage keeps the loop in registers; two let Triton software-pipeline the weight loads (through
# shared memory) where its pipeliner takes this loop, so that one warp loads a tile while it
# computes the previous one.  Whether the compiled loop is pipelined is read from its machine code
# (``bench/sass_model.py``); the tuner measures both.
_GEMV_STAGES = (1, 2)


def gemv_configs() -> list[triton.Config]:
    configs = []
    for block_n, warps in _GEMV_SHAPES:
        for block_u in (2, 4):
            for split_k in (1, 2, 4, 8, 16, 32):
                for stages in _GEMV_STAGES:
                    configs.append(triton.Config(
                        {"BLOCK_N": block_n, "BLOCK_U": block_u, "SPLIT_K": split_k},
                        num_warps=warps, num_stages=stages,
                    ))
    return configs


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the Hopper-friendly shapes of Triton's matmul
# tutorial plus narrow-M shapes for batches of 5..64 rows.
_TILED_SHAPES = (
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 256, 64, 4, 3), (16, 128, 64, 4, 4),
    (16, 128, 32, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4), (32, 256, 64, 8, 3),
    (32, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3),
    (64, 128, 32, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    (128, 128, 32, 8, 4), (256, 128, 64, 8, 3),
)


def tiled_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in _TILED_SHAPES:
        for split_k in ((1, 2, 4, 8) if bm <= 32 else (1, 2, 4) if bm == 64 else (1,)):
            configs.append(triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8},
                num_warps=warps, num_stages=stages,
            ))
    return configs


def candidates(schedule: str) -> list[triton.Config]:
    """Every configuration the autotuner knows for ``schedule`` (``"gemv"`` or ``"tiled"``)."""
    return gemv_configs() if schedule == "gemv" else tiled_configs()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100's and an H200's count, for exercising the pruning without a GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Pruning: the one rule for which configurations may run a shape class
# ---------------------------------------------------------------------------------------------


def prune(schedule: str, configs, m: int, n: int, kp: int, sms: int, group: int = -1) -> list:
    """The configurations of ``configs`` worth running on ``[m, kp] x [kp, n]`` with ``sms`` SMs.

    The one rule every reader of configurations applies: the autotuner (through
    :func:`prune_gemv` / :func:`prune_tiled`), the launcher when it reads the tuning cache
    (:func:`cached_choices`), and the seed writer (``bench/sass_model.py --seed-cache``).  It is a
    function of the shape class (``m`` is taken by its bucket, :func:`m_bucket`), as the tuning
    cache is keyed by shape class.  Never empty when ``configs`` is not.
    """
    m = m_bucket(m)
    if schedule == "gemv":
        return _prune_gemv(configs, m, n, kp, sms)
    return _prune_tiled(configs, m, n, kp, sms, group)


def _prune_gemv(configs, m: int, n: int, kp: int, sms: int) -> list:
    units = kp // 32
    keep = []
    for c in configs:
        bn, bu, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_U"], c.kwargs["SPLIT_K"]
        programs = m * triton.cdiv(n, bn) * sk
        if bn > max(128, triton.next_power_of_2(n)) or sk * bu > units:
            continue
        # Enough warps for every scheduler of every SM, at most one full occupancy wave of them,
        # and K slices of at least two tiles.
        warps = programs * c.num_warps
        if 4 * sms <= warps <= 64 * sms and 2 * sk * bu <= units:
            keep.append(c)
    return keep or [min(configs, key=lambda c: abs(m * triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] - 2 * sms))]


def _prune_tiled(configs, m: int, n: int, kp: int, sms: int, group: int) -> list:
    target = min(max(16, triton.next_power_of_2(m)), 128)
    keep = []
    for c in configs:
        bm, bn, bk, sk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        if bm != target and not (m > 128 and bm == 2 * target):
            continue
        if bn > max(64, triton.next_power_of_2(n)):
            continue
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        # Split K only to fill the GPU: up to a few waves of programs, K slices >= 2 tiles long.
        if sk > 1 and (m > SPLIT_MAX_M or tiles >= sms or not sms <= tiles * sk < 4 * sms
                       or 2 * sk * bk > kp):
            continue
        keep.append(c)
    # A K tile inside one group loads one row of scales and zeros instead of a [BLOCK_K, BLOCK_N]
    # gather: prefer such tiles when the group size allows them.
    aligned = [c for c in keep if group == -1 or group % c.kwargs["BLOCK_K"] == 0]
    return aligned or keep or configs[:1]


def prune_gemv(configs, named_args, **kwargs):
    """:func:`prune` as ``triton.autotune``'s ``early_config_prune`` for the gemv kernel."""
    return prune("gemv", configs, named_args["M"], named_args["N"], named_args["KP"],
                 _num_sms(named_args["y_ptr"].device))


def prune_tiled(configs, named_args, **kwargs):
    """:func:`prune` as ``triton.autotune``'s ``early_config_prune`` for the tiled kernel."""
    group = named_args["GROUP_SIZE"] if "GROUP_SIZE" in named_args else kwargs.get("GROUP_SIZE", -1)
    return prune("tiled", configs, named_args["M"], named_args["N"], named_args["KP"],
                 _num_sms(named_args["y_ptr"].device), group)


def _as_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


@functools.lru_cache(maxsize=1024)
def _admitted(schedule: str, m_class: int, n: int, kp: int, sms: int, group: int) -> frozenset:
    return frozenset(_as_key(config_dict(c)) for c in prune(schedule, candidates(schedule), m_class, n, kp, sms, group))


def admissible(schedule: str, config: dict, m: int, n: int, kp: int, sms: int, group: int = -1) -> bool:
    """Whether ``config`` (``config_dict``'s form) is one of the candidates :func:`prune` keeps."""
    return _as_key(config) in _admitted(schedule, m_bucket(m), n, kp, sms, group)


class TuningCache:
    """Best configurations per device, Triton version and shape class, in one JSON file.

    ``$BITCLIFF_CACHE`` (default ``~/.cache/bitcliff``) ``/autotune-<device>-triton<version>.json``.
    A configuration is written after the first tuning of its shape class and read at every
    later start; delete the file to tune again.

    An entry is either a measured winner (a configuration: ``config_dict``'s form) or a seed, the
    static model's ordering of a few admissible candidates (``{"order": [configuration, ...],
    "predicted_us": [[overlapped, serialized], ...]}``, written by ``bench/sass_model.py
    --seed-cache``): a prediction, which the launcher measures (:func:`cached_choices`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, dict]] = {}

    @staticmethod
    def path(device: torch.device) -> Path:
        root = cache_root()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        slug = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
        return root / f"autotune-{slug}-triton{triton.__version__}.json"

    def _load(self, device: torch.device) -> dict[str, dict]:
        path = self.path(device)
        if str(path) not in self._entries:
            try:
                self._entries[str(path)] = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries[str(path)] = {}
        return self._entries[str(path)]

    def get(self, device: torch.device, key: str) -> dict | None:
        with self._lock:
            return self._load(device).get(key)

    def put(self, device: torch.device, key: str, config: dict) -> None:
        with self._lock:
            entries = self._load(device)
            entries[key] = config
            path = self.path(device)
            try:
                write_json(path, entries, indent=1, sort_keys=True)
            except OSError:
                pass  # a read-only home only costs tuning again next run


TUNING_CACHE = TuningCache()


def cached_choices(device: torch.device, key: str, schedule: str, m: int, n: int, kp: int,
                   group: int = -1) -> list[dict]:
    """What the tuning cache offers for ``key`` that :func:`prune` admits for this shape: a
    measured winner (one configuration), a seed's ordered candidates (to be measured: a seed is a
    prediction), or nothing (tune over every admissible candidate).  A configuration the pruning
    rejects is never returned, whoever wrote it."""
    entry = TUNING_CACHE.get(device, key)
    if not entry:
        return []
    offered = entry["order"] if "order" in entry else [entry]
    sms = _num_sms(device)
    return [dict(c) for c in offered if admissible(schedule, c, m, n, kp, sms, group)]


def choose_by_measurement(device: torch.device, key: str, candidates: dict, timer=None) -> str:
    """The name of the fastest of ``candidates`` (name -> zero-argument callable) for ``key``.

    Timed once (``timer(fn) -> ms``, default ``triton.testing.do_bench``'s median) and remembered in
    :data:`TUNING_CACHE` with every candidate's time, so the choice can be read and explained.
    """
    entry = TUNING_CACHE.get(device, key)
    if entry is not None and entry.get("schedule") in candidates:
        return entry["schedule"]
    if timer is None:
        import triton.testing  # noqa: PLC0415

        timer = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    for fn in candidates.values():  # compile and tune each before timing any
        fn()
    times = {name: float(timer(fn)) for name, fn in candidates.items()}
    best = min(times, key=times.get)
    TUNING_CACHE.put(device, key, {"schedule": best, "ms": times})
    return best


def config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def m_bucket(m: int) -> int:
    return m if m <= GEMV_MAX_M else min(triton.next_power_of_2(m), 4096)
