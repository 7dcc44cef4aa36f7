"""Component-wise functional assessment: does each attention block, MLP and gate of the
quantized model still compute what its full-precision counterpart computes?

Per layer, each measured twice: in the quantized model run end to end (``prop``: what the
deployed model does) and with every block fed the full-precision input (``local``: what the
block's own weights do).

* ``function[c]``: ``F(c) = 1 - ||o_Q - o_FP|| / ||o_ablated - o_FP||`` for the component's output
  ``o`` (``attn``: the attention block's output, ``mlp``: the MLP's), norms over all tokens of all
  examples; ``o_ablated`` is mean ablation, the component's mean FP output over the example's
  tokens.  1 = works as in FP, 0 = no better than replacing it by its mean, < 0 = worse.
* ``attention_js``: per head, the Jensen–Shannon divergence (bits, 0..1) between the FP and Q
  attention probabilities, averaged over ``attention_rows`` query positions per example.
* ``gate_agreement``: the fraction of (token, neuron) pairs where the gate pre-activation has the
  same sign in both models (for SiLU/GELU gates: the same neurons open).

Every norm and mean skips position 0 (see ``layers.FIRST_TOKEN``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis.fp_record import FPRecord, eager_attention, record_fp
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.metrics import js_divergence
from bitcliff.diagnosis.model_parts import (
    COMPONENTS,
    component,
    decoder_layers,
    gate_projection,
)
from bitcliff.diagnosis.quantized_runs import RUNS, run_quantized
from bitcliff.layers import FIRST_TOKEN


@dataclass
class ComponentAssessment:
    """``function[run][c][l]``, ``attention_js[run][l][h]``, ``gate_agreement[run][l]`` (None
    where the model has no gated MLP), for ``run`` in ``("prop", "local")``."""

    function: dict[str, dict[str, list[float]]]
    attention_js: dict[str, list[list[float]]]
    gate_agreement: dict[str, list[float] | None]
    examples: int

    def to_dict(self) -> dict:
        return asdict(self)

    def mean_attention_js(self, run: str = "prop") -> list[float]:
        """Per layer, the mean over heads."""
        return [sum(heads) / len(heads) for heads in self.attention_js[run]]


class ComponentAssessor:
    """Accumulates the component measures over examples (sums per layer, bounded memory).

    An observer of both quantized runs (:mod:`bitcliff.diagnosis.quantized_runs`); the FP records
    must hold attention rows and gates (``record_fp(..., attention_rows=..., gates=True)``) and
    both models must run eager attention (:func:`~bitcliff.diagnosis.fp_record.eager_attention`).
    Per example: observe the ``"prop"`` and ``"local"`` runs, then :meth:`add_example`.
    """

    def __init__(self, n_layers: int, attention_rows: int = 32) -> None:
        self.n_layers = n_layers
        self.attention_rows = attention_rows
        self.err = {r: {c: [0.0] * n_layers for c in COMPONENTS} for r in RUNS}
        self.spread = {c: [0.0] * n_layers for c in COMPONENTS}  # ||o_ablated - o_FP||^2, run-independent
        self.js: dict[str, list[torch.Tensor | None]] = {r: [None] * n_layers for r in RUNS}
        self.rows = 0
        self.gate_same = {r: [0] * n_layers for r in RUNS}
        self.gate_total = 0
        self.has_gates = True
        self.examples = 0

    def observe(self, hooks: Hooks, layers: list[nn.Module], record: FPRecord, run: str) -> None:
        if record.attention is None:
            raise ValueError("the FP record has no attention probabilities; record it with attention_rows > 0")
        rows = record.query_rows

        def on_component(c: str, i: int, out: torch.Tensor) -> None:
            diff = out[0, FIRST_TOKEN:].double() - record.outputs[c][i][FIRST_TOKEN:].to(out.device).double()
            self.err[run][c][i] += float(diff.pow(2).sum())

        def on_attention(i: int, output) -> None:
            probs = output[1][0][:, rows.to(output[1].device)].float().cpu()  # [H, rows, T]
            js = js_divergence(probs, record.attention[i]).sum(dim=-1)  # [H]
            self.js[run][i] = js if self.js[run][i] is None else self.js[run][i] + js

        def on_gate(i: int, gate: torch.Tensor) -> None:
            same = (gate[0, FIRST_TOKEN:] > 0) == record.gate_active[i][FIRST_TOKEN:].to(gate.device)
            self.gate_same[run][i] += int(same.sum())

        gates = self.has_gates and record.gate_active is not None
        for i, layer in enumerate(layers):
            for c in COMPONENTS:
                hooks.output(component(layer, c), lambda o, c=c, i=i: on_component(c, i, o))
            hooks.raw_output(component(layer, "attn"), lambda out, i=i: on_attention(i, out))
            gate = gate_projection(layer)
            if gates and gate is not None:
                hooks.output(gate, lambda g, i=i: on_gate(i, g))

    def add_example(self, record: FPRecord) -> None:
        """Count one example whose two runs were observed."""
        self.has_gates = self.has_gates and record.gate_active is not None
        for c in COMPONENTS:
            for i, out in enumerate(record.outputs[c]):
                o = out[FIRST_TOKEN:].double()
                self.spread[c][i] += float((o - o.mean(dim=0)).pow(2).sum())
        self.rows += len(record.query_rows)
        if self.has_gates:
            self.gate_total += record.gate_active[0][FIRST_TOKEN:].numel()
        self.examples += 1

    def result(self) -> ComponentAssessment:
        if not self.examples:
            raise ValueError("no example assessed")

        def score(err: float, spread: float) -> float:
            return 1.0 - math.sqrt(err / spread) if spread > 0 else math.nan

        function = {
            run: {c: [score(e, s) for e, s in zip(self.err[run][c], self.spread[c])] for c in COMPONENTS}
            for run in RUNS
        }
        js = {run: [(t / self.rows).tolist() for t in self.js[run]] for run in RUNS}
        gates = {
            run: [s / self.gate_total for s in self.gate_same[run]] if self.has_gates and self.gate_total else None
            for run in RUNS
        }
        return ComponentAssessment(function, js, gates, self.examples)


def assess_components(
    fp_model: nn.Module, q_model: nn.Module, examples: list[torch.Tensor], attention_rows: int = 32,
    progress: bool = False,
) -> ComponentAssessment:
    """Component measures over ``examples`` (int64 ``[T]`` each), one at a time, with both
    models switched to eager attention for the duration."""
    assessor = ComponentAssessor(len(decoder_layers(q_model)), attention_rows)
    with eager_attention(fp_model, q_model):
        for ids in tqdm(examples, desc="components", unit="example", disable=not progress):
            record = record_fp(fp_model, ids, attention_rows=attention_rows, gates=True)
            for run in RUNS:
                run_quantized(q_model, record, run, [assessor])
            assessor.add_example(record)
    return assessor.result()
