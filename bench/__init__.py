"""Benchmarks: kernels against their physical floor (GPU), end-to-end decode, CPU reference paths."""

from bitcliff import numerics

# Before any benchmark computes: the benchmarks measure what the commands compute, with the CPU
# paths the commands pin (importing bitcliff leaves the process alone).
numerics.pin()
