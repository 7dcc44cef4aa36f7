"""Which inputs break: per-example damage, how much different quantizations agree on it, and
whether the full-precision model's residual-stream magnitudes predict it (Chang et al. 2025).

* ``delta_nll[m][e]``: mean next-token NLL of example ``e`` under quantized model ``m`` minus
  under the FP model (nats);
* ``correlation``: Pearson and Spearman correlation of ``delta_nll`` between every pair of
  quantized models, over the examples;
* ``magnitude[e][l]``: the FP residual stream's mean L2 norm over example ``e``'s tokens
  (position 0 skipped, see ``layers.FIRST_TOKEN``) entering layer ``l`` (``l = L``: the
  last layer's output, before the final norm);
* ``predictor[m]``: per layer, Spearman(magnitude, delta_nll) and the AUROC of the magnitude for
  telling the top ``top_fraction`` examples by ``delta_nll`` from the rest.  ``final_*`` are
  at the last layer's output, fixed in advance; ``best_layer`` is the layer with the highest AUROC,
  chosen on the same examples (an optimistic figure: report it beside ``final_auroc``).

Every statistic carries its sample size and an approximate 95 % interval
(``metrics.spearman_interval``, ``metrics.auroc_interval``).  AUROCs rest on the few "broken"
examples: with fewer than :data:`MIN_CLASS` examples in either class they are withheld (None,
with ``withheld`` saying why) rather than reported from one or two points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis import metrics
from bitcliff.diagnosis.fp_record import mean_token_norm
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.model_parts import decoder_layers
from bitcliff.eval import next_token_nll


@dataclass
class InputSensitivity:
    nll_fp: list[float]
    delta_nll: dict[str, list[float]]
    magnitude: list[list[float]]
    correlation: dict  # "pearson"/"spearman": {a: {b: r}}, "spearman_interval", "examples"
    predictor: dict[str, dict]
    top_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


#: AUROCs need at least this many broken (top-fraction) and intact examples; fewer: withheld.
MIN_CLASS = 5
#: Largest fp32 logits tensor one batched forward may produce (Gemma 3's vocabulary is 262k).
LOGITS_BUDGET_BYTES = 512 * 1024**2


class InputsAccumulator:
    """Per-example NLLs and FP magnitudes, added in any order by example index."""

    def __init__(self, names: list[str], n_examples: int, top_fraction: float = 0.1) -> None:
        if not names:
            raise ValueError("input sensitivity needs at least one quantized model")
        if n_examples < 3:
            raise ValueError(f"input sensitivity needs at least 3 examples to correlate, got {n_examples}")
        self.names = list(names)
        self.top_fraction = top_fraction
        self.nll_fp: list[float | None] = [None] * n_examples
        self.magnitude: list[list[float] | None] = [None] * n_examples
        self.nll_q: dict[str, list[float | None]] = {name: [None] * n_examples for name in names}

    def add(self, index: int, nll_fp: float, magnitude: list[float], nll_q: dict[str, float]) -> None:
        """Example ``index``: its FP mean NLL, FP magnitudes (``L + 1``), each model's mean NLL."""
        self.nll_fp[index], self.magnitude[index] = nll_fp, magnitude
        for name, value in nll_q.items():
            self.nll_q[name][index] = value

    def missing(self) -> list[int]:
        """Examples not fully added yet."""
        return [i for i, v in enumerate(self.nll_fp) if v is None or any(q[i] is None for q in self.nll_q.values())]

    def result(self) -> InputSensitivity:
        if self.missing():
            raise ValueError(f"examples {self.missing()[:5]} were never added")
        n = len(self.nll_fp)
        delta = {name: [q - f for q, f in zip(self.nll_q[name], self.nll_fp)] for name in self.names}
        correlation = {
            kind: {a: {b: fn(delta[a], delta[b]) for b in self.names} for a in self.names}
            for kind, fn in (("pearson", metrics.pearson), ("spearman", metrics.spearman))
        }
        correlation["examples"] = n
        correlation["spearman_interval"] = {
            a: {b: metrics.spearman_interval(correlation["spearman"][a][b], n) for b in self.names} for a in self.names
        }
        predictor = {}
        for name in self.names:
            top = metrics.top_fraction(delta[name], self.top_fraction)
            positives = int(sum(top))
            withheld = None
            if min(positives, n - positives) < MIN_CLASS:
                withheld = (f"{n} examples give {positives} broken (top {self.top_fraction:.0%}) and {n - positives} "
                            f"intact ones; an AUROC needs at least {MIN_CLASS} of each")
            per_layer_spearman, per_layer_auroc = [], []
            for layer in range(len(self.magnitude[0])):
                column = [row[layer] for row in self.magnitude]
                per_layer_spearman.append(metrics.spearman(column, delta[name]))
                per_layer_auroc.append(None if withheld else metrics.auroc(column, top))
            best = None if withheld else max(range(len(per_layer_auroc)), key=lambda i: per_layer_auroc[i])
            predictor[name] = {
                "examples": n,
                "spearman": per_layer_spearman,
                "auroc": per_layer_auroc,
                "final_spearman": per_layer_spearman[-1],
                "final_spearman_interval": metrics.spearman_interval(per_layer_spearman[-1], n),
                "final_auroc": per_layer_auroc[-1],
                "final_auroc_interval": None if withheld else metrics.auroc_interval(
                    per_layer_auroc[-1], positives, n - positives),
                "best_layer": best,
                "best_auroc": None if withheld else per_layer_auroc[best],
                "positives": positives,
                "withheld": withheld,
            }
        return InputSensitivity(list(self.nll_fp), delta, list(self.magnitude), correlation, predictor,
                                self.top_fraction)


def equal_length_batches(examples: list[torch.Tensor], indices: list[int], size: int) -> list[list[int]]:
    """``indices`` cut into runs of at most ``size`` consecutive examples of one length."""
    batches: list[list[int]] = []
    for i in indices:
        if batches and len(batches[-1]) < size and len(examples[batches[-1][0]]) == len(examples[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def fp_batch_stats(fp_model: nn.Module, ids: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """For int64 ``[B, T]`` windows: per row, the FP magnitudes at the ``L + 1`` layer
    boundaries and the mean next-token NLL."""
    layers = decoder_layers(fp_model)
    norms: list[torch.Tensor] = []
    with Hooks() as hooks:
        hooks.input(layers[0], lambda h: norms.append(mean_token_norm(h)))
        for layer in layers:
            hooks.output(layer, lambda h: norms.append(mean_token_norm(h)))
        nll = batch_mean_nll(fp_model, ids)
    per_row = torch.stack(norms, dim=1).tolist()  # [B, L + 1]
    return per_row, nll


@torch.inference_mode()
def batch_mean_nll(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Per row of int64 ``[B, T]`` windows, the mean next-token NLL under ``model``."""
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    return [float(next_token_nll(row, window).double().mean()) for row, window in zip(logits, ids)]


def add_example_stats(
    accumulator: InputsAccumulator,
    fp_model: nn.Module,
    q_models: dict[str, nn.Module],
    examples: list[torch.Tensor],
    indices: list[int],
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Add ``examples[i]`` for ``i`` in ``indices`` to ``accumulator``, running the FP model and
    every quantized model on batches of equal-length examples (fewer than ``batch_size`` when
    one batch's fp32 logits would pass :data:`LOGITS_BUDGET_BYTES`)."""
    if not indices:
        return
    vocab = getattr(fp_model.config, "vocab_size", None) or 1
    per_example = 4 * vocab * max(len(examples[i]) for i in indices)
    batches = equal_length_batches(examples, indices, max(1, min(batch_size, LOGITS_BUDGET_BYTES // per_example)))
    for batch in tqdm(batches, desc="inputs", unit="batch", disable=not progress):
        ids = torch.stack([examples[i] for i in batch])
        magnitudes, nll_fp = fp_batch_stats(fp_model, ids)
        nll_q = {name: batch_mean_nll(model, ids) for name, model in q_models.items()}
        for row, index in enumerate(batch):
            accumulator.add(index, nll_fp[row], magnitudes[row], {name: v[row] for name, v in nll_q.items()})


def input_sensitivity(
    fp_model: nn.Module,
    q_models: dict[str, nn.Module],
    examples: list[torch.Tensor],
    top_fraction: float = 0.1,
    progress: bool = True,
    batch_size: int = 8,
) -> InputSensitivity:
    """The measures of the module docstring over ``examples`` (int64 ``[T]`` each) for every
    quantized model in ``q_models`` (name → model)."""
    accumulator = InputsAccumulator(list(q_models), len(examples), top_fraction)
    add_example_stats(accumulator, fp_model, q_models, examples, list(range(len(examples))), batch_size, progress)
    return accumulator.result()
