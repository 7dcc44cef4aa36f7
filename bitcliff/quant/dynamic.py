"""Per-module quantization overrides in GPTQModel's ``dynamic`` convention.

``quantization_config["dynamic"]`` maps module-name regexes to overrides, read in order, the
first match winning, anchored at the start of the name: ``"+:<regex>": {"bits": b, "group_size":
g}`` quantizes matching modules differently, ``"-:<regex>": {}`` leaves them unquantized.
GPTQModel writes and reads it; vLLM and SGLang read it.  bitcliff writes one anchored entry per
module that differs from the checkpoint's main setting (a repaired model's restored modules, and
the linears ``skip_modules`` keeps in full precision).
"""

from __future__ import annotations

import re

from torch import nn

from bitcliff.quant.config import QuantConfig
from bitcliff.quant.qlinear import QuantLinear

FULL_PRECISION = 16


def module_overrides(model: nn.Module, config: QuantConfig) -> dict[str, tuple[int, int]]:
    """Name -> ``(bits, group_size)`` of every module stored unlike ``config`` says: a
    ``QuantLinear`` of other bits or group size, or a linear in full precision (bits 16), whether
    restored or left out by ``config.skip_modules``: a GPTQ reader takes every linear but the
    output head (``lm_head: false``) as quantized unless a ``-:`` rule says otherwise."""
    overrides = {name: (m.bits, m.group_size) for name, m in model.named_modules()
                 if isinstance(m, QuantLinear) and (m.bits, m.group_size) != (config.bits, config.group_size)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    overrides.update({name: (FULL_PRECISION, -1) for name, m in model.named_modules()
                      if type(m) is nn.Linear and m is not head})
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


def check_dynamic(dynamic) -> None:
    """Refuse a ``dynamic`` mapping :func:`dynamic_override` cannot read, naming the entry: a
    hand-edited config would otherwise fail deep in loading with a regex or type error.

    Raises:
        ValueError: ``dynamic`` is not a mapping, a key is not a valid regex (after its ``+:``
            or ``-:``), an override is not a mapping, or its ``bits`` / ``group_size`` is not an
            integer (whether the width is supported is checked per module, where it applies).
    """
    if dynamic is None:
        return
    if not isinstance(dynamic, dict):
        raise ValueError(f"quantization_config.dynamic must be a mapping of module-name regex to override, "
                         f"got {type(dynamic).__name__}")
    for pattern, override in dynamic.items():
        field = f"quantization_config.dynamic[{pattern!r}]"
        try:
            re.compile(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern)
        except re.error as error:
            raise ValueError(f"{field}: the key is not a valid regular expression ({error})") from error
        if not isinstance(override, dict):
            raise ValueError(f"{field} must be a mapping such as {{\"bits\": 4, \"group_size\": 128}} "
                             f"(or {{}} after '-:'), got {override!r}")
        for key in ("bits", "group_size"):
            value = override.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{field}.{key} must be an integer, got {value!r}")


def dynamic_override(dynamic: dict | None, name: str) -> dict | bool | None:
    """Module ``name``'s override: a dict, False when it is left unquantized, None when no entry
    matches.  ``dynamic`` is one :func:`check_dynamic` accepted."""
    for pattern, override in (dynamic or {}).items():
        negative = pattern.startswith("-:")
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(regex, name):
            return False if negative else dict(override)
    return None
