"""Hooks replace what they should and are always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitcliff.diagnosis.hooks import Hooks


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_output_and_input_replacement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with Hooks() as hooks:
        hooks.output(net[0], lambda h: torch.zeros_like(h))
        assert torch.equal(net(x), net[1](torch.zeros(2, 4)))
    with Hooks() as hooks:
        hooks.input(net[1], lambda h: torch.ones_like(h))
        assert torch.equal(net(x), net[1](torch.ones(2, 4)))
    assert _hook_count(net) == 0
    seen = []
    expected = net(x)
    with Hooks() as hooks:
        hooks.output(net[0], lambda h: seen.append(h.shape))  # observing returns None: no change
        assert torch.equal(net(x), expected)
    assert seen == [torch.Size([2, 4])]


def test_hooks_removed_when_the_body_raises():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks() as hooks:
            hooks.output(net[0], lambda h: None)
            hooks.input(net[1], lambda h: None)
            assert len(hooks) == 2
            raise RuntimeError("boom")
    assert _hook_count(net) == 0


def test_hooks_removed_when_a_hook_raises():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def bad(h):
        raise ValueError("bad hook")

    with pytest.raises(ValueError, match="bad hook"):
        with Hooks() as hooks:
            hooks.output(net[0], bad)
            net(torch.randn(1, 4))
    assert _hook_count(net) == 0
