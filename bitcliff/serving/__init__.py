"""Serving bitcliff checkpoints in other inference engines.

The engine-independent parts (which checkpoints to claim, per-layer settings, tensor-parallel
group bookkeeping, the packed weight a served layer runs) import no engine; the vLLM plugin
(:mod:`bitcliff.serving.vllm_plugin`, installed with ``pip install bitcliff[vllm]``) builds on them.
"""
