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

import threading
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


@dataclass(frozen=True)
class Architecture:
    """Where one family of decoder-only models keeps the parts bitcliff names.

    Attributes:
        model_types: the ``config.model_type`` values of the family.
        attention, mlp: the attribute of a decoder layer holding its attention and MLP blocks.
        gate: the MLP's gate projection (gated MLPs: SwiGLU, GeGLU), an attribute of ``mlp``;
            None for a family without one.
        final_norm: the norm beside the decoder layers, applied before the unembedding.
        unembedding: the model's output projection, an attribute of the model.
        bias_flags: config.json flags that make transformers build biased projections, by the
            component they cover (``attention_bias`` covers every attention projection).
        batched_replay: a layer's recorded arguments broadcast over rows, so that one recorded
            call replays a batch of rows (False for BLOOM, whose ALiBi bias is
            ``[batch × heads, 1, T]``: a replay has the recorded batch size).

    A fused projection (Phi-3's ``qkv_proj``, BLOOM's ``query_key_value``) is one linear to
    bitcliff: quantized, diagnosed and repaired whole, with no rule of its own.
    """

    model_types: tuple[str, ...] = ()
    attention: str = "self_attn"
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    final_norm: str = "norm"
    unembedding: str = "lm_head"
    bias_flags: tuple[tuple[str, str], ...] = (("attention_bias", "attn"), ("mlp_bias", "mlp"))
    batched_replay: bool = True

    def attribute(self, component: str) -> str:
        """``"attn"`` -> ``"self_attn"``, ``"mlp"`` -> ``"mlp"``."""
        return {"attn": self.attention, "mlp": self.mlp}[component]


#: The families bitcliff analyses and repairs, one entry each; the first is also the one assumed for
#: a ``model_type`` none lists.  Adding a family is adding an entry (docs/architecture.md).
ARCHITECTURES = (
    # Llama and the models built like it: SmolLM2, Mistral, Qwen2/3, Gemma 3 (with its extra
    # norms inside the layer), Phi-3 (fused qkv_proj and gate_up_proj: no separate gate)
    Architecture(model_types=("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text", "phi3")),
    Architecture(model_types=("bloom",), attention="self_attention", gate=None, final_norm="ln_f", bias_flags=(),
                 batched_replay=False),
    Architecture(model_types=("gpt_neox",), attention="attention", gate=None, final_norm="final_layer_norm",
                 bias_flags=(("attention_bias", "attn"),)),
)
#: The Llama family's entry, assumed for a model whose type no entry lists.
ARCHITECTURE = ARCHITECTURES[0]
#: The components of a decoder layer the analyses assess and patch, and the repairs act on.
COMPONENTS = ("attn", "mlp")


def architecture_of(model: nn.Module) -> Architecture:
    """The family entry of ``model`` by its ``config.model_type`` (the Llama family's for a type no
    entry lists, which the checks of the parts then hold to those names)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((a for a in ARCHITECTURES if model_type in a.model_types), ARCHITECTURE)


def layer_architecture(layer: nn.Module) -> Architecture:
    """The family entry whose attention and MLP attributes a decoder layer has (the Llama family's
    when none matches: the caller's lookup then names what is missing)."""
    return next((a for a in ARCHITECTURES if hasattr(layer, a.attention) and hasattr(layer, a.mlp)), ARCHITECTURE)


def component(layer: nn.Module, name: str) -> nn.Module:
    """A decoder layer's ``"attn"`` (attention block, output before any post-attention norm) or
    ``"mlp"`` block."""
    return getattr(layer, layer_architecture(layer).attribute(name))


def component_of(module_name: str, layer_prefix: str | None = None) -> tuple[int | None, str] | None:
    """``(layer, "attn" | "mlp")`` of a linear, or None outside the components.

    ``module_name`` is a full name (``model.layers.3.mlp.up_proj``, with ``layer_prefix`` the
    layers' path) or one relative to its decoder layer (``mlp.up_proj``; the layer is then None).
    """
    if layer_prefix is not None:
        index = layer_index(module_name, layer_prefix)
        if index is None:
            return None
        rest = module_name[len(layer_prefix) + 1:].split(".", 1)
        if len(rest) < 2:
            return None
        module_name = rest[1]
    else:
        index = None
    for architecture in ARCHITECTURES:
        for short in COMPONENTS:
            if module_name.startswith(architecture.attribute(short) + "."):
                return index, short
    return None


#: Norms, means and sampled positions skip the tokens before this index.  Position 0 carries the
#: attention sink: residual norms there are tens of times larger than anywhere else, so including
#: it would let one token set every ratio (and a mean input).  Its next-token prediction still
#: counts in the NLL, and covariances count it: a quantization that ignored it would corrupt the sink.
FIRST_TOKEN = 1


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


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


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


@contextmanager
def removing(handles: list):
    """Remove the hook ``handles`` on exit, however the block ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ShareGroup:
    """Linears of a layer that read one input tensor (q/k/v; gate/up), in call order.

    Attributes:
        members: their names relative to the layer.
        source: the leaf module (relative name) whose output that tensor is, e.g. the norm in
            front of q/k/v; None when it is computed by plain tensor code.
    """

    members: list[str]
    source: str | None


def share_groups(layer: nn.Module, targets: dict[str, nn.Module], hidden: torch.Tensor, call: LayerCall) -> list[ShareGroup]:
    """Ordered share groups of ``targets`` (relative name -> module) in ``layer``.

    Runs ``layer`` on ``hidden`` until the last target is reached.  Raises ``RuntimeError`` if a
    target is never called.
    """
    seen: list[tuple[str, torch.Tensor]] = []  # keeps the inputs alive so no address is reused
    produced: list[tuple[str, torch.Tensor]] = []

    def pre_hook(name):
        def hook(module, args):
            if not any(n == name for n, _ in seen):
                seen.append((name, args[0]))
            if len(seen) == len(targets):
                raise StopForward

        return hook

    def out_hook(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                produced.append((name, out))

        return hook

    handles = [module.register_forward_pre_hook(pre_hook(name)) for name, module in targets.items()]
    inside = {id(m) for t in targets.values() for m in t.modules()}
    handles += [m.register_forward_hook(out_hook(name)) for name, m in layer.named_modules()
                if name and id(m) not in inside and not list(m.children())]
    with removing(handles), torch.no_grad():
        try:
            run_layer(layer, hidden, call)
        except StopForward:
            pass
    missing = [n for n in targets if all(n != s for s, _ in seen)]
    if missing:
        raise RuntimeError(f"the decoder layer never calls {', '.join(missing)}; cannot collect its inputs")

    def key(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)

    groups: list[ShareGroup] = []
    keys: list[tuple] = []
    for name, x in seen:
        if key(x) in keys:
            groups[keys.index(key(x))].members.append(name)
        else:
            keys.append(key(x))
            source = next((n for n, out in reversed(produced) if key(out) == key(x)), None)
            groups.append(ShareGroup([name], source))
    return groups


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


_NOT_CHAINED = ("the model does not pass each decoder layer's output straight to the next layer; "
                "it cannot be walked layer by layer")


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: reports its call and returns the input unchanged.

    It returns the input as a one-element tuple and unwraps one it is given: models whose layers
    return a tuple take ``outputs[0]`` (BLOOM, GPT-NeoX), models whose layers return the tensor
    pass the result on as it is (Llama under transformers 5), and both then hand the next stand-in
    the same tensor."""

    def __init__(self, index: int, recorder: "LayerCalls") -> None:
        super().__init__()
        self.index = index
        self.recorder = recorder

    def forward(self, hidden_states, *args, **kwargs):
        if isinstance(hidden_states, tuple):
            if len(hidden_states) != 1:  # the model changed the tuple it got from the last stand-in
                raise UnsupportedModelError(_NOT_CHAINED)
            hidden_states = hidden_states[0]
        self.recorder._record(self.index, hidden_states, args, kwargs)
        if self.index == len(self.recorder.calls) - 1:
            raise StopForward
        return (hidden_states,)


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
            raise UnsupportedModelError(_NOT_CHAINED)
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


class _Aborted(BaseException):
    """Ends a suspended batch forward whose run was abandoned."""


class SuspendedForwards:
    """One layer forward per batch, each in its own thread, run one at a time.

    A forward can *suspend* itself (from a hook) and is resumed by :meth:`advance`.  True-
    sequential GPTQ suspends every batch at the input of the next group of linears, solves that
    group while all batches wait there, then lets them continue with the quantized weights; the
    repair walk does the same with its repairs.  The layer is computed exactly once, with no pass
    restarted from its input.  Exactly one thread runs at any time, so the threads only hold the
    batches' intermediate activations; they never compete for the cores.  Always :meth:`close`
    (in a ``finally``): it ends every suspended forward after an error or interruption.
    """

    POLL_S = 0.2  # how often the waiting caller wakes up, so that Ctrl-C is handled promptly

    def __init__(self, layer: nn.Module, inputs: list[torch.Tensor], calls: list) -> None:
        n = len(inputs)
        self.layer, self.inputs, self.calls = layer, inputs, calls
        self.outputs: list[torch.Tensor | None] = [None] * n
        self.errors: list[BaseException | None] = [None] * n
        self.finished = [False] * n
        self._go = [threading.Event() for _ in range(n)]
        self._parked = threading.Event()
        self._threads: list[threading.Thread | None] = [None] * n
        self._local = threading.local()
        self._abort = False

    def _body(self, b: int) -> None:
        self._local.batch = b
        try:
            self._wait_for_turn(b)
            with torch.no_grad():  # grad mode is per thread
                self.outputs[b] = run_layer(self.layer, self.inputs[b], self.calls[b])
        except _Aborted:
            pass
        except BaseException as exc:  # handed to the caller of advance()
            self.errors[b] = exc
        finally:
            self.finished[b] = True
            self._parked.set()

    def _wait_for_turn(self, b: int) -> None:
        self._go[b].wait()
        self._go[b].clear()
        if self._abort:
            raise _Aborted

    def suspend(self) -> None:
        """Called from a hook inside a batch forward: park until the next :meth:`advance`."""
        b = self._local.batch
        self._parked.set()
        self._wait_for_turn(b)

    def advance(self) -> None:
        """Let every unfinished batch run until it suspends again or finishes, one at a time."""
        for b in range(len(self.inputs)):
            if self.finished[b]:
                continue
            if self._threads[b] is None:
                self._threads[b] = threading.Thread(target=self._body, args=(b,), daemon=True,
                                                    name=f"layer-batch-{b}")
                self._threads[b].start()
            self._parked.clear()
            self._go[b].set()
            while not self._parked.wait(self.POLL_S):
                pass
            if self.errors[b] is not None:
                raise self.errors[b]

    def close(self) -> None:
        """End every suspended forward (after an error or interruption) and join the threads."""
        self._abort = True
        for event in self._go:
            event.set()
        for thread in self._threads:
            if thread is not None:
                thread.join()
