"""Packing formats, the plain-torch reference, and the Triton dequant-matmul kernels."""
