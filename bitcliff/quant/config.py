"""QuantConfig: the one description of how a model is quantized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from bitcliff.kernels.pack import SUPPORTED_BITS

METHODS = ("rtn", "gptq")
# Groups smaller than this store more scale/zero bits than a 2-bit code carries, and sizes off this
# grid waste the kernels' 32-code packing units.
GROUP_MULTIPLE = 16
# Settings whose default changed: a saved config without them was made with these values.
LEGACY_DEFAULTS = {"group_size": 128, "true_sequential": False, "refit_rounds": 0}
DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linear layers of a model.

    Attributes:
        bits: code width, 2, 3 or 4.
        group_size: input channels sharing one scale/zero: -1 for one group per output
            channel (per-channel), else a positive multiple of 16 (32, 64 and 128 are the sizes
            other GPTQ readers expect).  A size that does not divide a layer's K gives a partial
            last group.
        sym: symmetric grid (zero point fixed at 2**(bits-1)) instead of asymmetric.
        method: "rtn" (round to nearest) or "gptq".
        mse: search a per-group clipping ratio that minimizes the squared weight error
            instead of using the full min/max range.
        skip_modules: fnmatch patterns of module names left in full precision (the output
            head by default; embeddings are never converted since they are not linears).
        damp_percent, act_order, static_groups, true_sequential, calib_samples: GPTQ knobs.
        refit_rounds: GPTQ: 0 for plain GPTQ; r > 0 refits each row's scales to the chosen
            codes by least squares (:mod:`bitcliff.quant.refit`), then ``r − 1`` times solves
            the columns again on the refitted grid and refits once more.
        module_widths: mixed precision: ``(full module name, bits, group_size)`` for each module
            quantized unlike ``bits`` and ``group_size`` say (:mod:`bitcliff.quant.mixed`
            chooses them); :meth:`for_module` gives a module's own setting.  Checkpoints store
            them as GPTQModel's ``quantization_config["dynamic"]``.

    The GPTQ defaults are the best measured setting (true-sequential with one refit round;
    docs/results_gptq.md); :meth:`paper_gptq` gives the original algorithm.
    """

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    method: str = "rtn"
    mse: bool = False
    skip_modules: tuple[str, ...] = field(default=DEFAULT_SKIP)
    damp_percent: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    calib_samples: int = 64
    refit_rounds: int = 1
    module_widths: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or (self.group_size != -1 and (self.group_size <= 0 or self.group_size % GROUP_MULTIPLE))
        ):
            raise ValueError(
                f"group_size must be -1 (per-channel) or a positive multiple of {GROUP_MULTIPLE} "
                f"(32, 64 and 128 are what other GPTQ readers expect), got {self.group_size!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.skip_modules, tuple):
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if not (isinstance(self.damp_percent, (int, float)) and 0 < self.damp_percent < 1):
            raise ValueError(f"damp_percent must lie in (0, 1), got {self.damp_percent!r}")
        if isinstance(self.calib_samples, bool) or not (
            isinstance(self.calib_samples, int) and self.calib_samples > 0
        ):
            raise ValueError(f"calib_samples must be a positive integer, got {self.calib_samples!r}")
        if isinstance(self.refit_rounds, bool) or not (isinstance(self.refit_rounds, int) and self.refit_rounds >= 0):
            raise ValueError(f"refit_rounds must be a non-negative integer, got {self.refit_rounds!r}")
        widths = tuple(tuple(entry) for entry in self.module_widths)
        for entry in widths:
            if len(entry) != 3 or not isinstance(entry[0], str):
                raise ValueError(f"module_widths entries are (module name, bits, group_size), got {entry!r}")
            try:  # the same checks as this config's own bits and group size
                replace(self, bits=entry[1], group_size=entry[2], module_widths=())
            except ValueError as exc:
                raise ValueError(f"module_widths entry of {entry[0]}: {exc}") from None
        object.__setattr__(self, "module_widths", widths)

    @classmethod
    def paper_gptq(cls, **settings) -> "QuantConfig":
        """GPTQ as published: every group's Hessian from the full-precision layer, no scale refit."""
        return cls(method="gptq", **{"true_sequential": False, "refit_rounds": 0, **settings})

    @property
    def maxq(self) -> int:
        """Largest code value, ``2**bits - 1``."""
        return 2**self.bits - 1

    def for_module(self, name: str) -> "QuantConfig":
        """The setting module ``name`` (its full name) is quantized with: its entry of
        ``module_widths``, else this config's."""
        for module, bits, group_size in self.module_widths:
            if module == name:
                return replace(self, bits=bits, group_size=group_size, module_widths=())
        return replace(self, module_widths=()) if self.module_widths else self

    def effective_bits(self, in_features: int) -> float:
        """Bits per weight including one fp16 scale and one ``bits``-bit zero per group."""
        return bits_per_weight(self.bits, self.group_size, in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        """The config a dict describes; a field it lacks takes the value it had before that field
        existed (:data:`LEGACY_DEFAULTS`), since a writer that did not record it did not use it."""
        known = {**LEGACY_DEFAULTS, **{k: v for k, v in data.items() if k in cls.__dataclass_fields__}}
        if "skip_modules" in known:
            known["skip_modules"] = tuple(known["skip_modules"])
        return cls(**known)

    def describe(self) -> str:
        """Short tag such as ``rtn-w3g64-asym``."""
        group = "pc" if self.group_size == -1 else f"g{self.group_size}"
        mixed = f"-mixed{len(self.module_widths)}" if self.module_widths else ""
        return f"{self.method}-w{self.bits}{group}{mixed}-{'sym' if self.sym else 'asym'}"


def bits_per_weight(bits: int, group_size: int, in_features: int) -> float:
    """Stored bits per weight of a ``bits``-bit layer of ``in_features`` inputs: the code plus one
    fp16 scale and one ``bits``-wide zero point per group (the one formula; a group size of -1, or
    one above ``in_features``, is one group of the whole row)."""
    group = in_features if group_size == -1 else min(group_size, in_features)
    return bits + (16 + bits) / group
