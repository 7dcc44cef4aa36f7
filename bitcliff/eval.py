"""Perplexity evaluation (docs/architecture.md, section 4): per-window mean NLL, ppl = exp(mean token NLL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bitcliff.data import check_fits_context


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The NLL of every token after the first under the logits before it (the one definition).

    Args:
        logits: ``[..., T, V]`` (any float dtype; computed in fp32).
        ids: int64 ``[..., T]``, the same leading dims.
    Returns:
        float32 ``[..., T - 1]``: entry ``t`` is the NLL of token ``t + 1``.
    """
    lead, vocab = ids.shape[:-1], logits.shape[-1]
    # [tokens, V] rows, the vocabulary contiguous: a log-softmax along a strided dimension (the
    # [B, V, T] form) took 6x as long on a 512 x 49152 window
    predicting = logits[..., :-1, :].reshape(-1, vocab).float()
    nll = F.cross_entropy(predicting, ids[..., 1:].reshape(-1), reduction="none")
    return nll.reshape(*lead, -1)


@torch.inference_mode()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """:func:`next_token_nll` of ``model`` on ``ids`` (int64 ``[B, T]``): float32 ``[B, T - 1]`` on the cpu."""
    device = next(model.parameters(), torch.empty(0)).device
    ids = ids.to(device)
    return next_token_nll(model(input_ids=ids).logits, ids).cpu()


def window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window: float64 ``[B]`` over the ``T - 1`` predicted tokens of
    each window of ``ids`` (int64 ``[B, T]``)."""
    return token_nll(model, ids).mean(dim=1).double()


def evaluate_ppl(model, eval_ids: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``eval_ids``.

    Args:
        model: a causal LM.
        eval_ids: int64 ``[n_windows, T]``.
        batch_size: windows per forward.
        progress: show a tqdm bar.
    Returns:
        ``{"ppl", "mean_nll", "nll_per_window" (list of n_windows floats), "tokens", "windows"}``.
    Raises:
        ValueError: windows longer than the model's context, or a window whose NLL is not finite.
        Every window predicts ``T - 1`` tokens, so the token-weighted and window-weighted
        means coincide.
    """
    if eval_ids.dim() != 2 or eval_ids.shape[0] == 0 or eval_ids.shape[1] < 2:
        raise ValueError(f"eval_ids must be [n_windows >= 1, T >= 2], got {tuple(eval_ids.shape)}")
    check_fits_context(model, eval_ids.shape[1], "evaluation windows")
    was_training = model.training
    model.eval()
    nll = []
    try:
        batches = range(0, eval_ids.shape[0], batch_size)
        for start in tqdm(batches, desc="eval", disable=not progress, unit="batch"):
            nll.append(window_nll(model, eval_ids[start : start + batch_size]))
    finally:
        model.train(was_training)
    return {**perplexity(torch.cat(nll)), "tokens": int(eval_ids.shape[0] * (eval_ids.shape[1] - 1)),
            "windows": int(eval_ids.shape[0])}


def perplexity(per_window: torch.Tensor) -> dict:
    """The perplexity report of per-window mean NLLs (the one place they are combined).

    Args:
        per_window: float64 ``[n_windows]``, each window's mean next-token NLL (:func:`window_nll`,
            or ``token_nll.mean(dim=1).double()`` of its tokens).
    Returns:
        ``{"ppl", "mean_nll", "nll_per_window"}``.
    Raises:
        ValueError: a window whose NLL is not finite.
    """
    broken = (~torch.isfinite(per_window)).nonzero().flatten().tolist()
    if broken:  # a NaN is not a perplexity: say so instead of reporting `ppl nan`
        raise ValueError(f"the model's NLL is NaN or infinite on {len(broken)} of {len(per_window)} windows "
                         f"(first: window {broken[0]}): its weights or activations hold non-finite values "
                         "(a damaged checkpoint, or an overflow in half precision)")
    mean_nll = float(per_window.mean())
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "nll_per_window": per_window.tolist()}


def evaluate_text(model, tokenizer, text: str, windows: int, seq_len: int) -> dict:
    """:func:`evaluate_ppl` of ``model`` on the evaluation windows of ``text`` (an embedded name or
    a file, ``bitcliff.assets.load_text``)."""
    from bitcliff.assets import load_text  # noqa: PLC0415 - the assets load lazily
    from bitcliff.data import evaluation_windows  # noqa: PLC0415

    return evaluate_ppl(model, evaluation_windows(tokenizer, load_text(text), windows, seq_len))
