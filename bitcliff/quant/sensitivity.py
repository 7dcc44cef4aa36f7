"""How much the model's loss cares about each weight: the diagonal of the empirical Fisher.

A small change ``δ`` to weight ``w_ij`` raises the expected loss by about ``½ F_ij δ²``, where
``F_ij`` is the Fisher information of that weight; the empirical Fisher estimates it by the
squared gradient of each calibration window's loss, summed over windows (SqueezeLLM's
sensitivity).  Weighting a quantization error by it makes errors of different modules
comparable in one unit, the loss, which is what mixed precision (:mod:`bitcliff.quant.mixed`)
needs to trade bits between modules.  A Hessian ``XᵀX`` of a module's inputs cannot: it measures
the module's output error, not what that error costs downstream.

:func:`output_sensitivity` is the same idea one step coarser, for errors measured at a module's
output rather than per weight: the mean squared loss gradient there turns an output error into
loss (the repair allocator's unit).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def fisher_diagonal(model: nn.Module, names: list[str], calib_ids: torch.Tensor,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal of the weights of the linears ``names``.

    Args:
        model: a causal LM in full precision (its weights are not changed; gradients are taken
            for the ``names`` weights only, one window at a time).
        names: full names of ``nn.Linear`` modules of ``model``.
        calib_ids: int64 ``[n_windows, seq_len]``; each window's mean next-token loss gives one
            gradient sample.
        progress: show a tqdm bar over the windows.
    Memory: beside the model, one gradient of every ``names`` weight (in the weights' dtype) and
    the float32 sums: about the model's size twice more for fp32 weights.
    Returns:
        Per name, float32 ``[N, K]`` (the weight's shape): the sum over windows of the squared
        gradient.
    """
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be int64 [n_windows, seq_len] with n_windows > 0, got {tuple(calib_ids.shape)}")
    weights = {name: model.get_submodule(name).weight for name in names}
    before = {p: p.requires_grad for p in model.parameters()}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for window in tqdm(calib_ids, desc="sensitivity", disable=not progress, unit="window"):
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, _), grad in zip(weights.items(), grads):
                fisher[name].add_(grad.float().square())
    finally:
        for p, wanted in before.items():
            p.requires_grad_(wanted)
    return fisher


def weighted_error(weight: torch.Tensor, dequantized: torch.Tensor, fisher: torch.Tensor) -> float:
    """``Σ F ⊙ (W − Ŵ)²``: the loss a quantization ``Ŵ`` of ``weight`` adds, to second order, up to
    the factor ½ (all float ``[N, K]``)."""
    return float((fisher * (weight.float() - dequantized.float()).square()).sum())


def output_sensitivity(model: nn.Module, names: list[str], calib_ids: torch.Tensor,
                       progress: bool = False) -> dict[str, float]:
    """How much the loss cares about an error at each linear's *output*: the mean over windows,
    positions and output features of the squared loss gradient ``(∂L/∂y)²``.

    An output error ``δy = E x`` of a module raises the loss by about ``½ E[δyᵀ G δy]``; with ``G``
    taken as proportional to this mean times the identity, by an amount proportional to
    ``g · tr(E C Eᵀ)`` (``C = E[x xᵀ]``), with one factor for every module at one window length
    (``L`` is a window's mean loss, so ``g`` scales as one over its length squared): the unit that
    makes output errors of different modules comparable (the repair allocator,
    :mod:`bitcliff.repairs.allocate`).  One scalar per module is a mean over tens of thousands of
    values, so a few windows estimate it well.

    Args:
        model: a causal LM in full precision (unchanged; no weight gradient is formed).
        names: full names of linear modules of ``model``.
        calib_ids: int64 ``[n_windows, seq_len]``; each window's mean next-token loss is one sample.
    Returns:
        Per name, ``g`` as a float.
    """
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be int64 [n_windows, seq_len] with n_windows > 0, got {tuple(calib_ids.shape)}")
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    hooks = []

    def watch(name):
        def hook(module, args, output):
            def on_gradient(grad):
                sums[name] += float(grad.detach().double().square().sum())
                counts[name] += grad.numel()
            output.register_hook(on_gradient)
        return hook

    # The input embeddings carry the graph: no parameter gets a gradient (nor its memory).
    embeddings = model.get_input_embeddings()
    hooks.append(embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True)))
    hooks += [model.get_submodule(name).register_forward_hook(watch(name)) for name in names]
    device = embeddings.weight.device  # where the input ids go
    before = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in before:
            p.requires_grad_(False)
        with torch.enable_grad():
            for window in tqdm(calib_ids, desc="sensitivity", disable=not progress, unit="window"):
                ids = window.unsqueeze(0).to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for p, wanted in before.items():
            p.requires_grad_(wanted)
    return {name: sums[name] / max(counts[name], 1) for name in names}
