"""bitcliff inside ``transformers``: quantize on load with ``from_pretrained``.

    from transformers import AutoModelForCausalLM
    from bitcliff import BitcliffConfig

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitcliffConfig(bits=3, group_size=64))
    model.save_pretrained("runs/w3g64")       # a GPTQ-format checkpoint (gptq_v2): bitcliff.load, GPTQModel

``BitcliffConfig`` and its quantizer are registered with transformers' public registration API
(``register_quantization_config`` / ``register_quantizer``, method name ``"bitcliff"``) when this
module is imported: when ``bitcliff.BitcliffConfig`` or ``bitcliff.hf_quantizer`` is first used
(``import bitcliff`` alone imports nothing heavy), and by :func:`bitcliff.load` and every command
that loads a model.  After the weights are loaded the quantizer
runs :func:`bitcliff.quantize` on the model: RTN, or GPTQ when the config carries calibration
text (``method="gptq"``, ``calibration_text=...``, windows cut by the model's own tokenizer as in
:func:`bitcliff.data.calibration_windows`).  The model's ``config.quantization_config`` then
describes the GPTQ checkpoint ``save_pretrained`` writes (zero points as stored in memory: v2),
so the saved folder is read by :func:`bitcliff.load` and by GPTQModel, not by this quantizer:
loading a folder that declares ``quant_method: bitcliff`` is refused with that advice.
"""

from __future__ import annotations

import dataclasses

from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitcliff.quant.config import QuantConfig

METHOD = "bitcliff"


class BitcliffConfig(QuantizationConfigMixin):
    """bitcliff's quantization settings for ``from_pretrained`` (see :class:`QuantConfig`).

    Args:
        bits, group_size, method, sym, mse, ...: any :class:`QuantConfig` field (validated here).
        calibration_text: for ``method="gptq"``, the text the calibration windows are cut from.
        seq_len: tokens per calibration window.
    """

    def __init__(self, bits: int = 4, group_size: int = 64, method: str = "rtn", calibration_text: str | None = None,
                 seq_len: int = 512, **settings) -> None:
        self.quant_method = METHOD
        settings.pop("quant_method", None)  # present when read back from a config.json
        self.bits, self.group_size, self.method = bits, group_size, method
        self.calibration_text, self.seq_len = calibration_text, seq_len
        self.settings = {k: v for k, v in settings.items() if k in QuantConfig.__dataclass_fields__}
        unknown = sorted(set(settings) - set(self.settings))
        if unknown:
            raise ValueError(f"BitcliffConfig got unknown settings {unknown}; it takes the fields of QuantConfig")
        config = self.quant_config()  # validates every field
        if config.method == "gptq" and not calibration_text:
            raise ValueError("BitcliffConfig(method='gptq') needs calibration_text (GPTQ calibrates on it)")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, method=self.method, **self.settings)

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, **dataclasses.asdict(self.quant_config()), "seq_len": self.seq_len}


class BitcliffQuantizer(HfQuantizer):
    """Quantizes the freshly loaded full-precision weights with :func:`bitcliff.quantize`."""

    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            raise ValueError(
                "this folder declares quant_method 'bitcliff', which transformers cannot load back: bitcliff "
                "checkpoints are GPTQ checkpoints; load them with bitcliff.load(path), or through transformers "
                "with GPTQModel installed when their config says quant_method 'gptq'"
            )

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def _process_model_after_weight_loading(self, model, **kwargs):
        import bitcliff
        from bitcliff.quant.checkpoint import quantization_config

        config = self.quantization_config.quant_config()
        if config.method == "gptq":
            from transformers import AutoTokenizer

            from bitcliff.data import calibration_windows

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            calib = calibration_windows(tokenizer, self.quantization_config.calibration_text, config.calib_samples,
                                        self.quantization_config.seq_len)
            bitcliff.quantize(model, config, calib_ids=calib)
        else:
            bitcliff.quantize(model, config)
        # What save_pretrained writes is a GPTQ checkpoint; QuantLinear holds v2 zero points.
        model.config.quantization_config = quantization_config(config, "gptq_v2")
        return model


def register() -> None:
    """Make ``quant_method="bitcliff"`` known to transformers (once; importing twice is harmless)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not BitcliffConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        register_quantization_config(METHOD)(BitcliffConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not BitcliffQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(BitcliffQuantizer)


register()
