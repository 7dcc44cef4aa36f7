"""Signal propagation tracing: how the quantized model's residual stream drifts from the
full-precision one, layer by layer.

Per layer ``l`` (its output residual stream ``h_l``), over all tokens of all examples:

* ``rel_error``: propagated error ``sqrt(sum ||h_l^Q - h_l^FP||^2 / sum ||h_l^FP||^2)`` with the
  quantized model run end to end;
* ``cosine``: mean over tokens of ``cos(h_l^Q, h_l^FP)``;
* ``growth``: ``rel_error[l] / rel_error[l - 1]`` (layer 0: None);
* ``local_error``: the same relative error when block ``l`` alone is quantized, fed the FP
  input ``h_{l-1}^FP`` (every block of the quantized model teacher-forced in one pass);
* ``local_update_error``: that local error relative to the block's own update
  ``||h_l^FP - h_{l-1}^FP||`` rather than to the whole stream;
* ``amplification``: ``rel_error / local_error``: how much of the error at ``l`` was inherited;
* logit lens (final norm + unembedding applied to ``h_l`` of both models, on ``lens_tokens``
  positions per example): ``lens_kl`` = mean KL(FP || Q) in nats, ``lens_top1`` = fraction of
  positions where both lenses agree on the top token, ``lens_rank`` = median rank of the FP
  lens's top token under the quantized lens.  At the last layer the lens is the model's output.

Norms and means skip position 0 (see ``layers.FIRST_TOKEN``); ``nll_fp``/``nll_q`` are
each example's mean next-token NLL (all positions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bitcliff.diagnosis import metrics
from bitcliff.diagnosis.fp_record import FPRecord, query_rows, record_fp
from bitcliff.diagnosis.hooks import Hooks
from bitcliff.diagnosis.model_parts import decoder_layers, logit_lens
from bitcliff.diagnosis.quantized_runs import run_quantized
from bitcliff.eval import next_token_nll
from bitcliff.layers import FIRST_TOKEN


@dataclass
class SignalTrace:
    """Per-layer lists (index = layer) of the measures in the module docstring."""

    rel_error: list[float]
    cosine: list[float]
    growth: list[float | None]
    local_error: list[float]
    local_update_error: list[float]
    amplification: list[float]
    lens_kl: list[float]
    lens_top1: list[float]
    lens_rank: list[float]
    tokens: int
    examples: int
    nll_fp: list[float] = field(default_factory=list)
    nll_q: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class SignalTracer:
    """Accumulates the signal measures over examples (bounded memory: sums per layer).

    An observer of both quantized runs (:mod:`bitcliff.diagnosis.quantized_runs`): per example,
    ``run_quantized(q, record, "prop", [tracer, ...])`` and ``run_quantized(q, record, "local",
    [tracer, ...])``, then :meth:`add_example` with the propagated run's logits.
    """

    def __init__(self, fp_model: nn.Module, q_model: nn.Module, lens_tokens: int = 32) -> None:
        self.fp_model, self.q_model = fp_model, q_model
        n_layers = len(decoder_layers(q_model))
        self.n_layers = n_layers
        self.lens_tokens = lens_tokens
        zeros = lambda: [0.0] * n_layers  # noqa: E731
        self.err, self.ref, self.cos = zeros(), zeros(), zeros()
        self.local_err, self.local_ref, self.update = zeros(), zeros(), zeros()
        self.kl, self.top1 = zeros(), zeros()
        self.ranks: list[list[int]] = [[] for _ in range(n_layers)]
        self.tokens = self.lens_positions = self.examples = 0
        self.nll_fp: list[float] = []
        self.nll_q: list[float] = []

    def observe(self, hooks: Hooks, layers: list[nn.Module], record: FPRecord, run: str) -> None:
        on_output = self._propagated if run == "prop" else self._local
        for i, layer in enumerate(layers):
            hooks.output(layer, lambda h, i=i: on_output(record, i, h))

    def _propagated(self, record: FPRecord, index: int, hidden: torch.Tensor) -> None:
        rows = query_rows(len(record.ids), self.lens_tokens)
        h_q, h_fp = hidden[0].float(), record.residual[index + 1].to(hidden.device)
        e, r = metrics.squared_error_and_norm(h_q[FIRST_TOKEN:], h_fp[FIRST_TOKEN:])
        self.err[index] += e
        self.ref[index] += r
        self.cos[index] += float(metrics.cosine(h_q[FIRST_TOKEN:], h_fp[FIRST_TOKEN:]).sum())
        lens_q = logit_lens(self.q_model, h_q[rows.to(h_q.device)])
        lens_fp = logit_lens(self.fp_model, h_fp[rows.to(h_fp.device)].to(_device(self.fp_model)))
        lens_fp = lens_fp.to(lens_q.device)
        top_fp = lens_fp.argmax(dim=-1)
        self.kl[index] += float(metrics.kl_divergence(lens_fp, lens_q).sum())
        self.top1[index] += float((lens_q.argmax(dim=-1) == top_fp).sum())
        self.ranks[index].extend(metrics.rank_of(lens_q, top_fp).tolist())

    def _local(self, record: FPRecord, index: int, hidden: torch.Tensor) -> None:
        h_q = hidden[0, FIRST_TOKEN:].float()
        h_fp = record.residual[index + 1][FIRST_TOKEN:].to(h_q.device)
        h_in = record.residual[index][FIRST_TOKEN:].to(h_q.device)
        e, r = metrics.squared_error_and_norm(h_q, h_fp)
        self.local_err[index] += e
        self.local_ref[index] += r
        self.update[index] += float((h_fp.double() - h_in.double()).pow(2).sum())

    def add_example(self, record: FPRecord, q_logits: torch.Tensor) -> None:
        """Count one example whose two runs were observed; ``q_logits``: the propagated run's."""
        self.tokens += len(record.ids) - FIRST_TOKEN
        self.lens_positions += len(query_rows(len(record.ids), self.lens_tokens))
        self.examples += 1
        self.nll_fp.append(record.mean_nll())
        self.nll_q.append(float(next_token_nll(q_logits.cpu(), record.ids).double().mean()))

    def result(self) -> SignalTrace:
        if not self.examples:
            raise ValueError("no example traced")
        rel = [math.sqrt(e / max(r, 1e-300)) for e, r in zip(self.err, self.ref)]
        local = [math.sqrt(e / max(r, 1e-300)) for e, r in zip(self.local_err, self.local_ref)]
        return SignalTrace(
            rel_error=rel,
            cosine=[c / self.tokens for c in self.cos],
            growth=[None] + [b / a if a > 0 else None for a, b in zip(rel, rel[1:])],
            local_error=local,
            local_update_error=[math.sqrt(e / max(u, 1e-300)) for e, u in zip(self.local_err, self.update)],
            amplification=[r / l if l > 0 else math.inf for r, l in zip(rel, local)],
            lens_kl=[k / self.lens_positions for k in self.kl],
            lens_top1=[t / self.lens_positions for t in self.top1],
            lens_rank=[float(torch.tensor(r, dtype=torch.float64, device="cpu").median()) for r in self.ranks],
            tokens=self.tokens,
            examples=self.examples,
            nll_fp=self.nll_fp,
            nll_q=self.nll_q,
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def trace_signal(
    fp_model: nn.Module, q_model: nn.Module, examples: list[torch.Tensor], lens_tokens: int = 32, progress: bool = False
) -> SignalTrace:
    """Signal propagation over ``examples`` (int64 ``[T]`` each), one at a time."""
    tracer = SignalTracer(fp_model, q_model, lens_tokens)
    for ids in tqdm(examples, desc="signal", unit="example", disable=not progress):
        record = record_fp(fp_model, ids)
        logits = run_quantized(q_model, record, "prop", [tracer])
        run_quantized(q_model, record, "local", [tracer])
        tracer.add_example(record, logits)
    return tracer.result()
