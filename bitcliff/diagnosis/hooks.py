"""Forward hooks that are always removed, and the argument plumbing of decoder layers.

    with Hooks() as hooks:
        hooks.output(layer, lambda out: record(out))            # observe (return None)
        hooks.output(layer.mlp, lambda out: fp_mlp_output)      # replace (return a tensor)
        hooks.input(layer, lambda hidden: fp_hidden)            # replace the residual input
        model(ids)
    # every hook is gone here, also when the body raised
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bitcliff.layers import first_tensor


def _replace_first(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


class Hooks:
    """A set of forward hooks removed together on exit (also on exceptions) or by ``remove()``."""

    def __init__(self) -> None:
        self._handles: list = []

    def output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Call ``fn(hidden)`` on the module's output hidden state; a returned tensor replaces it."""

        def hook(mod, args, out):
            new = fn(first_tensor(out))
            return None if new is None else _replace_first(out, new.to(first_tensor(out).dtype))

        self._handles.append(module.register_forward_hook(hook))

    def raw_output(self, module: nn.Module, fn: Callable[[object], None]) -> None:
        """Call ``fn(output)`` with the module's whole output (observe only)."""
        self._handles.append(module.register_forward_hook(lambda mod, args, out: fn(out) and None))

    def input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Call ``fn(hidden)`` on the module's first input (``hidden_states``, positional or keyword);
        a returned tensor replaces it."""

        def hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new.to(args[0].dtype), *args[1:]), kwargs)
            hidden = kwargs["hidden_states"]
            new = fn(hidden)
            return None if new is None else (args, {**kwargs, "hidden_states": new.to(hidden.dtype)})

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)
