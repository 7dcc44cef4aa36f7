"""Which GPTQ checkpoints bitcliff's serving path takes, and which it leaves to the engine.

vLLM's own GPTQ path runs symmetric 4- and 8-bit weights without activation order; it reads no
``checkpoint_format`` and no zero points, and it loads every ``*.safetensors`` of a folder that
has no index.  bitcliff claims every other GPTQ checkpoint it can run: every checkpoint bitcliff
wrote except symmetric 4-bit ones without extras, and peer checkpoints at 2, 3 or 4 bits that are
asymmetric, ``gptq_v2``, act-ordered or have ``dynamic`` widths vLLM refuses.  A folder holding a
repair's side files is claimed whatever its width, so that they are never silently dropped: the
plugin's layers apply them (:mod:`bitcliff.serving.corrections`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bitcliff.kernels.pack import SUPPORTED_BITS, widths_text
from bitcliff.quant.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from bitcliff.quant.factors import FACTORS_FILE
from bitcliff.quant.outliers import OUTLIERS_FILE

#: Files a repair writes beside a checkpoint's weights; a served model without them is another model.
SIDE_FILES = (FACTORS_FILE, OUTLIERS_FILE, ADAPTER_WEIGHTS)
#: (bits, sym) vLLM's own GPTQ kernels run.
ENGINE_GPTQ = {(4, True), (8, True)}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint bitcliff's serving path recognises but cannot serve faithfully."""


@dataclass(frozen=True)
class Claim:
    """The decision for one checkpoint.

    Attributes:
        ours: True when bitcliff serves it, False when the engine's own path does.
        reason: one line saying why, for the log.
    """

    ours: bool
    reason: str


def written_by_bitcliff(qc: Mapping) -> bool:
    """True when ``quantization_config`` carries bitcliff's marker (``meta.bitcliff``)."""
    meta = qc.get("meta")
    return isinstance(meta, Mapping) and isinstance(meta.get("bitcliff"), Mapping)


def side_files(folder: str | Path | None) -> list[str]:
    """The repair side files present in a local checkpoint folder (none for a hub id or None)."""
    if folder is None or not Path(folder).is_dir():
        return []
    return [name for name in SIDE_FILES if (Path(folder) / name).is_file()]


def _engine_refuses_dynamic(qc: Mapping) -> bool:
    """True when a ``dynamic`` rule gives a module settings vLLM's GPTQ does not run."""
    for pattern, override in (qc.get("dynamic") or {}).items():
        if str(pattern).startswith("-:") or not isinstance(override, Mapping):
            continue
        bits = override.get("bits", qc.get("bits"))
        sym = override.get("sym", qc.get("sym", True))
        if (bits, bool(sym)) not in ENGINE_GPTQ or override.get("desc_act"):
            return True
    return False


def claim(qc: Mapping, folder: str | Path | None = None) -> Claim:
    """Whether bitcliff serves the checkpoint with quantization config ``qc`` (in ``folder``).

    Args:
        qc: the ``quantization_config`` of config.json.
        folder: the checkpoint folder, when local (to find repair side files).
    Raises:
        UnsupportedCheckpoint: a checkpoint bitcliff wrote whose width it does not run.
    """
    if str(qc.get("quant_method", "")).lower() != "gptq":
        return Claim(False, f"quant_method {qc.get('quant_method')!r} is not gptq")
    bits, sym = qc.get("bits"), bool(qc.get("sym", True))
    ours_marker = written_by_bitcliff(qc)
    if bits not in SUPPORTED_BITS:
        if ours_marker:
            raise UnsupportedCheckpoint(f"quantization_config bits={bits!r}; bitcliff serves {widths_text()}")
        return Claim(False, f"{bits}-bit GPTQ is not a width bitcliff runs")
    found = side_files(folder)
    if found:
        return Claim(True, f"repair side files {', '.join(found)} beside the weights")
    act_order = bool(qc.get("desc_act")) and qc.get("group_size", -1) != -1
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    reasons = [text for flag, text in (
        (not sym, "asymmetric"), (bits not in (4, 8), f"{bits}-bit"), (act_order, "act-order"),
        (v2, "gptq_v2 zero points"), (_engine_refuses_dynamic(qc), "dynamic widths vLLM's GPTQ refuses"),
    ) if flag]
    if reasons:
        who = "bitcliff checkpoint" if ours_marker else "GPTQ checkpoint"
        return Claim(True, f"{who}: {', '.join(reasons)}")
    return Claim(False, f"symmetric {bits}-bit GPTQ without act-order: vLLM's own kernels run it")
