"""The study's sweep: quantize each configuration, measure the damage in every stratum, one row
at a time.

A sweep folder holds ``sweep.json`` (the measurement settings: text, windows, strata; a folder
measured otherwise is refused, since its rows would not compare) and ``rows.jsonl``: one JSON
line per finished measurement, written as it finishes.  Every model first gets its ``fp`` row
(the reference of its damages, with the model's fingerprint: a folder holding another model
under the same name is refused).  An interrupted sweep run again skips every row already there
and repeats none.

Grid: RTN at every (bits, group size); GPTQ at every (bits, group size) with the largest
calibration size, and along the calibration axis at the group size nearest 64 (GPTQ runs
dominate the time on a CPU; ``full_gptq=True`` runs the whole product).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitcliff import rows as rows_file
from bitcliff.device import resolve_device
from bitcliff.storage import write_json
from bitcliff.study.strata import STRATA

SETTINGS_FILE = "sweep.json"
ROWS_FILE = "rows.jsonl"
CALIB_GROUP = 64  # the group size of the GPTQ calibration axis


@dataclass(frozen=True)
class Configuration:
    """One quantization of one model (``method`` "fp": the unquantized reference)."""

    model: str
    method: str
    bits: int | None = None
    group_size: int | None = None
    calib: int | None = None

    def key(self) -> tuple:
        return (self.model, self.method, self.bits, self.group_size, self.calib)


@dataclass(frozen=True)
class SweepSettings:
    """How every row of a sweep folder is measured."""

    text: str = "wiki"
    windows: int = 16
    seq_len: int = 512
    calib_seq_len: int = 512
    strata: tuple[str, ...] = STRATA

    def to_dict(self) -> dict:
        return {**asdict(self), "strata": list(self.strata)}


def grid(models, bits, group_sizes, calib, methods, full_gptq: bool = False) -> list[Configuration]:
    """The configurations of a sweep, fp references first (see the module docstring)."""
    for name, values in (("bits", bits), ("group sizes", group_sizes), ("methods", methods), ("models", models)):
        if not values:
            raise ValueError(f"the sweep needs at least one of {name}")
    unknown = [m for m in methods if m not in ("rtn", "gptq")]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: choose rtn or gptq")
    if "gptq" in methods and not calib:
        raise ValueError("GPTQ rows need calibration sizes (--calib)")
    if any(c <= 0 for c in calib or ()):
        raise ValueError(f"calibration sizes must be positive, got {list(calib)}")
    configs = []
    for model in models:
        configs.append(Configuration(model, "fp"))
        for method in methods:
            for b in bits:
                for g in group_sizes:
                    if method == "rtn":
                        configs.append(Configuration(model, "rtn", b, g))
                        continue
                    calib_axis = g == min(group_sizes, key=lambda x: abs(x - CALIB_GROUP) if x > 0 else math.inf)
                    for c in sorted(calib):
                        if full_gptq or calib_axis or c == max(calib):
                            configs.append(Configuration(model, "gptq", b, g, c))
    return configs


def read_rows(folder: str | Path) -> list[dict]:
    """The rows of a sweep folder (its ``rows.jsonl``; or such a file itself, e.g. a copy kept
    with the results), in the order they were written."""
    path = Path(folder) if Path(folder).is_file() else Path(folder) / ROWS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {ROWS_FILE}: not a study sweep folder (run `bitcliff study sweep`)")
    return rows_file.read_rows(path, check_row)


def _number(row: dict, field: str, positive: bool = True) -> float:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{field!r} must be above 0, got {value!r}")
    return value


def check_row(row: dict) -> None:
    """Refuse a row the fit cannot use (ValueError naming the field): what a sweep writes has
    ``model``, ``method``, finite per-stratum ``nll``; an fp row ``parameters``, ``hidden_size``
    and ``fingerprint``; a quantized row ``bits``, ``group_size``, ``effective_bits``, ``calib``."""
    if not isinstance(row.get("model"), str):
        raise ValueError(f"'model' must be a model name, got {row.get('model')!r}")
    if row.get("method") not in ("fp", "rtn", "gptq"):
        raise ValueError(f"'method' must be fp, rtn or gptq, got {row.get('method')!r}")
    nll = row.get("nll")
    if not isinstance(nll, dict) or not nll:
        raise ValueError(f"'nll' must map each stratum to a mean NLL, got {nll!r}")
    for stratum in nll:
        _number(nll, stratum, positive=False)
    if row["method"] == "fp":
        _number(row, "parameters")
        _number(row, "hidden_size")
        if not isinstance(row.get("fingerprint"), str):
            raise ValueError(f"'fingerprint' must be a string, got {row.get('fingerprint')!r}")
        return
    bits = row.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"'bits' must be a positive integer, got {bits!r}")
    group = row.get("group_size")
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or group > 0):
        raise ValueError(f"'group_size' must be a positive integer or -1, got {group!r}")
    _number(row, "effective_bits")
    calib = row.get("calib")
    if calib is not None and (isinstance(calib, bool) or not isinstance(calib, int) or calib < 1):
        raise ValueError(f"'calib' must be null or a positive integer, got {calib!r}")


def _append(folder: Path, row: dict) -> None:
    rows_file.append_row(folder / ROWS_FILE, row)


def _open_folder(folder: Path, settings: SweepSettings, device: torch.device) -> None:
    path = folder / SETTINGS_FILE
    wanted = settings.to_dict()
    if device.type != "cpu":  # half precision on a GPU: rows that do not compare with the CPU's fp32 ones
        wanted["device"] = device.type
    if path.is_file():
        held = json.loads(path.read_text())
        if held != wanted:
            diff = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise ValueError(f"{folder} holds a sweep measured with other settings ({', '.join(diff)}): "
                             "its rows would not compare; use another folder")
        return
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty and holds no {SETTINGS_FILE}: not a sweep folder; "
                              "nothing was written")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, wanted)


def quantized_parameters(model) -> int:
    """Weights in the decoder layers' linears: the model size of the law."""
    from bitcliff.layers import find_decoder_layers

    _, layers = find_decoder_layers(model)
    return sum(m.weight.numel() for m in layers.modules() if m.__class__.__name__ == "Linear")


def run_sweep(folder: str | Path, configs: list[Configuration], settings: SweepSettings = SweepSettings(),
              progress: bool = True, device: str | torch.device = "cpu") -> list[dict]:
    """Measure every configuration not yet in ``folder`` on ``device``; returns all rows of the folder."""
    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.data import calibration_windows
    from bitcliff.models import load_fp_model, model_fingerprint
    from bitcliff.quant.config import QuantConfig
    from bitcliff.study.strata import build_strata, measure_strata, reference_measures, reference_strata

    folder = Path(folder)
    device = resolve_device(device)
    _open_folder(folder, settings, device)
    done = {Configuration(r["model"], r["method"], r.get("bits"), r.get("group_size"), r.get("calib")).key(): r
            for r in read_rows(folder)} if (folder / ROWS_FILE).is_file() else {}
    todo = [c for c in configs if c.key() not in done]
    text = load_text(settings.text)
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="study sweep", unit="row",
               disable=not progress)
    by_model: dict[str, list[Configuration]] = {}
    for c in todo:
        by_model.setdefault(c.model, []).append(c)
    for model_name, model_configs in by_model.items():
        fp, tokenizer, _ = load_fp_model(model_name, device=device)
        fingerprint = model_fingerprint(fp, digits=16)
        reference = done.get(Configuration(model_name, "fp").key())
        if reference is not None and reference["fingerprint"] != fingerprint:
            raise ValueError(f"{folder} holds rows of another model named {model_name!r} (fingerprint "
                             f"{reference['fingerprint']}, this one {fingerprint}); use another folder")
        strata = build_strata(tokenizer, text, settings.windows, settings.seq_len, settings.strata)
        references = reference_strata(fp, strata)
        hidden = fp.config.hidden_size
        base = {"model": model_name, "fingerprint": fingerprint, "parameters": quantized_parameters(fp),
                "hidden_size": hidden, "tokens": {n: s.tokens for n, s in strata.items()}}
        for config in model_configs:
            bar.set_postfix_str(f"{model_name} {config.method} w{config.bits} g{config.group_size} c{config.calib}")
            start = time.perf_counter()
            if config.method == "fp":
                model = fp
                row = {**base, "method": "fp"}
            else:
                qc = QuantConfig(bits=config.bits, group_size=config.group_size, method=config.method,
                                 calib_samples=config.calib or 64)
                if config.method == "gptq":
                    calib = calibration_windows(tokenizer, text, config.calib, settings.calib_seq_len)
                    model = bitcliff.quantize(copy.deepcopy(fp), qc, progress=False, calib_ids=calib)
                else:
                    model = bitcliff.quantize(copy.deepcopy(fp), qc, progress=False)
                row = {**base, "method": config.method, "bits": config.bits, "group_size": config.group_size,
                       "calib": config.calib, "effective_bits": qc.effective_bits(hidden)}
            measured = (reference_measures(strata, references) if config.method == "fp"
                        else measure_strata(model, strata, references))
            nll = measured["nll"]
            row.update(nll=nll, kl=measured["kl"], same_top_pct=measured["same_top_pct"],
                       ppl=math.exp(nll["overall"]) if "overall" in nll else None,
                       seconds=round(time.perf_counter() - start, 1),
                       date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            _append(folder, row)
            done[config.key()] = row
            bar.update()
            del model
    bar.close()
    return read_rows(folder)


def damages(rows: list[dict]) -> list[dict]:
    """The quantized rows with ``damage``: per stratum, mean NLL minus the model's fp NLL.

    Raises:
        ValueError: a model with quantized rows but no fp row.
    """
    fp = {r["model"]: r for r in rows if r["method"] == "fp"}
    out = []
    for r in rows:
        if r["method"] == "fp":
            continue
        if r["model"] not in fp:
            raise ValueError(f"the sweep has rows of {r['model']!r} but not its fp reference row")
        ref = fp[r["model"]]["nll"]
        out.append({**r, "damage": {n: r["nll"][n] - ref[n] for n in r["nll"] if n in ref},
                    "nll_fp": ref})
    return out
