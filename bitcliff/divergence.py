"""How far a quantized model's next-token distributions are from its full-precision model's.

Perplexity alone hides how a quantized model differs from its source: two checkpoints with the
same perplexity can disagree on many next tokens.  This measures the difference directly, on the
same windows and the same predicted positions as the perplexity (``eval.next_token_nll``), with
llama.cpp's definitions (its ``llama-perplexity --kl-divergence``), so that the figures compare:

* **KL divergence** per token, ``KL(P_fp || P_q) = sum_v p_fp(v) (log p_fp(v) - log p_q(v))`` in
  nats, over the full vocabulary; reported as the mean over tokens with a 95 % interval over
  windows (tokens of one window are not independent, windows are), and the median, 99th and
  99.9th percentiles and maximum over tokens;
* **same top token**: the share of tokens whose most likely next token is the same under both;
* **Δppl** and the per-window difference of log-perplexity (mean NLL), quantized minus fp.

Where one full-precision model is compared with many quantized ones (the main job), its
predictions are computed once and kept compactly (:class:`ReferencePredictions`): the ``TOP_K``
most likely tokens' log-probabilities at each position, the rest of the vocabulary as one bucket.
KL over those ``TOP_K + 1`` outcomes is a lower bound of the full-vocabulary KL (merging outcomes
never increases a divergence); same top token is exact.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bitcliff.data import check_fits_context
from bitcliff.eval import next_token_nll, perplexity

Z_95 = 1.959964  # the two-sided 95 % quantile of the normal distribution
#: Tokens whose full-precision log-probabilities a :class:`ReferencePredictions` keeps per position.
TOP_K = 1024


def _kl(fp_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last dim of log-probabilities (float32 ``[..., V]`` to
    ``[...]``); an outcome of probability 0 under P adds nothing."""
    p = fp_log.exp()
    terms = torch.where(p > 0, p * (fp_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)  # rounding can leave -1e-9 where P_q == P_fp


def token_divergence(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_fp || P_q) and same-top agreement at every position that predicts a next token.

    Args:
        fp_logits, q_logits: ``[..., T, V]`` of the same shape (any float dtype; computed in fp32).
    Returns:
        ``(kl, same_top)``: float32 and bool ``[..., T - 1]``; entry ``t`` is about the prediction
        of token ``t + 1`` (the positions :func:`bitcliff.eval.next_token_nll` scores).
    """
    if fp_logits.shape != q_logits.shape:
        raise ValueError(f"logits of different shapes: {tuple(fp_logits.shape)} and {tuple(q_logits.shape)}")
    fp = torch.log_softmax(fp_logits[..., :-1, :].float(), dim=-1)
    q = torch.log_softmax(q_logits[..., :-1, :].float(), dim=-1)
    return _kl(fp, q), fp.argmax(dim=-1) == q.argmax(dim=-1)


@dataclass(frozen=True)
class ReferencePredictions:
    """A full-precision model's next-token predictions on ``W`` windows of ``T`` tokens, kept
    compactly (about ``8 * TOP_K + 8`` bytes per position where full logits take ``4 * V``).

    Attributes:
        top_logprobs: float32 ``[W, T - 1, k]``, the ``k`` largest log-probabilities at each
            predicted position, in descending order.
        top_ids: int32 ``[W, T - 1, k]``, their tokens.
        rest_logprob: float32 ``[W, T - 1]``, the log-probability of every other token together
            (``-inf`` where all are kept).
        nll: float32 ``[W, T - 1]``, the NLL of each next token (``eval.next_token_nll``).
        eval_ids: int64 ``[W, T]``, the windows they were computed on.
    """

    top_logprobs: torch.Tensor
    top_ids: torch.Tensor
    rest_logprob: torch.Tensor
    nll: torch.Tensor
    eval_ids: torch.Tensor


@torch.inference_mode()
def reference_predictions(reference, eval_ids: torch.Tensor, top_k: int = TOP_K, batch_size: int = 1,
                          progress: bool = True) -> ReferencePredictions:
    """:class:`ReferencePredictions` of the full-precision ``reference`` on ``eval_ids`` (int64
    ``[W, T]``), keeping the ``top_k`` most likely tokens per position (all, where the vocabulary
    is smaller)."""
    _check_windows(eval_ids)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    check_fits_context(reference, eval_ids.shape[1], "evaluation windows of the reference")
    parts = {"top_logprobs": [], "top_ids": [], "rest_logprob": [], "nll": []}
    with _evaluating(reference):
        for start in tqdm(range(0, eval_ids.shape[0], batch_size), desc="fp predictions", disable=not progress,
                          unit="batch"):
            ids = eval_ids[start:start + batch_size]
            logits = _logits(reference, ids, start)
            log_probs = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
            top = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            parts["top_logprobs"].append(top.values)
            parts["top_ids"].append(top.indices.to(torch.int32))
            parts["rest_logprob"].append(_rest_logprob(log_probs, top.indices))
            parts["nll"].append(next_token_nll(logits, ids))
    keys = ("top_logprobs", "top_ids", "rest_logprob", "nll")
    return ReferencePredictions(*(torch.cat(parts[key]) for key in keys), eval_ids.clone())


def _rest_logprob(log_probs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The log of the total probability of the tokens not in ``kept`` (float32 ``[..., V]`` and
    int64 ``[..., k]`` to ``[...]``), summed exactly rather than as ``1 - sum(kept)``, which rounding
    can leave a little above or below zero where (nearly) every token is kept."""
    return log_probs.scatter(-1, kept, float("-inf")).logsumexp(dim=-1)


def reference_perplexity(predictions: ReferencePredictions) -> dict:
    """The reference model's ``eval.perplexity`` report on its windows (its forward passes made
    the predictions, so no other is needed)."""
    return perplexity(predictions.nll.mean(dim=1).double())


def bucketed_divergence(top_logprobs: torch.Tensor, top_ids: torch.Tensor, rest_logprob: torch.Tensor,
                        q_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P_fp || P_q) over the reference's kept tokens plus the rest as one outcome, and
    same-top agreement (exact), at every position that predicts a next token.

    Args:
        top_logprobs: float32 ``[..., T - 1, k]``, top_ids: int ``[..., T - 1, k]`` and
            rest_logprob: float32 ``[..., T - 1]``, slices of a :class:`ReferencePredictions`
            (descending; ``top_ids[..., 0]`` is P_fp's top token).
        q_logits: ``[..., T, V]`` of the quantized model on the same windows.
    Returns:
        ``(kl, same_top)``: float32 and bool ``[..., T - 1]``; the KL is a lower bound of the
        full-vocabulary KL, equal to it where ``k == V``.
    """
    q = torch.log_softmax(q_logits[..., :-1, :].float(), dim=-1)
    if top_ids.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"reference predictions {tuple(top_ids.shape[:-1])} and logits {tuple(q.shape[:-1])} "
                         "cover different positions")
    kept = top_ids.long()
    fp_outcomes = torch.cat([top_logprobs, rest_logprob.unsqueeze(-1)], dim=-1)
    q_outcomes = torch.cat([q.gather(-1, kept), _rest_logprob(q, kept).unsqueeze(-1)], dim=-1)
    return _kl(fp_outcomes, q_outcomes), kept[..., 0] == q.argmax(dim=-1)


@dataclass(frozen=True)
class TokenDivergence:
    """A model's next-token predictions measured against a reference's, per predicted token.

    Attributes:
        kl: float32 ``[W, T - 1]``, KL(P_reference ‖ P_model) in nats (:func:`bucketed_divergence`).
        same_top: bool ``[W, T - 1]``, whether the two most likely tokens agree.
        nll: float32 ``[W, T - 1]``, the model's NLL of each next token (``eval.next_token_nll``).
    """

    kl: torch.Tensor
    same_top: torch.Tensor
    nll: torch.Tensor


@torch.inference_mode()
def token_divergence_from(model, predictions: ReferencePredictions, batch_size: int = 1,
                          progress: bool = True) -> TokenDivergence:
    """:class:`TokenDivergence` of ``model`` on the windows of ``predictions``, one forward per window.

    Raises:
        ValueError: windows longer than the model's context, or non-finite logits.
    """
    eval_ids = predictions.eval_ids
    check_fits_context(model, eval_ids.shape[1], "evaluation windows")
    parts = {"kl": [], "same_top": [], "nll": []}
    with _evaluating(model):
        for start in tqdm(range(0, eval_ids.shape[0], batch_size), desc="eval", disable=not progress, unit="batch"):
            ids = eval_ids[start:start + batch_size]
            logits = _logits(model, ids, start)
            stop = start + len(ids)
            kl, same_top = bucketed_divergence(predictions.top_logprobs[start:stop], predictions.top_ids[start:stop],
                                               predictions.rest_logprob[start:stop], logits)
            parts["kl"].append(kl)
            parts["same_top"].append(same_top)
            parts["nll"].append(next_token_nll(logits, ids))
    return TokenDivergence(*(torch.cat(parts[key]) for key in ("kl", "same_top", "nll")))


def evaluate_with_reference(model, predictions: ReferencePredictions, batch_size: int = 1,
                            progress: bool = True) -> dict:
    """Perplexity of ``model`` on the windows of ``predictions`` (one forward per window) and
    how far its predictions are from the reference's (:func:`bucketed_divergence`).

    Returns:
        :func:`summarize`'s report, with ``ppl``, ``mean_nll`` and ``nll_per_window`` as
        ``eval.evaluate_ppl`` computes them (the same figures to the last digit).
    Raises:
        ValueError: windows longer than the model's context, or non-finite logits or NLL.
    """
    measured = token_divergence_from(model, predictions, batch_size, progress)
    report = summarize(measured.kl, measured.same_top, predictions.nll, measured.nll)
    return {**report, **perplexity(measured.nll.mean(dim=1).double())}  # as eval.window_nll forms each window


def _interval(per_window: torch.Tensor, centre: float) -> list[float] | None:
    """``centre`` ± the 95 % normal interval of the mean of ``per_window`` (None for one window)."""
    if per_window.numel() < 2:
        return None
    half = Z_95 * float(per_window.std()) / math.sqrt(per_window.numel())
    return [centre - half, centre + half]


def summarize(kl: torch.Tensor, same_top: torch.Tensor, nll_fp: torch.Tensor, nll_q: torch.Tensor) -> dict:
    """The report of :func:`evaluate_against` from per-token measurements.

    Args:
        kl: float ``[W, T - 1]``; same_top: bool ``[W, T - 1]``; nll_fp, nll_q: float ``[W, T - 1]``,
        for ``W`` windows.
    Returns:
        a JSON-ready dict (see :func:`evaluate_against`).
    """
    tokens = kl.double().flatten()
    kl_windows = kl.double().mean(dim=1)
    top_windows = same_top.double().mean(dim=1)
    # each window's mean NLL as eval.window_nll forms it, so that ppl and ppl_fp are eval's figures
    log_ppl_fp, log_ppl_q = nll_fp.mean(dim=1).double(), nll_q.mean(dim=1).double()
    kl_mean, top_mean = float(tokens.mean()), float(same_top.double().mean())
    quantiles = torch.quantile(tokens, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64))
    ppl_fp, ppl_q = perplexity(log_ppl_fp)["ppl"], perplexity(log_ppl_q)["ppl"]
    top_interval = _interval(top_windows, top_mean)
    return {
        "kl_mean": kl_mean,
        "kl_mean_ci95": _interval(kl_windows, kl_mean),
        "kl_median": float(quantiles[0]),
        "kl_p99": float(quantiles[1]),
        "kl_p999": float(quantiles[2]),
        "kl_max": float(tokens.max()),
        "same_top_pct": 100 * top_mean,
        "same_top_pct_ci95": None if top_interval is None else [100 * v for v in top_interval],
        "ppl": ppl_q,
        "ppl_fp": ppl_fp,
        "delta_ppl": ppl_q - ppl_fp,
        "kl_per_window": kl_windows.tolist(),
        "same_top_pct_per_window": (100 * top_windows).tolist(),
        "log_ppl_diff_per_window": (log_ppl_q - log_ppl_fp).tolist(),
        "tokens": int(kl.numel()),
        "windows": int(kl.shape[0]),
    }


#: The figures the tables print beside perplexity (the rest stays in the full report).
HEADLINE = ("kl_mean", "kl_mean_ci95", "kl_p99", "same_top_pct")


def headline(report: dict) -> dict:
    """The :data:`HEADLINE` figures of a :func:`summarize` report."""
    return {key: report[key] for key in HEADLINE}


def kl_recovery(before: float, after: float) -> float:
    """The share of a quantized model's mean KL divergence from full precision that a repair
    removed (full precision's own is 0; 0 where there was none to remove)."""
    return (before - after) / before if before > 0 else 0.0


def check_same_source(model, reference, flag: str = "--against") -> None:
    """Refuse a reference that is not the model's source: bitcliff keeps the input embeddings in
    full precision, so a checkpoint and its source have the same embeddings (up to the fp16
    rounding of a checkpoint saved in fp16).  Raises ``ValueError`` naming ``flag``."""
    mine = model.get_input_embeddings().weight.detach().float().cpu()
    theirs = reference.get_input_embeddings().weight.detach().float().cpu()
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-6):
        raise ValueError(f"{flag}: the reference model is not the source of this checkpoint (its input "
                         f"embeddings differ: {tuple(theirs.shape)} against {tuple(mine.shape)}"
                         f"{'' if mine.shape != theirs.shape else ', values differ'})")


@torch.inference_mode()
def evaluate_against(model, reference, eval_ids: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` and how far its predictions are from ``reference``'s.

    Args:
        model: the quantized causal LM.
        reference: its full-precision source (checked: :func:`check_same_source`).
        eval_ids: int64 ``[n_windows, T]`` (the perplexity's windows).
        batch_size: windows per forward.
        progress: show a tqdm bar.
    Returns:
        ``kl_mean``, ``kl_mean_ci95`` (``[low, high]``, None for one window), ``kl_median``,
        ``kl_p99``, ``kl_p999``, ``kl_max`` (nats), ``same_top_pct`` and its ``_ci95``, ``ppl``,
        ``ppl_fp``, ``delta_ppl``, ``kl_per_window``, ``same_top_pct_per_window``,
        ``log_ppl_diff_per_window``, ``tokens``, ``windows``.
    Raises:
        ValueError: another model as the reference, windows longer than either model's context,
        or non-finite logits.
    """
    _check_windows(eval_ids)
    check_same_source(model, reference)
    for m, what in ((model, "evaluation windows"), (reference, "evaluation windows of the reference")):
        check_fits_context(m, eval_ids.shape[1], what)
    parts = {"kl": [], "same_top": [], "nll_fp": [], "nll_q": []}
    with _evaluating(model), _evaluating(reference):
        for start in tqdm(range(0, eval_ids.shape[0], batch_size), desc="eval", disable=not progress, unit="batch"):
            ids = eval_ids[start:start + batch_size]
            fp_logits, q_logits = _logits(reference, ids, start), _logits(model, ids, start)
            kl, same_top = token_divergence(fp_logits, q_logits)
            parts["kl"].append(kl)
            parts["same_top"].append(same_top)
            parts["nll_fp"].append(next_token_nll(fp_logits, ids))
            parts["nll_q"].append(next_token_nll(q_logits, ids))
    return summarize(*(torch.cat(parts[key]) for key in ("kl", "same_top", "nll_fp", "nll_q")))


def _check_windows(eval_ids: torch.Tensor) -> None:
    if eval_ids.dim() != 2 or eval_ids.shape[0] == 0 or eval_ids.shape[1] < 2:
        raise ValueError(f"eval_ids must be [n_windows >= 1, T >= 2], got {tuple(eval_ids.shape)}")


@contextmanager
def _evaluating(model):
    """``model`` in eval mode, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _logits(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """float ``[B, T, V]`` on the cpu for windows ``start..`` (``ids`` int64 ``[B, T]``); refuses
    non-finite logits."""
    logits = model(input_ids=ids.to(_device(model))).logits.cpu()
    if not torch.isfinite(logits).all():
        raise ValueError(f"non-finite logits in windows {start}..{start + len(ids) - 1}: a damaged "
                         "checkpoint, or an overflow in half precision")
    return logits


def _device(model) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device
