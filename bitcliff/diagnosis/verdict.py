"""The verdict: healthy, signal degradation, computation collapse, or mixed — from four
indicators with fixed thresholds, and the repair the evidence points to.

Zhou et al. (2026) describe *computation collapse* as key components that stop functioning and
destroy the signal in the early layers, so that compensation cannot help; *signal degradation*
as intact computation whose precision erodes as error accumulates.  Each indicator below tests
one part of that description; it *fires* (votes for collapse) when its value crosses the
threshold:

===================  =========================================================  ==========
indicator            value                                                      fires when
===================  =========================================================  ==========
early_cosine         mean residual cosine FP vs Q over the first third of layers  < 0.90
early_function       median local F(c) of attn and MLP in the first third          < 0.25
early_attention      mean attention-pattern JS divergence (bits), first third      > 0.10
final_agreement      top-1 agreement of the final output with FP                   < 0.30
===================  =========================================================  ==========

Verdict: *healthy* when the perplexity ratio Q/FP is at most 1.05 and no indicator fires;
otherwise *collapse* when at least 3 of the 4 fire, *degradation* when at most 1 fires, *mixed*
when 2 do.  ``agreement`` is the share of indicators that agree with the verdict (for *mixed*: the
share that vote for collapse); the headline states it as a count ("3 of 4 indicators agree").
It is a vote count, not a probability.  The thresholds were set once, at round values between the RTN g64 W4
and W2 runs of the default model (SmolLM2-135M), and are not tuned per model; the report states
them beside every value.

Activation patching is reported but does not vote: on the default model the sum of
single-component recoveries did not separate W4 from W2 (3.75 vs 2.28 over 2 x 256 tokens) and
swung between -2.2 and 2.3 for W2 across sample sizes, so it is not a reliable indicator there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bitcliff.diagnosis.components import ComponentAssessment
from bitcliff.diagnosis.model_parts import COMPONENTS
from bitcliff.diagnosis.patching import PatchingResult
from bitcliff.diagnosis.signal import SignalTrace

VERDICTS = ("healthy", "degradation", "collapse", "mixed")


@dataclass(frozen=True)
class Thresholds:
    early_cosine: float = 0.90
    early_function: float = 0.25
    early_attention: float = 0.10
    final_agreement: float = 0.30
    healthy_ppl_ratio: float = 1.05
    collapse_votes: int = 3
    degradation_votes: int = 1


@dataclass
class Indicator:
    name: str
    value: float
    threshold: float
    fires: bool
    text: str
    strength: float = 0.0  # distance from the threshold, relative to it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    label: str
    agreement: float
    ppl_ratio: float
    indicators: list[Indicator]
    evidence: list[str]
    recommendation: str
    repair_targets: list[str] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["indicators"] = [i.to_dict() for i in self.indicators]
        return out

    def headline(self) -> str:
        names = {"healthy": "healthy", "degradation": "signal degradation", "collapse": "computation collapse",
                 "mixed": "mixed (degradation and collapse indicators disagree)"}
        n = len(self.indicators)
        count = round(self.agreement * n)
        if self.label == "mixed":
            return f"verdict: {names[self.label]} ({count} of {n} indicators vote collapse)"
        return f"verdict: {names[self.label]} ({count} of {n} indicators agree)"


def _early(values: list[float]) -> list[float]:
    return values[: max(1, len(values) // 3)]


def _indicator(name: str, value: float, threshold: float, below: bool, text: str) -> Indicator:
    fires = value < threshold if below else value > threshold
    # Relative distance from the threshold: how decisively the value sits on its side.
    scale = max(abs(threshold), 1e-9)
    strength = abs(value - threshold) / scale
    return Indicator(name, value, threshold, fires, text, strength)


def indicators(signal: SignalTrace, components: ComponentAssessment, t: Thresholds) -> list[Indicator]:
    """The four indicators of the module docstring."""
    n = len(signal.cosine)
    third = max(1, n // 3)
    early_cos = sum(_early(signal.cosine)) / third
    local = sorted(f for c in COMPONENTS for f in _early(components.function["local"][c]) if not math.isnan(f))
    early_f = local[len(local) // 2] if local else math.nan
    early_js = sum(_early(components.mean_attention_js("prop"))) / third
    final_top1 = signal.lens_top1[-1]
    out = [
        _indicator("early_cosine", early_cos, t.early_cosine, True,
                   f"residual cosine FP vs Q over layers 0-{third - 1}: {early_cos:.3f}"),
        _indicator("early_function", early_f, t.early_function, True,
                   f"median local F(c) of attention/MLP in layers 0-{third - 1}: {early_f:.2f}"),
        _indicator("early_attention", early_js, t.early_attention, False,
                   f"attention-pattern JS divergence in layers 0-{third - 1}: {early_js:.3f} bits"),
        _indicator("final_agreement", final_top1, t.final_agreement, True,
                   f"top-1 agreement of the final output with FP: {final_top1:.2f}"),
    ]
    return out


def _worst_components(components: ComponentAssessment, k: int) -> list[tuple[float, str]]:
    scored = [
        (f, f"layer {i} {c}")
        for c in COMPONENTS
        for i, f in enumerate(components.function["local"][c])
        if not math.isnan(f)
    ]
    return sorted(scored)[:k]


def decide(signal: SignalTrace, components: ComponentAssessment, patching: PatchingResult | None,
           ppl_ratio: float, thresholds: Thresholds = Thresholds(), n_targets: int = 5) -> Verdict:
    """The verdict, its agreement, the evidence (strongest first) and the recommended repair.

    ``patching`` (optional) adds a descriptive line to the evidence: where along the depth the
    damage is done (the residual patch recovering half of it).
    """
    inds = indicators(signal, components, thresholds)
    votes = sum(i.fires for i in inds)
    n = len(inds)
    if votes == 0 and ppl_ratio <= thresholds.healthy_ppl_ratio:
        label = "healthy"
    elif votes >= thresholds.collapse_votes:
        label = "collapse"
    elif votes <= thresholds.degradation_votes:
        label = "degradation"
    else:
        label = "mixed"
    if label == "collapse":
        agree = [i for i in inds if i.fires]
    elif label == "mixed":
        agree = list(inds)
    else:
        agree = [i for i in inds if not i.fires]
    agreement = len(agree) / n if label != "mixed" else votes / n
    evidence = [f"{i.text} ({'<' if i.value < i.threshold else '>'} {i.threshold:g})"
                for i in sorted(agree, key=lambda i: -i.strength)]
    if patching is not None and patching.recovery.get("residual") and None not in patching.recovery["residual"]:
        curve = patching.recovery["residual"]
        half = next((i for i, r in enumerate(curve) if r >= 0.5), len(curve) - 1)
        evidence.append(f"restoring the FP residual stream after layer {half} of {len(curve)} recovers half of "
                        f"the damage ({patching.damage_nats:.3f} nats/token)")

    worst = _worst_components(components, n_targets)
    targets = [name for _, name in worst]
    if label == "healthy":
        recommendation = "no repair needed: the quantized model tracks the full-precision one."
        targets = []
    elif label == "degradation":
        by_error = sorted(range(len(signal.local_update_error)), key=lambda i: -signal.local_update_error[i])
        targets = [f"layer {i}" for i in by_error[:n_targets]]
        recommendation = (
            "compensation: the components still work and the error accumulates smoothly, so "
            "bias correction and low-rank error compensation should recover much of the loss; "
            f"start with the layers of largest local error: {', '.join(targets)}."
        )
    elif label == "collapse":
        recommendation = (
            "structural: components stop functioning and the signal is lost in the early layers, "
            "where the seed papers find that error compensation does not help; give more bits to "
            f"the least functional components first: {', '.join(targets)}."
        )
    else:
        recommendation = (
            "try both: compensation for the smooth part of the error, and more bits for the least "
            f"functional components: {', '.join(targets)}."
        )
    return Verdict(label, agreement, ppl_ratio, inds, evidence, recommendation, targets, thresholds)


def verdict_from_dict(data: dict, thresholds: Thresholds = Thresholds()) -> Verdict:
    """Re-apply the verdict rules to the measurements of a saved ``diagnosis.json``."""
    signal = SignalTrace(**data["signal"])
    components = ComponentAssessment(**data["components"])
    patching = PatchingResult(**data["patching"]) if data.get("patching") else None
    return decide(signal, components, patching, data["ppl_q"] / data["ppl_fp"], thresholds)
