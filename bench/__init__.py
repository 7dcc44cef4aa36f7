"""Benchmarks: kernels against their physical floor (GPU), end-to-end decode, CPU reference paths."""
