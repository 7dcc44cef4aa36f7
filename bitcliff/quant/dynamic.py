"""Per-module quantization overrides in GPTQModel's ``dynamic`` convention.

``quantization_config["dynamic"]`` maps module-name regexes to overrides, read in order, the
first match winning, anchored at the start of the name: ``"+:<regex>": {"bits": b, "group_size":
g}`` quantizes matching modules differently, ``"-:<regex>": {}`` leaves them unquantized.
GPTQModel writes and reads it; vLLM and SGLang read it.  bitcliff writes one anchored entry per
module that differs from the checkpoint's main setting (a repaired model's restored modules).
"""

from __future__ import annotations

import re

from torch import nn

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.surgery import quantizable_linears

FULL_PRECISION = 16


def module_overrides(model: nn.Module, config: QuantConfig) -> dict[str, tuple[int, int]]:
    """Name -> ``(bits, group_size)`` of every module stored unlike ``config`` says: a
    ``QuantLinear`` of other bits or group size, or a linear ``config`` would quantize that is in
    full precision (bits 16)."""
    overrides = {name: (m.bits, m.group_size) for name, m in model.named_modules()
                 if isinstance(m, QuantLinear) and (m.bits, m.group_size) != (config.bits, config.group_size)}
    overrides.update({name: (FULL_PRECISION, -1) for name, _ in quantizable_linears(model, config)})
    return overrides


def dynamic_entries(overrides: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """The ``dynamic`` mapping for ``module_overrides``."""
    entries = {}
    for name, (bits, group_size) in sorted(overrides.items()):
        pattern = "^" + re.escape(name) + "$"
        if bits >= FULL_PRECISION:
            entries["-:" + pattern] = {}
        else:
            entries["+:" + pattern] = {"bits": bits, "group_size": group_size}
    return entries


def dynamic_override(dynamic: dict | None, name: str) -> dict | bool | None:
    """Module ``name``'s override: a dict, False when it is left unquantized, None when no entry
    matches."""
    for pattern, override in (dynamic or {}).items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(regex, name):
            return False if negative else dict(override)
    return None
