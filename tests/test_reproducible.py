"""The same command gives the same checkpoint, whatever the thread count (``bitcliff.numerics``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from bitcliff import numerics
from tests.conftest import tiny_llama_config, word_tokenizer


@pytest.fixture(scope="module")
def wider_folder(tmp_path_factory):
    """A random 2-layer Llama wide enough (576, as SmolLM2) for the BLAS to split its work by thread."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wider")
    folder = root / "model"
    config = tiny_llama_config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                               max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    (root / "text.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 126, (20000,), generator=gen)))
    return folder


def _quantize(folder, out, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in numerics.PINNED:  # what a fresh shell has: bitcliff pins them itself
        env.pop(key, None)
    command = [sys.executable, "-m", "bitcliff", "quantize", "--model", str(folder), "--method", "gptq", "--bits", "3",
               "--group-size", "64", "--calib-samples", "16", "--seq-len", "128", "--text-file",
               str(folder.parent / "text.txt"), "--out", str(out), "--device", "cpu"]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_gptq_checkpoint_is_the_same_with_one_and_two_threads(wider_folder, tmp_path):
    assert _quantize(wider_folder, tmp_path / "one", 1) == _quantize(wider_folder, tmp_path / "two", 2)


@pytest.mark.skipif(not numerics._has_avx2(), reason="the pinned paths are x86 AVX2 ones; this CPU has no AVX2")
def test_importing_bitcliff_pins_the_cpu_paths():
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED}
    code = "import bitcliff, torch, os; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["AVX2", "AVX2,STRICT"]


def test_a_setting_of_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    chosen = numerics.pin()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert "MKL_CBWR" not in chosen
