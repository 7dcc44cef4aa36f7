"""Kernels: the GPTQ bit packing, the kernel layout and its width spec, the plain-torch reference
(which defines every kernel), the GPU decode programs, the Triton schedules and their launcher, the
CPU path, and the ``torch.library`` operators ``QuantLinear`` calls.

May import: torch, triton and :mod:`bitcliff.storage` (the tuning cache); nothing else of bitcliff.
"""
