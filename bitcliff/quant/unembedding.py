"""The unembedding's decode on the CPU, reading its weight in bf16.

A quantized model keeps its output projection (the unembedding) in full precision.  On the CPU a
decode step reads all of it for one row: SmolLM2's 49152 x 576 fp32 matrix is 113 MB, a fifth of
its fp32 model and 10 of W4's 48 ms per token (bench/NOTES.md).  Read as bf16 it is half the bytes,
and the compiled kernel (``linear_bf16`` in ``kernels/cpu_kernel.cpp``) multiplies the bf16
weights, widened exactly, by the fp32 activations and sums in fp32, so the logits stay fp32.

What it costs: the weight rounded to bf16 moved the embedded SmolLM2's perplexity on wiki by
-0.002 % (fp32 model) and +0.008 % (GPTQ W4 g64), far under the 0.1 % a default may cost; a model
trained in bf16 loses nothing.  It runs for decode only (up to :data:`DECODE_MAX_ROWS` rows):
prefill and evaluation keep the fp32 weight, where the BLAS is faster and the perplexity exact.
The bf16 copy is extra memory, half the fp32 weight's bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitcliff.kernels.cpu_build import native_ops

#: Rows up to which the bf16 copy is read: the kernel reads the whole weight once per two rows.
DECODE_MAX_ROWS = 4


class DecodeUnembedding(nn.Linear):
    """An ``nn.Linear`` whose few-row forwards read a bf16 copy of its weight.

    It holds the original ``weight`` and ``bias`` parameters themselves (a tied embedding stays
    tied, and the state dict keeps its keys); the copy is a non-persistent buffer, made again if
    the weight is replaced or changed in place.

    Args:
        linear: the model's output projection (fp32 weight ``[V, H]``).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        # on the weight's device, named: a default device set by the user must not place it
        self.register_buffer("weight_bf16", torch.empty(0, dtype=torch.bfloat16, device=linear.weight.device),
                             persistent=False)
        self._copied_from: tuple | None = None

    def _bf16_weight(self) -> torch.Tensor:
        """bf16 ``[V, H]``, the weight rounded to nearest (made again when the weight changed)."""
        source = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._copied_from != source:
            self.weight_bf16 = self.weight.detach().to(torch.bfloat16).contiguous()
            self._copied_from = source
        return self.weight_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., H]`` to logits ``[..., V]`` in ``x.dtype``."""
        decode = (
            x.device.type == "cpu"
            and self.weight.device.type == "cpu"
            and x.dtype == torch.float32
            and x.numel() <= DECODE_MAX_ROWS * self.in_features
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        )
        if not decode:
            return F.linear(x, self.weight, self.bias)
        y = native_ops().linear_bf16(x, self._bf16_weight())  # built: the module exists only where it is
        return y if self.bias is None else y + self.bias


def read_unembedding_in_bf16(model: nn.Module) -> bool:
    """Make ``model``'s fp32 output projection decode from a bf16 copy (see the module docstring).

    Returns ``False``, changing nothing, where the compiled CPU kernel is not built, the model
    has no plain ``nn.Linear`` output projection, or its weight is not fp32 on the CPU.
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return False
    if native_ops() is None:  # builds the kernel on first use
        return False
    model.set_output_embeddings(DecodeUnembedding(head))
    return True
