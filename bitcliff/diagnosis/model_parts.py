"""Where the parts of a decoder-only Hugging Face model live, and the checks that two models
(full precision and quantized) are comparable part by part.

Supported: decoder layers where :func:`bitcliff.layers.find_decoder_layers` finds them, each
with the attention and MLP blocks, final norm and unembedding that its family's entry of
:data:`bitcliff.layers.ARCHITECTURES` names: the Llama family (SmolLM2, Llama, Mistral, Qwen2,
Gemma 3, Phi-3...), BLOOM and GPT-NeoX.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitcliff.layers import COMPONENTS, architecture_of, component, find_decoder_layers, layer_architecture
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.surgery import set_submodule

__all__ = ["COMPONENTS", "component"]  # the analyses' names for the parts (bitcliff.layers)


class IncompatibleModels(ValueError):
    """The full-precision and quantized models cannot be compared part by part."""


def backbone(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers and the final norm (``model.model`` for Llama)."""
    try:
        prefix, _ = find_decoder_layers(model)
    except ValueError as exc:
        raise IncompatibleModels(str(exc)) from exc
    inner = model.get_submodule(prefix.rpartition(".")[0])
    arch = architecture_of(model)
    if not hasattr(inner, arch.final_norm) or not hasattr(model, arch.unembedding):
        raise IncompatibleModels(
            f"{type(model).__name__} is not a supported decoder-only model: expected a final "
            f"{arch.final_norm} beside {prefix} and an {arch.unembedding} (the families of "
            "bitcliff.layers.ARCHITECTURES: Llama-like, BLOOM, GPT-NeoX)"
        )
    return inner


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, each checked to have every component of :data:`COMPONENTS`."""
    backbone(model)
    layers = list(find_decoder_layers(model)[1])
    arch = architecture_of(model)
    for i, layer in enumerate(layers):
        for part in COMPONENTS:
            if not hasattr(layer, arch.attribute(part)):
                raise IncompatibleModels(f"decoder layer {i} ({type(layer).__name__}) has no "
                                         f"{arch.attribute(part)}")
    return layers


def gate_projection(layer: nn.Module) -> nn.Module | None:
    """The MLP's gate projection (gated MLPs: SwiGLU, GeGLU), or None."""
    gate = layer_architecture(layer).gate
    return None if gate is None else getattr(component(layer, "mlp"), gate, None)


def logit_lens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits read from an intermediate residual stream with the final norm and the
    unembedding (nostalgebraist's logit lens), with the model's final soft-capping if it has one.

    Args:
        hidden: float ``[..., d_model]`` residual stream, in any float dtype.
    Returns:
        fp32 ``[..., vocab]``.
    """
    arch = architecture_of(model)
    norm = getattr(backbone(model), arch.final_norm)
    unembedding = getattr(model, arch.unembedding)
    # The diagnosis keeps residual streams in fp32; a bf16 or fp16 model reads them in its own dtype.
    hidden = hidden.to(unembedding.weight.dtype)
    logits = unembedding(norm(hidden)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_compatible(fp_model: nn.Module, q_model: nn.Module) -> None:
    """Raise :class:`IncompatibleModels` naming the first difference that prevents a layer-by-layer
    comparison (architecture, vocabulary, depth, width)."""
    fc, qc = fp_model.config, q_model.config
    checks = [
        ("architecture (model_type)", getattr(fc, "model_type", None), getattr(qc, "model_type", None)),
        ("vocabulary size", getattr(fc, "vocab_size", None), getattr(qc, "vocab_size", None)),
        ("number of layers", len(decoder_layers(fp_model)), len(decoder_layers(q_model))),
        ("hidden size", getattr(fc, "hidden_size", None), getattr(qc, "hidden_size", None)),
    ]
    for what, a, b in checks:
        if a != b:
            raise IncompatibleModels(f"the full-precision and quantized models differ in {what}: {a} vs {b}")
    if not any(isinstance(m, QuantLinear) for m in q_model.modules()):
        raise IncompatibleModels("the quantized model has no QuantLinear layer (is it a full-precision model?)")
    check_weights_match(fp_model, q_model)


#: A quantized weight further than this from the FP weight (relative L2) is no better than an
#: all-zero weight: it cannot be a quantization of it.  Measured on SmolLM2-135M, the worst
#: quantization (RTN W2 per-channel, symmetric) reaches 0.75; two different layers of the model 1.32.
MAX_RELATIVE_WEIGHT_ERROR = 1.0


@torch.no_grad()
def check_weights_match(fp_model: nn.Module, q_model: nn.Module) -> None:
    """Raise :class:`IncompatibleModels` when a ``QuantLinear`` of ``q_model`` is not a quantization
    of the full-precision weight at the same place (other weights, permuted layers, another model)."""
    for name, fp_weight in fp_linear_weights(fp_model, q_model).items():
        q_weight = q_model.get_submodule(name).effective_weight().to(fp_weight.device)
        w = fp_weight.float()
        error = float((q_weight - w).norm() / w.norm().clamp_min(1e-30))
        if error > MAX_RELATIVE_WEIGHT_ERROR:
            cos = float(torch.nn.functional.cosine_similarity(q_weight.flatten(), w.flatten(), dim=0))
            raise IncompatibleModels(
                f"these models do not match ({name}: relative weight error {error:.3g}, cosine {cos:.2f}; "
                f"a quantization of it stays below {MAX_RELATIVE_WEIGHT_ERROR:g}): the quantized model is not "
                "a quantization of this full-precision model"
            )


def fp_linear_weights(fp_model: nn.Module, q_model: nn.Module) -> dict[str, torch.Tensor]:
    """The full-precision ``[N, K]`` weight of every ``QuantLinear`` of ``q_model``, by name."""
    fp_modules = dict(fp_model.named_modules())
    weights = {}
    for name, module in q_model.named_modules():
        if isinstance(module, QuantLinear):
            fp = fp_modules.get(name)
            if not isinstance(fp, nn.Linear):
                raise IncompatibleModels(f"{name} is quantized but the full-precision model has no Linear there")
            if tuple(fp.weight.shape) != (module.out_features, module.in_features):
                raise IncompatibleModels(
                    f"{name}: full-precision weight {tuple(fp.weight.shape)} vs quantized "
                    f"{(module.out_features, module.in_features)}"
                )
            weights[name] = fp.weight.detach()
    return weights


@torch.no_grad()
def dequantized_twin(q_model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``q_model`` whose ``QuantLinear`` layers are plain ``nn.Linear`` holding the
    dequantized weights.

    Its outputs are those of the quantized model with fp32 activations (within
    ``kernels.cpu.exact_activations`` the CPU path of ``QuantLinear`` is ``x @ dequantize(W).T``
    up to summation order; by default the compiled kernel rounds activations to 15 bits, which
    the twin leaves out, so the analyses see the weights' error alone).  It avoids unpacking every
    weight on every forward, which dominates CPU time when the analyses run the model a hundred
    times.  ``q_model`` is left untouched.
    """
    twin = copy.deepcopy(q_model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.qweight.device, dtype=dtype)
            linear.weight.copy_(module.effective_weight(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            set_submodule(twin, name, linear)
    return twin.eval()
