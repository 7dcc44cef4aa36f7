"""Cross-check bitcliff's GPTQ checkpoints against a peer implementation, GPTQModel.

    python -m bench.peer_gptqmodel --peer-python PEER_PYTHON   # from the repo root
    python -m bench.peer_gptqmodel                             # inside an environment with gptqmodel

For bits 2, 3, 4 and symmetric/asymmetric grids, two directions:

* ``bitcliff->peer``: bitcliff RTN quantizes the model, ``bitcliff.save`` writes it (in each
  ``checkpoint_format`` it can represent; the one ``save`` picks by default is marked ``*``) and
  GPTQModel loads the folder (``BACKEND.TORCH`` on CPU).
* ``peer->bitcliff``: GPTQModel quantizes the model with GPTQ on a few calibration windows and
  saves it in its default format, v1 ``gptq``; the same quantized layers are then converted with
  GPTQModel's own v1->v2 routine and saved again as ``gptq_v2``.  ``bitcliff.load`` reads both.

And ``mixed->peer``: bitcliff's mixed precision (``quantize --avg-bits``, ``--avg-bits 3.5`` here)
gives modules different bits and group sizes, stored as ``quantization_config["dynamic"]``
entries; GPTQModel must build every module at its own setting.

Every folder is then read by both implementations and compared:

* dequantized weights of every quantized layer, both in fp16 (``scales * (q - zero)``): must be
  bit-identical (both sides decode the same integers with the same fp16 scales);
* logits for the same input ids, bitcliff in float32 against GPTQModel with its loaded model cast
  to float32.  GPTQModel's ``TorchLinear`` only accepts an fp16/bf16 model at load time, so it
  holds the non-quantized tensors (embeddings, norms) in fp16 even when the checkpoint stores
  them in float32 (bitcliff's default keeps the model's dtype); bitcliff's reference rounds those
  through fp16 too, and the later cast to float32 is exact.  With identical weights the only
  possible difference is matmul order, so the tolerance is ``rel L2 <= 1e-4`` and
  ``max abs <= 1e-2`` (logits are O(10)).  In practice both sides give bit-identical logits.
* for information only (not gated): GPTQModel's native fp16 forward against bitcliff's float32
  logits.  fp16 rounding through 30 layers gives 1e-3..5e-3 relative at 3/4 bits and 0.15..0.6
  at 2 bits, where the quantized model is chaotic (tiny perturbations change its outputs).

For ``peer->bitcliff`` the v1 row also checks that bitcliff's v1 reading equals its v2 reading of
the same quantization, and every row counts the zero points equal to 0: a v1 file stores them as
``-1``, the case where v1 readers disagree (see the ``zeros=0`` column).

A row is PASS or FAIL; a bitcliff->peer row for a format bitcliff writes only on request (not its
default) that GPTQModel declines by policy (v1 with ``sym=False`` from any producer other than
gptqmodel >= 0.9.0) is REFUSED and does not fail the run.

Prints a table, writes it as JSON (``--json``, default ``bench/results/peer_gptqmodel.json``) with
the versions and the date, and exits non-zero if any row fails.

Model: ``--model default`` is the embedded SmolLM2-135M-Instruct (``bitcliff.assets``), group size
64 (divides K=576 and 1536).  ``--model tiny`` builds a random 2-layer Llama (hidden 256) with a
word-level tokenizer: fast (about 2 minutes), for smoke runs and the optional test.  On the 135M
model GPTQ takes about 3 minutes per setting and each cross-read 1-2 minutes on 2 CPU cores: the
full run takes most of an hour there.

Peer environment, kept apart from the project's (torch pinned to the CPU build so pip pulls no
CUDA wheels; ``PEER`` is any new folder):

    python3 -m venv "$PEER"
    "$PEER/bin/pip" install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    "$PEER/bin/pip" install "gptqmodel==7.6.*" -c <(echo torch==2.13.0)
    "$PEER/bin/pip" install --no-deps -e .                  # bitcliff itself, from the repo root
    "$PEER/bin/pip" install pytest pytest-benchmark         # only to run the optional test there

gptqmodel 7.6.0 builds from its sdist as is (no ``--no-build-isolation`` needed) and brings
transformers, safetensors, accelerate, tokenizers, tqdm and numpy: all that importing bitcliff
needs (``--peer-python`` also puts the repo on ``PYTHONPATH``, so the editable install is optional).
With 2 CPUs, GPTQModel's thread pool refuses to start ("Virtual pool 'model_loader:cpu' requests
2 workers but parent 'cpu' only has 1"); this script sets ``GPTQMODEL_CPU_WORKERS=2`` unless it is
already set.  Then, from the repo root:

    python -m bench.peer_gptqmodel --peer-python "$PEER/bin/python"
    "$PEER/bin/python" -m pytest tests/quant/test_peer_gptqmodel.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "peer_gptqmodel.json"
REL_TOL = 1e-4  # relative L2 of the float32 logits
ABS_TOL = 1e-2  # max abs difference of the float32 logits
WEIGHT_TOL = 0.0  # dequantized fp16 weights must be bit-identical
ALL_SETTINGS = [(b, s) for b in (2, 3, 4) for s in (True, False)]


def _setup_peer_env() -> None:
    """Environment GPTQModel needs on small CPU machines; call before importing it."""
    cpus = os.cpu_count() or 1
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, (cpus + 1) // 2))))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peer_available() -> bool:
    """Whether gptqmodel can be imported here."""
    import importlib.util

    return importlib.util.find_spec("gptqmodel") is not None


# ----------------------------------------------------------------------------------- models


def build_tiny_model(directory: Path, seed: int = 0, nonnegative_rows: int = 8) -> Path:
    """A random 2-layer Llama (hidden 256, MLP 512) with a word-level tokenizer, saved to ``directory``.

    Every K (256, 512) is a multiple of 64, and every N of 32, as GPTQ packing wants.  The first
    ``nonnegative_rows`` rows of each linear are made non-negative, so asymmetric grids get zero
    points of 0 there: the case v1 files store as -1.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = (
        "the quick brown fox jumps over a lazy dog while seven bright stars shine above "
        "quiet hills and rivers run to the sea where ships sail with sailors who sing old "
        "songs of distant lands cold winds warm fires long nights short days green fields "
        "tall trees small birds fly high low clouds drift slowly past golden towers"
    ).split()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # some all-positive rows: asymmetric grids then get zero points of 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                module.weight[:nonnegative_rows].abs_()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_ids(model_dir: Path, n_calib: int, seq_len: int, seed: int = 1):
    """Seeded random ``(calib_ids [n_calib, seq_len], eval_ids [2, seq_len])`` for a tiny model."""
    import torch
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(model_dir)))
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randint(4, vocab, (n_calib, seq_len), generator=gen)
    evals = torch.randint(4, vocab, (2, seq_len), generator=gen)
    return calib, evals


def prepare_inputs(model_name: str, work: Path, n_calib: int, seq_len: int):
    """``(model_dir, description, calib_ids [n, L], eval_ids [2, L])`` for ``--model``."""

    if model_name == "tiny":
        model_dir = build_tiny_model(work / "tiny-fp")
        calib, evals = random_ids(model_dir, n_calib, seq_len)
        return model_dir, "random LlamaForCausalLM, hidden 256, 2 layers (tiny)", calib, evals
    from transformers import AutoTokenizer

    from bitcliff.assets import load_text, resolve_model
    from bitcliff.data import calibration_windows, evaluation_windows

    model_dir = Path(resolve_model(model_name))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = load_text("wiki")
    calib = calibration_windows(tokenizer, text, n=n_calib, seq_len=seq_len)
    evals = evaluation_windows(tokenizer, text, n=2, seq_len=seq_len)
    name = "SmolLM2-135M-Instruct (embedded default)" if model_name == "default" else model_name
    return model_dir, name, calib, evals


# ----------------------------------------------------------------------------------- compare


def _logit_diff(got, ref) -> tuple[float, float]:
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm()), float((got - ref).abs().max())


def _zero_points_equal_zero(model) -> int:
    from bitcliff.kernels.pack import unpack_qzeros
    from bitcliff.quant.qlinear import QuantLinear

    return sum(
        int((unpack_qzeros(m.qzeros, m.bits, m.out_features) == 0).sum())
        for m in model.modules()
        if isinstance(m, QuantLinear)
    )


def _dequantized(model) -> dict:
    import torch

    from bitcliff.quant.qlinear import QuantLinear

    return {n: m.dequantize(torch.float16) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _round_unquantized_like_peer(model) -> None:
    """Round the non-quantized float parameters (and quantized layers' biases) through fp16.

    GPTQModel's CPU kernel only runs in an fp16/bf16 model, so it loads embeddings, norms and
    head as fp16 whatever the checkpoint stores; bitcliff's reference sees the same values (a
    no-op for checkpoints whose unquantized tensors are fp16 already).
    """
    import torch

    from bitcliff.quant.qlinear import QuantLinear

    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.copy_(param.half().float())
        for module in model.modules():
            if isinstance(module, QuantLinear) and module.bias is not None:
                module.bias = module.bias.half().float()


def cross_read(folder: Path, eval_ids) -> dict:
    """Read ``folder`` with bitcliff and GPTQModel; compare dequantized weights and logits.

    Returns:
        dict with ``rel_l2``, ``max_abs`` (float32 logits), ``weight_max_abs`` (fp16 weights),
        ``fp16_rel_l2``/``fp16_max_abs`` (GPTQModel's native fp16 forward, information only),
        ``zeros_eq_0``, ``peer_kernel``, and ``error`` (a string, or None).
    """
    import torch

    import bitcliff

    result: dict = {"error": None}
    stored = json.loads((Path(folder) / "config.json").read_text())
    result["unquantized_dtype"] = stored.get("dtype") or stored.get("torch_dtype")
    bc = bitcliff.load(folder, dtype=torch.float32)
    _round_unquantized_like_peer(bc)
    with torch.no_grad():
        ref = bc(eval_ids).logits.float()
    bc_weights = _dequantized(bc)
    result["zeros_eq_0"] = _zero_points_equal_zero(bc)
    result["_bitcliff_weights"] = bc_weights
    del bc

    from gptqmodel import BACKEND, GPTQModel

    try:
        peer = GPTQModel.load(str(folder), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    except Exception as exc:  # the peer refusing the folder is a result, not a crash
        result["error"] = f"GPTQModel.load: {type(exc).__name__}: {exc}"
        return result
    modules = dict(peer.model.named_modules())
    missing = [name for name in bc_weights if name not in modules or not hasattr(modules[name], "dequantize_weight")]
    if missing:
        result["error"] = f"GPTQModel has no quantized layer for {', '.join(missing[:4])}"
        return result
    result["peer_kernel"] = sorted({type(modules[name]).__name__ for name in bc_weights})
    worst = 0.0
    for name, weight in bc_weights.items():
        theirs = modules[name].dequantize_weight().t().to(torch.float16)
        if theirs.shape != weight.shape:
            result["error"] = f"{name}: GPTQModel weight shape {tuple(theirs.shape)} != {tuple(weight.shape)}"
            return result
        worst = max(worst, float((theirs.float() - weight.float()).abs().max()))
    result["weight_max_abs"] = worst

    peer.model.float()
    with torch.no_grad():
        got = peer.model(eval_ids).logits
    result["rel_l2"], result["max_abs"] = _logit_diff(got, ref)
    peer.model.half()
    with torch.no_grad():
        got16 = peer.model(eval_ids).logits
    result["fp16_rel_l2"], result["fp16_max_abs"] = _logit_diff(got16, ref)
    del peer
    return result


PEER_V1_ASYM_POLICY = "only supported if produced by gptqmodel"  # GPTQModel's refusal message


def _verdict(row: dict) -> str:
    """PASS / FAIL, or REFUSED for a non-default format that GPTQModel declines by policy.

    GPTQModel (loader.py) refuses every v1 ``gptq`` checkpoint with ``sym=False`` unless its
    ``meta.quantizer`` names gptqmodel >= 0.9.0.  When bitcliff writes such a file only because
    it was asked to (not its default), that is the peer's documented limit, not a failure.
    """
    error = row.get("error") or ""
    if row["direction"] == "bitcliff->peer" and not row.get("default_format") and PEER_V1_ASYM_POLICY in error:
        return "REFUSED"
    ok = (
        row.get("error") is None
        and row.get("weight_max_abs", 1.0) <= WEIGHT_TOL
        and row.get("rel_l2", 1.0) <= REL_TOL
        and row.get("max_abs", 1.0) <= ABS_TOL
        and row.get("v1_vs_v2_weight_max_abs", 0.0) <= WEIGHT_TOL
    )
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------- directions


def bitcliff_to_peer(model_dir: Path, bits: int, sym: bool, group_size: int, work: Path, eval_ids) -> list[dict]:
    """RTN with bitcliff, save in every representable format, read back with both sides."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.quant.checkpoint import resolve_format

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    bitcliff.quantize(model, bitcliff.QuantConfig(bits=bits, group_size=group_size, sym=sym), progress=False)
    default_fmt = resolve_format("auto", sym)
    rows = []
    for fmt in ("gptq", "gptq_v2"):
        row = {"direction": "bitcliff->peer", "bits": bits, "sym": sym, "group_size": group_size,
               "checkpoint_format": fmt, "default_format": fmt == default_fmt}
        folder = work / f"bitcliff-w{bits}{'sym' if sym else 'asym'}-{fmt}"
        try:
            bitcliff.save(model, folder, tokenizer=tokenizer, overwrite=True, checkpoint_format=fmt)
        except ValueError as exc:  # v1 cannot hold a zero point of 0: not a row, a note
            print(f"  note: bitcliff.save(checkpoint_format={fmt!r}) refused: {exc}", flush=True)
            continue
        row.update(cross_read(folder, eval_ids))
        row.pop("_bitcliff_weights", None)
        row["verdict"] = _verdict(row)
        rows.append(row)
        _print_row(row)
    return rows


def mixed_to_peer(model_dir: Path, average_bits: float, calib_ids, work: Path, eval_ids) -> list[dict]:
    """Mixed precision with bitcliff (``quantize --avg-bits``: RTN, each module's bits and group
    size chosen by sensitivity on ``calib_ids``), saved in bitcliff's default format with the
    per-module settings in ``quantization_config["dynamic"]``, read back with both sides."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitcliff
    from bitcliff.quant.mixed import choose_widths

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    mixed = choose_widths(model, bitcliff.QuantConfig(), average_bits, calib_ids)
    bitcliff.quantize(model, mixed.config, progress=False)
    folder = work / f"bitcliff-mixed{average_bits:g}"
    bitcliff.save(model, folder, tokenizer=tokenizer, overwrite=True)
    fmt = json.loads((folder / "config.json").read_text())["quantization_config"]["checkpoint_format"]
    row = {"direction": "bitcliff->peer", "bits": f"mixed {mixed.average_bits:.2f}", "sym": False,
           "group_size": mixed.config.group_size, "checkpoint_format": fmt, "default_format": True,
           "settings": mixed.summary(), "dynamic_entries": len(mixed.config.module_widths)}
    row.update(cross_read(folder, eval_ids))
    row.pop("_bitcliff_weights", None)
    row["verdict"] = _verdict(row)
    _print_row(row)
    return [row]


def peer_to_bitcliff(
    model_dir: Path, bits: int, sym: bool, group_size: int, calib_ids, work: Path, eval_ids
) -> list[dict]:
    """GPTQ with GPTQModel, saved as v1 (its default) and as v2; read back with both sides."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization import FORMAT
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    calibration = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calib_ids]
    config = QuantizeConfig(
        bits=bits, group_size=group_size, sym=sym, desc_act=False, format=FORMAT.GPTQ, offload_to_disk=False
    )
    start = time.time()
    peer = GPTQModel.load(str(model_dir), config, device="cpu", dtype=torch.float16)
    peer.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    seconds = time.time() - start
    tag = f"w{bits}{'sym' if sym else 'asym'}"
    v1 = work / f"peer-{tag}-gptq"
    v2 = work / f"peer-{tag}-gptq_v2"
    for folder in (v1, v2):
        shutil.rmtree(folder, ignore_errors=True)
    peer.save(str(v1))
    converted = 0
    for module in peer.model.modules():  # GPTQModel's own v1 -> v2 conversion of the packed zeros
        if isinstance(module, BaseQuantLinear) and getattr(module, "REQUIRES_FORMAT_V2", False):
            convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
            converted += 1
    if not converted:
        raise RuntimeError("GPTQModel produced no v2-convertible quantized layers to save as gptq_v2")
    peer.quantize_config.format = FORMAT.GPTQ_V2
    peer.save(str(v2))
    del peer

    rows = []
    weights = {}
    for fmt, folder in (("gptq", v1), ("gptq_v2", v2)):
        written = json.loads((folder / "config.json").read_text())["quantization_config"]
        row = {"direction": "peer->bitcliff", "bits": bits, "sym": sym, "group_size": group_size,
               "checkpoint_format": fmt, "default_format": fmt == "gptq",
               "written_checkpoint_format": written.get("checkpoint_format"),
               "peer_quantize_seconds": round(seconds, 1)}
        try:
            row.update(cross_read(folder, eval_ids))
        except Exception as exc:  # bitcliff refusing the peer's folder is a result too
            row["error"] = f"bitcliff.load: {type(exc).__name__}: {exc}"
        weights[fmt] = row.pop("_bitcliff_weights", None)
        rows.append(row)
    if weights.get("gptq") and weights.get("gptq_v2"):
        rows[0]["v1_vs_v2_weight_max_abs"] = max(
            float((weights["gptq"][n].float() - weights["gptq_v2"][n].float()).abs().max()) for n in weights["gptq"]
        )
    for row in rows:
        row["verdict"] = _verdict(row)
        _print_row(row)
    return rows


# ----------------------------------------------------------------------------------- report

_COLUMNS = ("direction", "bits", "sym", "format", "zeros=0", "weights", "rel L2", "max abs",
            "fp16 rel", "tolerance", "result")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2e}" if isinstance(x, float) else str(x)


def _cells(row: dict) -> list[str]:
    fmt = row["checkpoint_format"] + ("*" if row.get("default_format") else "")
    weights = row.get("weight_max_abs")
    weights = "-" if weights is None else ("exact" if weights == 0 else f"{weights:.1e}")
    if "v1_vs_v2_weight_max_abs" in row:
        weights += " (v1=v2)" if row["v1_vs_v2_weight_max_abs"] == 0 else " (v1!=v2)"
    return [row["direction"], str(row["bits"]), "sym" if row["sym"] else "asym", fmt, _fmt(row.get("zeros_eq_0")),
            weights, _fmt(row.get("rel_l2")), _fmt(row.get("max_abs")), _fmt(row.get("fp16_rel_l2")),
            f"rel<={REL_TOL:g}, abs<={ABS_TOL:g}", row["verdict"]]


def _print_row(row: dict) -> None:
    print("  " + " | ".join(_cells(row)) + (f"\n    error: {row['error']}" if row.get("error") else ""), flush=True)


def format_table(rows: list[dict]) -> str:
    cells = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    errors = [f"{r['direction']} w{r['bits']} {'sym' if r['sym'] else 'asym'} {r['checkpoint_format']}: {r['error']}"
              for r in rows if r.get("error")]
    notes = ["* = the format that side writes by default; zeros=0: zero points equal to 0 as bitcliff reads them;",
             "weights = max |dequantized fp16 weight difference| (v1=v2: bitcliff reads both files alike);",
             "rel L2 / max abs: float32 logits; fp16 rel: GPTQModel's native fp16 forward (information only)."]
    return "\n".join(lines + notes + (["errors:"] + errors if errors else []))


def _versions() -> dict:
    import gptqmodel
    import torch
    import transformers

    import bitcliff

    return {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "bitcliff": bitcliff.__version__,
            "python": sys.version.split()[0]}


def _parse_settings(text: str) -> list[tuple[int, bool]]:
    settings = []
    for item in text.split(","):
        bits, _, kind = item.strip().partition(":")
        if bits not in ("2", "3", "4") or kind not in ("sym", "asym"):
            raise argparse.ArgumentTypeError(f"setting {item!r}: expected BITS:sym or BITS:asym with BITS in 2,3,4")
        settings.append((int(bits), kind == "sym"))
    return settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.peer_gptqmodel", description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", help="python of an environment with gptqmodel; re-runs this script there")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M), 'tiny', or a model folder")
    parser.add_argument("--settings", type=_parse_settings, default=ALL_SETTINGS,
                        help="comma list of BITS:sym|asym (default: all six)")
    parser.add_argument("--directions", default="bitcliff->peer,peer->bitcliff,mixed->peer")
    parser.add_argument("--avg-bits", type=float, default=3.5, help="mixed->peer: the average bits per weight")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results ('' for nowhere)")
    parser.add_argument("--work-dir", help="keep the checkpoints here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)

    if args.peer_python:
        from bitcliff.cli.common import without_option

        rest = without_option(argv, "--peer-python")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        return subprocess.call([args.peer_python, "-m", "bench.peer_gptqmodel", *rest], cwd=REPO, env=env)

    _setup_peer_env()
    if not peer_available():
        print("gptqmodel is not installed here: pass --peer-python PATH (see this module's docstring for "
              "the install recipe)", file=sys.stderr)
        return 2
    import torch

    torch.manual_seed(0)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="peer-gptqmodel-"))
    work.mkdir(parents=True, exist_ok=True)
    directions = [d.strip() for d in args.directions.split(",")]
    rows: list[dict] = []
    try:
        model_dir, model_desc, calib, evals = prepare_inputs(args.model, work, args.calib_samples, args.seq_len)
        print(f"model: {model_desc}; group size {args.group_size}; eval ids {tuple(evals.shape)}; "
              f"GPTQ calibration {tuple(calib.shape)}", flush=True)
        if "bitcliff->peer" in directions:
            for bits, sym in args.settings:
                print(f"bitcliff->peer w{bits} {'sym' if sym else 'asym'}", flush=True)
                rows += bitcliff_to_peer(model_dir, bits, sym, args.group_size, work, evals)
        if "mixed->peer" in directions:
            print(f"mixed->peer: bitcliff quantize --avg-bits {args.avg_bits:g} (RTN)", flush=True)
            rows += mixed_to_peer(model_dir, args.avg_bits, calib, work, evals)
        if "peer->bitcliff" in directions:
            for bits, sym in args.settings:
                print(f"peer->bitcliff w{bits} {'sym' if sym else 'asym'} (GPTQ)", flush=True)
                rows += peer_to_bitcliff(model_dir, bits, sym, args.group_size, calib, work, evals)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(format_table(rows))
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "model": model_desc,
            "group_size": args.group_size,
            "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len},
            "eval_ids_shape": list(evals.shape),
            "tolerance": {"logits_rel_l2": REL_TOL, "logits_max_abs": ABS_TOL, "weights_max_abs": WEIGHT_TOL,
                          "note": "float32 logits on both sides; fp16_* fields are information only"},
            "rows": rows,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    refused = [r for r in rows if r["verdict"] == "REFUSED"]
    print(f"{len(rows) - len(failed) - len(refused)}/{len(rows)} PASS, {len(failed)} FAIL, "
          f"{len(refused)} REFUSED (non-default format the peer declines by policy)")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
