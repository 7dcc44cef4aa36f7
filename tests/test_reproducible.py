"""The same command gives the same checkpoint, whatever the thread count (``bitcliff.numerics``)."""

from __future__ import annotations

import hashlib
import json
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
    env = {**_clean_env(), "OMP_NUM_THREADS": str(threads)}  # the command pins them itself
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


def _clean_env() -> dict[str, str]:
    """This environment without the pinned variables: what a fresh shell has (this suite pins them)."""
    return {k: v for k, v in os.environ.items() if k not in numerics.PINNED}


def _run_python(code: str) -> str:
    """The last line ``code`` prints, run by a fresh interpreter in a clean environment."""
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(), check=True, capture_output=True,
                            text=True, timeout=300)
    return result.stdout.strip().splitlines()[-1]


# What a process's numerics are: its environment, ATen's kernels, threads and numerics modes.
_REPORT = """
import json, torch
print(json.dumps({"environ": dict(os.environ), "aten": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                  "dtype": str(torch.get_default_dtype()), "matmul": torch.get_float32_matmul_precision(),
                  "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled()}))
"""


def test_importing_bitcliff_leaves_the_process_alone():
    """A library must not change its host's environment or numerics (a server, a notebook)."""
    modules = "bitcliff, bitcliff.quant, bitcliff.diagnosis, bitcliff.repairs, bitcliff.cli, bitcliff.cliff, bitcliff.study"
    plain = json.loads(_run_python("import os, torch" + _REPORT))
    imported = json.loads(_run_python(f"import os, torch\nimport {modules}" + _REPORT))
    assert {k for k in plain["environ"].keys() | imported["environ"].keys()
            if plain["environ"].get(k) != imported["environ"].get(k)} == set()
    assert imported == plain


# After ``import os, torch``: MKL's branch in effect, where this torch build exports MKL's query.
_MKL_BRANCH = """
def mkl_branch():
    import ctypes
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.mkl_serv_cbwr_get(ctypes.c_int(-1))
    except (OSError, AttributeError):
        return None
"""

# ``python -m bitcliff --help`` (which imports every command), then what took effect.
_COMMAND = """
import os, runpy, sys
from bitcliff import numerics
numerics.PINNED = PINNED or numerics.PINNED
sys.argv = ["bitcliff", "--help"]
try:
    runpy.run_module("bitcliff", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
import torch
""" + _MKL_BRANCH + """
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("ATEN_CPU_CAPABILITY"), os.environ.get("MKL_CBWR"),
      mkl_branch())
"""


def _command_report(pinned: dict[str, str] | None = None) -> list[str]:
    """After ``python -m bitcliff --help`` in a fresh interpreter, pinning ``pinned`` instead of
    :data:`numerics.PINNED` where given: ATen's kernels, the two variables, MKL's branch."""
    return _run_python(_COMMAND.replace("PINNED or", f"{pinned!r} or")).split()


@pytest.mark.skipif(not numerics._has_avx2(), reason="the pinned paths are x86 AVX2 ones; this CPU has no AVX2")
def test_the_command_pins_the_cpu_paths():
    assert _command_report()[:3] == ["AVX2", "avx2", "AVX2,STRICT"]


@pytest.mark.skipif(not numerics._has_avx2(), reason="the pinned paths are x86 AVX2 ones; this CPU has no AVX2")
def test_the_command_pins_before_torch_computes():
    """The command pins before torch's first CPU operation, importing every command included.

    Pinned here to paths the CPU would not choose itself (ATen's scalar kernels, MKL's compatible
    branch), the report shows that both libraries took the pin, not merely that it was set."""
    own = _run_python("import os, torch" + _MKL_BRANCH + "torch.ones(64, 64) @ torch.ones(64, 64)\n"
                      "print(torch.backends.cpu.get_cpu_capability(), mkl_branch())").split()
    compatible = _run_python("import os; os.environ['MKL_CBWR'] = 'COMPATIBLE'\nimport torch" + _MKL_BRANCH
                             + "print(mkl_branch())")
    report = _command_report({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"})
    assert own[0] != "DEFAULT" and report[:3] == ["DEFAULT", "default", "COMPATIBLE"]
    if compatible != "None":  # MKL can be asked
        assert own[1] != compatible and report[3] == compatible


def test_a_setting_of_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    chosen = numerics.pin()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert "MKL_CBWR" not in chosen


def test_importing_bitcliff_and_its_command_line_imports_no_torch():
    """The public names come on first use, so the command can answer Ctrl-C before torch loads;
    they stay the same names, and the first use of ``BitcliffConfig`` registers it."""
    report = _run_python(
        "import json, sys, bitcliff, bitcliff.cli\n"
        "before = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "names = {n: getattr(bitcliff, n).__module__ for n in bitcliff.__all__}\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as known\n"
        "print(json.dumps([before, names, 'bitcliff' in known, bitcliff.__version__]))")
    before, names, registered, version = json.loads(report)
    assert before == []
    assert names["quantize"] == "bitcliff.quant.convert" and names["load"] == "bitcliff.quant.checkpoint.load"
    assert set(names) == {"BitcliffConfig", "QuantConfig", "QuantLinear", "RepairPlan", "quantize", "save", "load",
                          "diagnose", "measure_repairs", "plan_repair", "repair"}
    assert registered and version


def test_ctrl_c_while_the_command_starts_is_one_line_and_130():
    """SIGINT arrives while the commands' modules import torch (sent from inside that step, so the
    timing is certain): one line, exit status 130, no traceback."""
    code = ("import os, signal, sys, bitcliff.cli as cli\n"
            "build = cli.build_parser\n"
            "def slow_start():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    import torch, transformers  # noqa: F401\n"
            "    return build()\n"
            "cli.build_parser = slow_start\n"
            "sys.exit(cli.main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=300,
                            check=False)  # the status is what is tested
    assert result.returncode == 130
    assert result.stderr.strip() == "bitcliff: interrupted while starting; nothing was done"
    assert result.stdout == ""


def test_bitcliff_load_registers_the_transformers_method():
    """A checkpoint may declare quant_method "bitcliff"; transformers must know it by the time
    ``bitcliff.load`` is reached, though ``import bitcliff`` imported nothing heavy."""
    assert _run_python("import bitcliff\nbitcliff.load\n"
                       "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as known\n"
                       "print('bitcliff' in known)") == "True"
