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
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from bitcliff.data import check_fits_context
from bitcliff.eval import next_token_nll

Z_95 = 1.959964  # the two-sided 95 % quantile of the normal distribution


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
    kl = (fp.exp() * (fp - q)).sum(dim=-1).clamp_min(0.0)  # rounding can leave -1e-9 where P_q == P_fp
    same_top = fp.argmax(dim=-1) == q.argmax(dim=-1)
    return kl, same_top


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
    log_ppl_fp, log_ppl_q = nll_fp.double().mean(dim=1), nll_q.double().mean(dim=1)
    kl_mean, top_mean = float(tokens.mean()), float(same_top.double().mean())
    quantiles = torch.quantile(tokens, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64))
    ppl_fp, ppl_q = math.exp(float(log_ppl_fp.mean())), math.exp(float(log_ppl_q.mean()))
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
    if eval_ids.dim() != 2 or eval_ids.shape[0] == 0 or eval_ids.shape[1] < 2:
        raise ValueError(f"eval_ids must be [n_windows >= 1, T >= 2], got {tuple(eval_ids.shape)}")
    check_same_source(model, reference)
    for m, what in ((model, "evaluation windows"), (reference, "evaluation windows of the reference")):
        check_fits_context(m, eval_ids.shape[1], what)
    parts = {"kl": [], "same_top": [], "nll_fp": [], "nll_q": []}
    states = [(m, m.training) for m in (model, reference)]
    try:
        for m, _ in states:
            m.eval()
        for start in tqdm(range(0, eval_ids.shape[0], batch_size), desc="eval", disable=not progress, unit="batch"):
            ids = eval_ids[start:start + batch_size]
            fp_logits = reference(input_ids=ids.to(_device(reference))).logits.cpu()
            q_logits = model(input_ids=ids.to(_device(model))).logits.cpu()
            if not (torch.isfinite(fp_logits).all() and torch.isfinite(q_logits).all()):
                raise ValueError(f"non-finite logits in windows {start}..{start + len(ids) - 1}: a damaged "
                                 "checkpoint, or an overflow in half precision")
            kl, same_top = token_divergence(fp_logits, q_logits)
            parts["kl"].append(kl)
            parts["same_top"].append(same_top)
            parts["nll_fp"].append(next_token_nll(fp_logits, ids))
            parts["nll_q"].append(next_token_nll(q_logits, ids))
    finally:
        for m, was_training in states:
            m.train(was_training)
    return summarize(*(torch.cat(parts[key]) for key in ("kl", "same_top", "nll_fp", "nll_q")))


def _device(model) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device
