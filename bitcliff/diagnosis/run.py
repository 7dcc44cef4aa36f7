"""``diagnose()``: every analysis on one full-precision / quantized pair, and the verdict.

    report = bitcliff.diagnose(fp_model, q_model, texts, tokenizer=tokenizer)
    print(report.summary())
    report.save("runs/w2g64/diagnosis")     # diagnosis.json + report.html

Each of the first ``trace_examples`` examples is recorded once in full precision
(:func:`~bitcliff.diagnosis.fp_record.record_fp`: residual stream, block outputs, gates, attention
rows) and the quantized model runs on it twice, propagated and teacher-forced
(:mod:`~bitcliff.diagnosis.quantized_runs`); those three forwards feed the signal trace, the
component assessment and the which-inputs-break statistics, and on the first ``patch_examples``
also activation patching.  The remaining examples only need their NLLs and FP magnitudes and run
in batches.  The capture table runs the real ``QuantLinear`` layers on the first
``capture_examples``.  Memory: one example's activations of one model at a time, plus one batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.data import check_token_ids
from bitcliff.diagnosis.components import ComponentAssessment, ComponentAssessor
from bitcliff.diagnosis.fp_record import eager_attention, model_logits, record_fp
from bitcliff.diagnosis.inputs import (
    InputsAccumulator,
    InputSensitivity,
    add_example_stats,
)
from bitcliff.diagnosis.layer_errors import LayerErrors, capture_layer_errors
from bitcliff.diagnosis.model_parts import (
    check_compatible,
    context_length,
    decoder_layers,
    dequantized_twin,
)
from bitcliff.diagnosis.patching import PatchingAccumulator, PatchingResult
from bitcliff.diagnosis.quantized_runs import run_quantized
from bitcliff.diagnosis.signal import SignalTrace, SignalTracer
from bitcliff.diagnosis.verdict import Thresholds, Verdict, decide
from bitcliff.eval import next_token_nll
from bitcliff.layers import LayerCalls, find_decoder_layers
from bitcliff.models import fingerprints, quantized_modules
from bitcliff.quant.surgery import quant_config


@dataclass(frozen=True)
class DiagnoseOptions:
    """How much of the data each analysis uses (the cost knobs).

    Attributes:
        trace_examples: examples for the signal trace and the component assessment.
        patch_examples: of the traced examples, how many are also patched (``n_layers``
            batched partial forwards each); 0 skips patching.
        capture_examples: examples run under the kernels' error capture.
        lens_tokens: positions per example read through the logit lens.
        attention_rows: query rows per example whose attention patterns are compared.
        top_fraction: the examples counted as "broken" for the AUROC.
    """

    trace_examples: int = 8
    patch_examples: int = 2
    capture_examples: int = 4
    lens_tokens: int = 32
    attention_rows: int = 32
    top_fraction: float = 0.1

    def __post_init__(self) -> None:
        counts = {k: getattr(self, k) for k in ("trace_examples", "patch_examples", "capture_examples",
                                                 "lens_tokens", "attention_rows")}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        for key in ("trace_examples", "lens_tokens", "attention_rows"):
            if counts[key] == 0:
                raise ValueError(f"{key} must be at least 1")
        if self.patch_examples > self.trace_examples:
            raise ValueError(f"patch_examples ({self.patch_examples}) cannot exceed trace_examples "
                             f"({self.trace_examples}): patching reuses the traced examples' runs")
        if not 0.0 < self.top_fraction < 1.0:
            raise ValueError(f"top_fraction must lie in (0, 1), got {self.top_fraction!r}")

    @classmethod
    def fast(cls) -> "DiagnoseOptions":
        """A quick pass for tests and smoke runs: every analysis, on little data."""
        return cls(trace_examples=2, patch_examples=1, capture_examples=1, lens_tokens=8, attention_rows=8)


@dataclass
class DiagnosisReport:
    """Everything ``diagnose()`` measured; ``to_dict()`` is the JSON file's content."""

    verdict: Verdict
    ppl_fp: float
    ppl_q: float
    signal: SignalTrace
    components: ComponentAssessment
    patching: PatchingResult | None
    layer_errors: LayerErrors
    inputs: InputSensitivity
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict.to_dict(),
            "headline": self.verdict.headline(),
            "ppl_fp": self.ppl_fp,
            "ppl_q": self.ppl_q,
            "meta": self.meta,
            "signal": self.signal.to_dict(),
            "components": self.components.to_dict(),
            "patching": None if self.patching is None else self.patching.to_dict(),
            "layer_errors": self.layer_errors.to_dict(),
            "inputs": self.inputs.to_dict(),
        }

    def summary(self) -> str:
        """Plain-text summary; the first line is the verdict, its agreement and the three
        strongest pieces of evidence."""
        from bitcliff.diagnosis.report import summary_text

        return summary_text(self)

    def save(self, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write ``diagnosis.json`` and ``report.html`` into ``out_dir`` (atomically)."""
        from bitcliff.diagnosis.report import save_report

        return save_report(self, Path(out_dir), overwrite=overwrite)


def prepare_examples(texts, tokenizer=None, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Examples as a list of int64 ``[T]`` tensors.

    Args:
        texts: int64 ``[n, T]`` token windows, a list of int64 ``[T]`` tensors, or a list of
            strings (one example each; needs ``tokenizer``).
        tokenizer: a Hugging Face tokenizer for strings.
        max_tokens: the model's context length; longer examples are refused.
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.dtype != torch.int64:
            raise ValueError(f"token windows must be an int64 [n, T] tensor, got {texts.dtype} {tuple(texts.shape)}")
        examples = list(texts)
    else:
        texts = list(texts)
        if not texts:
            raise ValueError("no text to diagnose on: the list of examples is empty")
        for i, item in enumerate(texts):  # check every example before tokenizing any
            if isinstance(item, str):
                if not item.strip():
                    raise ValueError(f"example {i} is empty text")
                if tokenizer is None:
                    raise ValueError("text examples need a tokenizer (pass tokenizer=...)")
            elif not isinstance(item, torch.Tensor):
                raise TypeError(f"example {i} is a {type(item).__name__}; expected a string or a token tensor")
        examples = [
            item.long().flatten() if isinstance(item, torch.Tensor)
            else torch.tensor(tokenizer(item)["input_ids"], dtype=torch.long, device="cpu")
            for item in texts
        ]
    if not examples:
        raise ValueError("no text to diagnose on: no examples")
    for i, ids in enumerate(examples):
        if len(ids) < 2:
            raise ValueError(f"example {i} has {len(ids)} token(s); at least 2 are needed to predict a next token")
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(
                f"example {i} has {len(ids)} tokens, more than the model's context length {max_tokens}; "
                "split it into shorter windows"
            )
    return examples


def diagnose(
    fp_model: nn.Module,
    q_model: nn.Module,
    texts,
    *,
    tokenizer=None,
    compare: dict[str, nn.Module] | None = None,
    options: DiagnoseOptions = DiagnoseOptions(),
    thresholds: Thresholds = Thresholds(),
    name: str = "quantized",
    progress: bool = True,
) -> DiagnosisReport:
    """Diagnose ``q_model`` against ``fp_model``.

    Args:
        fp_model: the full-precision causal LM.
        q_model: the same model with ``QuantLinear`` layers (``bitcliff.quantize`` or
            ``bitcliff.load``).
        texts: the examples (see :func:`prepare_examples`); at least 3.
        tokenizer: needed when ``texts`` are strings.
        compare: other quantized versions of the model (name → model) whose per-example damage is
            correlated with ``q_model``'s in the which-inputs-break analysis.
        options: data per analysis (:class:`DiagnoseOptions`; ``DiagnoseOptions.fast()`` for a
            quick pass).
        thresholds: the verdict's thresholds (the defaults are the documented, calibrated ones).
        name: this quantized model's name in the report.
        progress: tqdm bars.
    """
    check_compatible(fp_model, q_model)
    for other_name, other in (compare or {}).items():
        check_compatible(fp_model, other)
        if other_name == name:
            raise ValueError(f"compare model name {other_name!r} is also the diagnosed model's name")
    examples = prepare_examples(texts, tokenizer, context_length(fp_model))
    check_token_ids(fp_model, examples, "the examples")
    if len(examples) < 3:
        raise ValueError(f"diagnosis needs at least 3 examples (for the per-example statistics), got {len(examples)}")
    fp_model.eval()
    q_model.eval()
    timings = {}

    def timed(stage: str, fn):
        """Run ``fn()``, adding its wall time to ``timings[stage]``."""
        start = time.perf_counter()
        out = fn()
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 2)
        return out

    sim = timed("dequantize", lambda: dequantized_twin(q_model, _dtype(fp_model)))
    others = {n: dequantized_twin(m, _dtype(fp_model)) for n, m in (compare or {}).items()}
    n_trace = min(options.trace_examples, len(examples))
    inputs_acc = InputsAccumulator([name, *others], len(examples), options.top_fraction)
    tracer = SignalTracer(fp_model, sim, options.lens_tokens)
    assessor = ComponentAssessor(len(decoder_layers(sim)), options.attention_rows)
    patcher = PatchingAccumulator(len(decoder_layers(sim))) if options.patch_examples > 0 else None

    def trace_example(e: int):
        """The FP record and both quantized runs of example ``e``, fed to every accumulator;
        returns what the quantized layers received when the example is also patched."""
        ids = examples[e]
        record = record_fp(fp_model, ids, attention_rows=options.attention_rows, gates=True)
        calls = LayerCalls(find_decoder_layers(sim)[1]) if patcher and e < options.patch_examples else None
        logits = run_quantized(sim, record, "prop", [tracer, assessor], calls)
        run_quantized(sim, record, "local", [tracer, assessor])
        tracer.add_example(record, logits)
        assessor.add_example(record)
        nll_q = {name: float(next_token_nll(logits.cpu(), ids).double().mean())}
        nll_q.update({n: float(next_token_nll(model_logits(m, ids).cpu(), ids).double().mean()) for n, m in others.items()})
        inputs_acc.add(e, record.mean_nll(), record.magnitudes(), nll_q)
        return record, calls, logits

    with eager_attention(fp_model, sim, *others.values()):  # attention probabilities for the component assessment
        for e in tqdm(range(n_trace), desc="trace", unit="example", disable=not progress):
            record, calls, logits = timed("trace", lambda: trace_example(e))
            if calls is not None:
                timed("patching", lambda: patcher.add(sim, record, calls, logits))
    timed("inputs", lambda: add_example_stats(
        inputs_acc, fp_model, {name: sim, **others}, examples, inputs_acc.missing(), progress=progress))
    layer_errors = timed("capture", lambda: capture_layer_errors(
        fp_model, q_model, examples[: options.capture_examples], progress=progress))
    signal, components = tracer.result(), assessor.result()
    patching = patcher.result() if patcher is not None else None
    layer_errors.cross_check(signal.local_update_error)
    inputs = inputs_acc.result()

    mean_fp = sum(inputs.nll_fp) / len(inputs.nll_fp)
    mean_q = mean_fp + sum(inputs.delta_nll[name]) / len(inputs.delta_nll[name])
    ppl_fp, ppl_q = math.exp(mean_fp), math.exp(mean_q)
    verdict = decide(signal, components, patching, ppl_q / ppl_fp, thresholds)
    meta = {
        "name": name,
        "model_type": getattr(fp_model.config, "model_type", None),
        "n_layers": len(signal.cosine),
        "examples": len(examples),
        "tokens_per_example": sorted({len(e) for e in examples}),
        "options": options.__dict__.copy(),
        "quantization": _describe_quantization(q_model),
        "modules": quantized_modules(q_model),
        "fingerprints": fingerprints(fp_model, q_model),
        "compare": sorted(compare or {}),
        "seconds": timings,
        "torch": torch.__version__,
    }
    return DiagnosisReport(verdict, ppl_fp, ppl_q, signal, components, patching, layer_errors, inputs, meta)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _describe_quantization(q_model: nn.Module) -> dict | None:
    config = quant_config(q_model)
    if config is not None:
        return {"describe": config.describe(), **{k: v for k, v in config.__dict__.items() if not k.startswith("_")}}
    qc = getattr(q_model.config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {"repr": repr(qc)})()


__all__ = ["DiagnoseOptions", "DiagnosisReport", "diagnose", "prepare_examples"]
