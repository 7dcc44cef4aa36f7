"""Which inputs break: per-example damage, how much different quantizations agree on it, and
whether the full-precision model's residual-stream magnitudes predict it (Chang et al. 2025).

* ``delta_nll[m][e]``: mean next-token NLL of example ``e`` under quantized model ``m`` minus
  under the FP model (nats);
* ``correlation``: Pearson and Spearman correlation of ``delta_nll`` between every pair of
  quantized models, over the examples;
* ``magnitude[e][l]``: the FP residual stream's mean L2 norm over example ``e``'s tokens
  (position 0 skipped, see ``fp_record.FIRST_TOKEN``) entering layer ``l`` (``l = L``: the
  last layer's output, before the final norm);
* ``predictor[m]``: per layer, Spearman(magnitude, delta_nll) and the AUROC of the magnitude for
  telling the top ``top_fraction`` examples by ``delta_nll`` from the rest.  ``final_*`` are
  at the last layer's output, fixed in advance; ``best_layer`` is the layer with the highest AUROC,
  chosen on the same examples (an optimistic figure: report it beside ``final_auroc``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnose import metrics
from bitcliff.diagnose.fp_record import FIRST_TOKEN, model_logits, token_nll
from bitcliff.diagnose.hooks import Hooks
from bitcliff.diagnose.model_parts import decoder_layers


@dataclass
class InputSensitivity:
    nll_fp: list[float]
    delta_nll: dict[str, list[float]]
    magnitude: list[list[float]]
    correlation: dict[str, dict[str, dict[str, float]]]
    predictor: dict[str, dict]
    top_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def fp_magnitudes(fp_model: nn.Module, ids: torch.Tensor) -> tuple[list[float], float]:
    """``(magnitude per layer boundary [L + 1], mean NLL)`` of one example (int64 ``[T]``)."""
    layers = decoder_layers(fp_model)
    norms: list[float] = []

    def record(hidden: torch.Tensor) -> None:
        norms.append(float(hidden[0, FIRST_TOKEN:].double().norm(dim=-1).mean()))

    with Hooks() as hooks:
        hooks.input(layers[0], lambda h: record(h))
        for layer in layers:
            hooks.output(layer, lambda h: record(h))
        logits = model_logits(fp_model, ids)
    return norms, float(token_nll(logits.cpu(), ids.cpu()).mean())


@torch.inference_mode()
def input_sensitivity(
    fp_model: nn.Module,
    q_models: dict[str, nn.Module],
    examples: list[torch.Tensor],
    top_fraction: float = 0.1,
    progress: bool = True,
) -> InputSensitivity:
    """The measures of the module docstring over ``examples`` (int64 ``[T]`` each) for every
    quantized model in ``q_models`` (name → model)."""
    if not q_models:
        raise ValueError("input sensitivity needs at least one quantized model")
    if len(examples) < 3:
        raise ValueError(f"input sensitivity needs at least 3 examples to correlate, got {len(examples)}")
    nll_fp, magnitude = [], []
    delta = {name: [] for name in q_models}
    for ids in tqdm(examples, desc="inputs", unit="example", disable=not progress):
        norms, base = fp_magnitudes(fp_model, ids)
        nll_fp.append(base)
        magnitude.append(norms)
        for name, model in q_models.items():
            delta[name].append(float(token_nll(model_logits(model, ids).cpu(), ids.cpu()).mean()) - base)

    names = list(q_models)
    correlation = {
        kind: {a: {b: fn(delta[a], delta[b]) for b in names} for a in names}
        for kind, fn in (("pearson", metrics.pearson), ("spearman", metrics.spearman))
    }
    predictor = {}
    for name in names:
        top = metrics.top_fraction(delta[name], top_fraction)
        per_layer_spearman, per_layer_auroc = [], []
        for layer in range(len(magnitude[0])):
            column = [row[layer] for row in magnitude]
            per_layer_spearman.append(metrics.spearman(column, delta[name]))
            per_layer_auroc.append(metrics.auroc(column, top))
        best = max(range(len(per_layer_auroc)), key=lambda i: per_layer_auroc[i])
        predictor[name] = {
            "spearman": per_layer_spearman,
            "auroc": per_layer_auroc,
            "final_spearman": per_layer_spearman[-1],
            "final_auroc": per_layer_auroc[-1],
            "best_layer": best,
            "best_auroc": per_layer_auroc[best],
            "positives": int(sum(top)),
        }
    return InputSensitivity(nll_fp, delta, magnitude, correlation, predictor, top_fraction)
