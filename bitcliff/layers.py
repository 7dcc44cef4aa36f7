"""The decoder layers of a transformers causal LM: finding them, recording what the model passes
to them, and running them again on other inputs.

Both the layer-by-layer quantization (``bitcliff.quant``) and the diagnosis's activation
patching (``bitcliff.diagnosis``) treat a decoder layer as a black box called as
``layer(hidden, *args, **kwargs)``: the model prepares the extra arguments (attention mask,
rotary position embeddings, position ids... which may differ between layers, e.g. Gemma 3's
sliding and global layers), and each layer's output hidden state is the next layer's input.
:class:`LayerCalls` records those arguments once, so a layer (or the rest of the stack) can be
re-run on any hidden state with :func:`run_layers`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# Where transformers models keep their decoder blocks (an nn.ModuleList), most common first.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.blocks",
    "layers",
)


class UnsupportedModelError(ValueError):
    """The model's structure is not one bitcliff can walk layer by layer."""


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of the model's decoder blocks, e.g. ``("model.layers", ModuleList)``.

    Raises:
        UnsupportedModelError: naming the model class and the paths tried, when none holds a
            non-empty ``nn.ModuleList``.
    """
    for path in LAYER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}: none of {', '.join(LAYER_PATHS)} "
        "is a non-empty nn.ModuleList of blocks"
    )


def layer_index(module_name: str, prefix: str) -> int | None:
    """The decoder layer a module belongs to (``"model.layers.7.mlp.up_proj"`` -> 7), or None for
    modules outside the layers (``prefix``: the layers' path from :func:`find_decoder_layers`)."""
    head = prefix + "."
    if not module_name.startswith(head):
        return None
    index = module_name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def first_tensor(output) -> torch.Tensor:
    """The hidden-state tensor of a module output (layers and attention blocks may return tuples)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class LayerCall:
    """The arguments one decoder layer received besides its hidden-state input."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``layer``'s output hidden state for input ``hidden`` ``[B, T, d]`` with recorded arguments."""
    return first_tensor(layer(hidden, *call.args, **call.kwargs))


def run_layers(layers, calls: list[LayerCall], hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run ``layers[start:]`` on ``hidden`` (``[B, T, d]``), each with its recorded call."""
    for index in range(start, len(layers)):
        hidden = run_layer(layers[index], hidden, calls[index])
    return hidden


class _Interner:
    """Returns one stored copy for equal tensors (masks, position embeddings repeat per batch)."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []

    def __call__(self, value):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            for kept in self._kept:
                if kept is value or (
                    kept.shape == value.shape and kept.dtype == value.dtype
                    and kept.device == value.device and torch.equal(kept, value)
                ):
                    return kept
            self._kept.append(value)
            return value
        if isinstance(value, tuple):
            items = [self(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: reports its call and returns the input unchanged."""

    def __init__(self, index: int, recorder: "LayerCalls") -> None:
        super().__init__()
        self.index = index
        self.recorder = recorder

    def forward(self, hidden_states, *args, **kwargs):
        self.recorder._record(self.index, hidden_states, args, kwargs)
        if self.index == len(self.recorder.calls) - 1:
            raise StopForward
        return hidden_states


class LayerCalls:
    """What a model passes to its decoder layers, for every forward run while recording.

    Attributes:
        inputs: ``inputs[l][b]``: the hidden state ``[B, T, d]`` entering layer ``l`` in
            forward ``b`` (only layer 0 when the layers were replaced, see :meth:`replacing`).
        calls: ``calls[l][b]``: the :class:`LayerCall` of layer ``l`` in forward ``b``; equal
            tensors are stored once across forwards.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.inputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self.calls: list[list[LayerCall]] = [[] for _ in layers]
        self._intern = _Interner()
        self._previous: torch.Tensor | None = None
        self._replaced = False

    def _record(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        if index == 0 or not self._replaced:
            self.inputs[index].append(hidden.detach())
        elif hidden is not self._previous:
            raise UnsupportedModelError(
                "the model does not pass each decoder layer's output straight to the next layer; "
                "it cannot be walked layer by layer"
            )
        self._previous = hidden
        self.calls[index].append(LayerCall(self._intern(args), self._intern(kwargs)))

    def for_forward(self, b: int = 0) -> list[LayerCall]:
        """The calls of every layer in forward ``b``."""
        return [per_layer[b] for per_layer in self.calls]

    @contextmanager
    def observing(self):
        """Record while the real layers run (forward pre-hooks, removed on exit)."""

        def hook(index):
            def pre_hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self._record(index, hidden, tuple(args[1:]), rest)

            return pre_hook

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replacing(self):
        """Record with the layers swapped for pass-through stand-ins: only the modules before the
        first layer (embeddings) and the model-level preparation compute anything, so the layers'
        weights may still be on the meta device.  The forward ends with :class:`StopForward` at
        the last layer (the caller catches it); the layers are put back on exit."""
        originals = list(self.layers)
        self._replaced = True
        try:
            for i in range(len(originals)):
                self.layers[i] = _PassThrough(i, self)
            yield self
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            self._replaced = False
