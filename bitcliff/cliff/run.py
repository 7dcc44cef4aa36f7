"""The main job: the 4 -> 3 -> 2-bit cliff of one model, why it happens, and what repair buys.

For every width: RTN and GPTQ (bitcliff's best settings), each evaluated; the GPTQ model
diagnosed (signal degradation or computation collapse); repaired at the budget the diagnosis
plans for; evaluated again.  Then one greedy continuation of a fixed prompt per setting, so the
cliff can be read as well as measured.  Everything lands in one run folder:

* ``state.json``: the settings and every finished step's result.  Running the same command again
  reuses the finished steps (an interrupted run resumes); other settings in the same folder are
  refused, never mixed.
* ``gptq-w3g64/``, ``gptq-w3g64-repaired/``: the checkpoints (``bitcliff.load`` reads them);
  ``gptq-w3g64-diagnosis/``: the diagnosis (``report.html``).
* ``cliff.json`` and ``report.html`` (:mod:`bitcliff.cliff.report`), rewritten at the end.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitcliff import numerics
from bitcliff.device import describe, peak_memory, reset_peak_memory, resolve_device
from bitcliff.storage import (
    MANIFEST,
    OccupiedOutputError,
    check_replaceable,
    write_json,
    write_manifest,
)

STATE_FILE = "state.json"
PROMPT = "The history of the printing press began in"
NEW_TOKENS = 24


@dataclass(frozen=True)
class CliffSettings:
    """What a cliff run measures; a run folder holds the steps of one settings only.

    Attributes:
        model: the full-precision model (name or folder).
        bits: the widths, e.g. ``(4, 3, 2)``.
        group_size: group size of every quantization.
        budget: extra bits per weight for the repair.
        text: calibration and evaluation text.
        windows: evaluation windows (512 tokens).
        calib_samples: calibration windows for GPTQ: 32, half of ``bitcliff quantize``'s 64, to bring
            the run towards 15 minutes on 2 CPU cores, in half the time for a perplexity change
            measured in docs/results_gptq.md.
        repair_calib: calibration windows for the repair: 16, for the same reason: 0.56x the time of 32
            windows, at the perplexity cost measured in docs/repair.md.
        diagnosis_examples: examples (256 tokens) the diagnosis runs on, and ``trace_examples`` of
            them traced; no activation patching (it does not vote on the verdict).
    """

    model: str = "default"
    bits: tuple[int, ...] = (4, 3, 2)
    group_size: int = 64
    budget: float = 0.25
    text: str = "wiki"
    windows: int = 16
    calib_samples: int = 32
    repair_calib: int = 16
    diagnosis_examples: int = 16
    trace_examples: int = 4

    def __post_init__(self) -> None:
        from bitcliff.quant.config import QuantConfig

        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits must be distinct widths, got {self.bits}")
        for bits in self.bits:
            QuantConfig(bits=bits, group_size=self.group_size)  # names a bad width or group size
        if not (self.budget >= 0 and self.budget == self.budget):
            raise ValueError(f"budget must be a number of bits per weight >= 0, got {self.budget}")
        for key in ("windows", "calib_samples", "repair_calib", "diagnosis_examples", "trace_examples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.diagnosis_examples < 3:
            raise ValueError(f"diagnosis_examples must be at least 3, got {self.diagnosis_examples}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bits"] = list(self.bits)
        return data


@dataclass
class StepStore:
    """The finished steps of a run folder (``state.json``), written after every step."""

    folder: Path
    settings: dict
    steps: dict = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, settings: dict, restart: bool = False) -> "StepStore":
        """Resume the run in ``folder`` or start one.

        Raises:
            ValueError: the folder holds a run with other settings (named), unless ``restart``.
            OccupiedOutputError: the folder holds files that are not a bitcliff cliff run.
        """
        state = folder / STATE_FILE
        if folder.exists() and any(folder.iterdir()):
            if not state.is_file():
                raise OccupiedOutputError(f"{folder} holds files but no {STATE_FILE}: it is not a cliff run, so it is "
                                          "left alone; choose another --out")
            saved = json.loads(state.read_text())
            if restart:
                _remove_run(folder)
            elif saved.get("settings") != settings:
                old = saved.get("settings", {})
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ValueError(f"{folder} holds a run with other settings ({', '.join(diff)}); pass --restart to "
                                 "discard it, or choose another --out")
            else:
                return cls(folder, settings, saved.get("steps", {}))
        folder.mkdir(parents=True, exist_ok=True)
        store = cls(folder, settings)
        store.save()
        return store

    def get(self, name: str):
        return self.steps.get(name)

    def put(self, name: str, result) -> None:
        self.steps[name] = result
        self.save()

    def save(self) -> None:
        write_json(self.folder / STATE_FILE, {"settings": self.settings, "steps": self.steps})


def _remove_run(folder: Path) -> None:
    """Delete a previous cliff run: only files bitcliff wrote (its state, and folders with manifests)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            check_replaceable(entry, overwrite=True)  # raises, naming a user's file
            shutil.rmtree(entry)
        elif entry.name in (STATE_FILE, MANIFEST, "cliff.json", "report.html") or entry.name.startswith("."):
            entry.unlink()
        else:
            raise OccupiedOutputError(f"{folder} holds {entry.name}, which bitcliff did not write; nothing was removed")


@torch.inference_mode()
def continuation(model, tokenizer, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> str:
    """The greedy continuation of ``prompt`` (``new_tokens`` tokens, decoded)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_cliff(settings: CliffSettings, out: Path, restart: bool = False, progress: bool = True,
              device: str | torch.device = "cpu") -> dict:
    """Run (or resume) the cliff in ``out`` on ``device``; returns the summary written to ``cliff.json``.

    A run on a GPU computes in half precision, so its numbers are not the CPU's: the run folder
    records the device's kind and dtype, and a folder holding a CPU run is not resumed on a GPU.
    """
    import bitcliff
    from bitcliff.assets import load_text
    from bitcliff.cliff.report import write_report
    from bitcliff.data import calibration_windows, evaluation_windows
    from bitcliff.diagnosis.run import DiagnoseOptions
    from bitcliff.eval import evaluate_ppl
    from bitcliff.models import load_fp_model, model_fingerprint
    from bitcliff.quant.config import QuantConfig
    from bitcliff.repairs.run import diagnose_and_repair

    device = resolve_device(device)
    fp_model, tokenizer, _ = load_fp_model(settings.model, device=device)
    identity = {**settings.to_dict(), "model_fingerprint": model_fingerprint(fp_model, digits=16)}
    dtype = next(fp_model.parameters()).dtype
    if device.type != "cpu":  # the CPU's fp32 is the protocol's reference (and what older run folders hold)
        identity["compute"] = f"{device.type} {dtype}"

    def load(folder: Path):
        return bitcliff.load(folder, device=device)
    store = StepStore.open(Path(out), identity, restart)
    text = load_text(settings.text)
    eval_ids = evaluation_windows(tokenizer, text, settings.windows, 512)
    calib = calibration_windows(tokenizer, text, max(settings.calib_samples, settings.repair_calib), 512)
    k = fp_model.config.hidden_size
    steps = ["fp"] + [f"{kind}-w{b}" for b in settings.bits for kind in ("rtn", "gptq", "diagnosis", "repair")]
    bar = tqdm(total=len(steps) + 1, desc="cliff", unit="step", disable=not progress)

    def step(name: str, compute):
        result = store.get(name)
        if result is None:
            reset_peak_memory(device)
            start = time.perf_counter()
            result = compute()
            result["seconds"] = round(time.perf_counter() - start, 1)
            peak = peak_memory(device)
            if peak is not None:
                result["peak_gpu_gib"] = round(peak / 2**30, 2)
            store.put(name, result)
        bar.update()
        return result

    def evaluate(model) -> dict:
        result = evaluate_ppl(model, eval_ids, progress=False)
        return {"ppl": result["ppl"], "mean_nll": result["mean_nll"]}

    fp = step("fp", lambda: evaluate(fp_model))
    widths = {}
    for bits in settings.bits:
        rtn_config = QuantConfig(bits=bits, group_size=settings.group_size)
        gptq_config = QuantConfig(bits=bits, group_size=settings.group_size, method="gptq",
                                  calib_samples=settings.calib_samples)
        gptq_dir = Path(out) / f"gptq-w{bits}g{settings.group_size}"
        diag_dir = Path(out) / f"{gptq_dir.name}-diagnosis"
        repaired_dir = Path(out) / f"{gptq_dir.name}-repaired"

        rtn = step(f"rtn-w{bits}", lambda: evaluate(bitcliff.quantize(copy.deepcopy(fp_model), rtn_config,
                                                                      progress=False)))

        def quantize_gptq():
            model = bitcliff.quantize(copy.deepcopy(fp_model), gptq_config, calib_ids=calib[: settings.calib_samples],
                                      progress=progress)
            bitcliff.save(model, gptq_dir, tokenizer=tokenizer, overwrite=True)
            return {**evaluate(load(gptq_dir)), "checkpoint": gptq_dir.name}

        gptq = step(f"gptq-w{bits}", quantize_gptq)

        def diagnose():
            q_model = load(gptq_dir)
            examples = evaluation_windows(tokenizer, text, settings.diagnosis_examples, 256)
            options = DiagnoseOptions(trace_examples=settings.trace_examples, patch_examples=0, capture_examples=1)
            report = bitcliff.diagnose(fp_model, q_model, examples, options=options, name=gptq_dir.name,
                                       progress=progress)
            report.save(diag_dir, overwrite=True)
            verdict = report.verdict
            return {"label": verdict.label, "agreement": verdict.agreement, "headline": verdict.headline(),
                    "evidence": verdict.evidence[:3], "report": f"{diag_dir.name}/report.html"}

        diagnosis = step(f"diagnosis-w{bits}", diagnose)

        def repair():
            outcome = diagnose_and_repair(
                fp_model, load(gptq_dir), calib[: settings.repair_calib], settings.budget,
                diagnosis=json.loads((diag_dir / "diagnosis.json").read_text()), eval_ids=eval_ids,
                known_ppl={"fp": fp["ppl"], "quantized": gptq["ppl"]}, out=repaired_dir, tokenizer=tokenizer,
                overwrite=True, progress=progress)
            plan = outcome.plan
            if outcome.result is None:
                return {"ppl": gptq["ppl"], "bits_spent": 0.0, "methods": [], "reasons": plan.reasons,
                        "recovery": 0.0}
            return {"ppl": outcome.ppl["repaired"], "bits_spent": outcome.result.bits_per_weight,
                    "methods": list(plan.methods), "reasons": plan.reasons, "checkpoint": repaired_dir.name,
                    "recovery": outcome.recovery}

        repaired = step(f"repair-w{bits}", repair)
        widths[bits] = {"bits": bits, "effective_bits": rtn_config.effective_bits(k), "rtn": rtn, "gptq": gptq,
                        "diagnosis": diagnosis, "repair": repaired}

    def continuations():
        texts = {"FP": continuation(fp_model, tokenizer)}
        for bits in settings.bits:
            texts[f"W{bits} GPTQ"] = continuation(load(Path(out) / widths[bits]["gptq"]["checkpoint"]), tokenizer)
        low = min(settings.bits)
        if widths[low]["repair"].get("checkpoint"):
            texts[f"W{low} repaired"] = continuation(load(Path(out) / widths[low]["repair"]["checkpoint"]), tokenizer)
        return {"prompt": PROMPT, "texts": texts}

    texts = step("continuations", continuations)
    bar.close()
    # The name the user gave (an embedded name, a folder, a hub id), not where the cache put it.
    parameters = sum(p.numel() for p in fp_model.parameters())
    name = f"{settings.model} ({fp_model.config.model_type}, {parameters / 1e6:.0f}M parameters)"
    summary = {"model": name, "settings": settings.to_dict(), "device": describe(device), "dtype": str(dtype),
               "cpu_paths": numerics.state(), "fp": fp, "widths": [widths[b] for b in settings.bits],
               "continuations": texts, "seconds": round(sum(s.get("seconds", 0) for s in store.steps.values()), 1)}
    write_json(Path(out) / "cliff.json", summary)
    write_report(summary, Path(out))
    write_manifest(Path(out), "cliff-run")
    return summary
