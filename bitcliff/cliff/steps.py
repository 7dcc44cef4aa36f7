"""The main job's steps, each computed from the run folder and what the steps it needs returned.

A step reads the checkpoints and diagnoses earlier steps wrote into the run folder and returns
a small JSON-able result, so that any process that holds a :class:`Job` can compute it (see
:mod:`bitcliff.cliff.schedule`).  Steps of a width ``b`` and group size ``g``:

* ``rtn-w{b}``: RTN, evaluated;
* ``gptq-w{b}``: GPTQ, saved to ``gptq-w{b}g{g}/``, evaluated as read back;
* ``diagnosis-w{b}``: that checkpoint diagnosed into ``gptq-w{b}g{g}-diagnosis/``;
* ``repair-w{b}``: repaired at the budget its diagnosis plans for, into ``gptq-w{b}g{g}-repaired/``,
  evaluated as read back;

and ``fp`` (the full-precision evaluation) before them, ``continuations`` after them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from bitcliff.cliff.schedule import Step
from bitcliff.device import peak_memory, reset_peak_memory
from bitcliff.storage import folder_digest

PROMPT = "The history of the printing press began in"
NEW_TOKENS = 24


@dataclass
class Job:
    """What every step reads, made once per process: the settings, the run folder, the device,
    the full-precision model and tokenizer, the text and its windows."""

    settings: object  # CliffSettings
    out: Path
    device: torch.device
    fp_model: torch.nn.Module
    tokenizer: object
    text: str
    eval_ids: torch.Tensor
    calib: torch.Tensor
    progress: bool = True

    @classmethod
    def open(cls, settings, out: Path, device: torch.device, progress: bool = True) -> "Job":
        from bitcliff.assets import load_text
        from bitcliff.data import calibration_windows, evaluation_windows
        from bitcliff.models import load_fp_model

        fp_model, tokenizer, _ = load_fp_model(settings.model, device=device)
        text = load_text(settings.text)
        return cls(settings, Path(out), device, fp_model, tokenizer, text,
                   evaluation_windows(tokenizer, text, settings.windows, 512),
                   calibration_windows(tokenizer, text, max(settings.calib_samples, settings.repair_calib), 512),
                   progress)

    def load(self, folder: Path):
        import bitcliff

        return bitcliff.load(folder, device=self.device)

    def folder(self, bits: int, kind: str = "") -> Path:
        """``gptq-w3g64``, or with ``kind`` ``gptq-w3g64-diagnosis`` / ``-repaired``."""
        name = f"gptq-w{bits}g{self.settings.group_size}"
        return self.out / (f"{name}-{kind}" if kind else name)

    @cached_property
    def reference(self):
        """The full-precision model's predictions on the evaluation windows
        (``divergence.ReferencePredictions``), computed once per process."""
        from bitcliff.divergence import reference_predictions

        return reference_predictions(self.fp_model, self.eval_ids, progress=False)

    def evaluate(self, model) -> dict:
        """Perplexity, and KL divergence and same-top agreement against the full-precision model,
        in one forward per window."""
        from bitcliff.divergence import evaluate_with_reference, headline

        result = evaluate_with_reference(model, self.reference, progress=False)
        return {"ppl": result["ppl"], "mean_nll": result["mean_nll"], **headline(result)}


#: The folder each kind of step writes (``Job.folder``'s ``kind``); its digest is kept with the
#: step's result, so that a resumed run computes again a step whose folder was deleted or changed.
STEP_FOLDERS = {"gptq": "", "diagnosis": "diagnosis", "repair": "repaired"}


def outputs_intact(out: Path, result: dict) -> bool:
    """Whether the folders a finished step wrote are still in ``out`` as it wrote them."""
    return all((out / name).is_dir() and folder_digest(out / name) == digest
               for name, digest in result.get("outputs", {}).items())


def job_steps(bits: tuple[int, ...]) -> list[Step]:
    """The steps after ``fp`` and before ``continuations``, in the order one process runs them."""
    steps = []
    for b in bits:
        steps += [Step(f"rtn-w{b}"), Step(f"gptq-w{b}"), Step(f"diagnosis-w{b}", (f"gptq-w{b}",)),
                  Step(f"repair-w{b}", ("fp", f"gptq-w{b}", f"diagnosis-w{b}"))]
    return steps


def compute(job: Job, name: str, done: dict[str, dict]) -> dict:
    """The result of step ``name``, with its wall ``seconds`` (and ``peak_gpu_gib`` on a GPU)."""
    kind, _, width = name.partition("-w")
    work = {"fp": _fp, "rtn": _rtn, "gptq": _gptq, "diagnosis": _diagnosis, "repair": _repair,
            "continuations": _continuations}.get(kind)
    if work is None:
        raise ValueError(f"unknown step {name!r}")
    reset_peak_memory(job.device)
    start = time.perf_counter()
    result = work(job, int(width), done) if width else work(job, done)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if kind in STEP_FOLDERS and job.folder(int(width), STEP_FOLDERS[kind]).is_dir():
        folder = job.folder(int(width), STEP_FOLDERS[kind])
        result["outputs"] = {folder.name: folder_digest(folder)}
    peak = peak_memory(job.device)
    if peak is not None:
        result["peak_gpu_gib"] = round(peak / 2**30, 2)
    return result


def _fp(job: Job, done: dict) -> dict:
    from bitcliff.divergence import reference_perplexity

    result = reference_perplexity(job.reference)  # the reference's forward passes are the fp evaluation
    return {"ppl": result["ppl"], "mean_nll": result["mean_nll"]}


def _rtn(job: Job, bits: int, done: dict) -> dict:
    import bitcliff
    from bitcliff.quant.config import QuantConfig

    config = QuantConfig(bits=bits, group_size=job.settings.group_size)
    return job.evaluate(bitcliff.quantize(copy.deepcopy(job.fp_model), config, progress=False))


def _gptq(job: Job, bits: int, done: dict) -> dict:
    import bitcliff
    from bitcliff.quant.config import QuantConfig

    config = QuantConfig(bits=bits, group_size=job.settings.group_size, method="gptq",
                         calib_samples=job.settings.calib_samples)
    model = bitcliff.quantize(copy.deepcopy(job.fp_model), config, calib_ids=job.calib[: job.settings.calib_samples],
                              progress=job.progress)
    folder = job.folder(bits)
    bitcliff.save(model, folder, tokenizer=job.tokenizer, overwrite=True)
    return {**job.evaluate(job.load(folder)), "checkpoint": folder.name}


def _diagnosis(job: Job, bits: int, done: dict) -> dict:
    import bitcliff
    from bitcliff.data import evaluation_windows
    from bitcliff.diagnosis.run import DiagnoseOptions

    settings, folder = job.settings, job.folder(bits, "diagnosis")
    examples = evaluation_windows(job.tokenizer, job.text, settings.diagnosis_examples, 256)
    options = DiagnoseOptions(trace_examples=settings.trace_examples, patch_examples=0, capture_examples=1)
    report = bitcliff.diagnose(job.fp_model, job.load(job.folder(bits)), examples, options=options,
                               name=job.folder(bits).name, progress=job.progress)
    report.save(folder, overwrite=True)
    verdict = report.verdict
    return {"label": verdict.label, "agreement": verdict.agreement, "headline": verdict.headline(),
            "evidence": verdict.evidence[:3], "report": f"{folder.name}/report.html"}


def _repair(job: Job, bits: int, done: dict) -> dict:
    from bitcliff.divergence import HEADLINE
    from bitcliff.repairs.run import diagnose_and_repair

    settings, gptq, repaired = job.settings, done[f"gptq-w{bits}"], job.folder(bits, "repaired")
    outcome = diagnose_and_repair(
        job.fp_model, job.load(job.folder(bits)), job.calib[: settings.repair_calib], settings.budget,
        diagnosis=json.loads((job.folder(bits, "diagnosis") / "diagnosis.json").read_text()),
        known_ppl={"fp": done["fp"]["ppl"], "quantized": gptq["ppl"]}, reference=job.reference, out=repaired,
        tokenizer=job.tokenizer, overwrite=True, progress=job.progress)
    plan = outcome.plan
    if outcome.result is None:  # nothing repaired: the GPTQ model's figures stand
        return {"ppl": gptq["ppl"], "bits_spent": 0.0, "methods": [], "reasons": plan.reasons, "recovery": 0.0,
                **{key: gptq[key] for key in HEADLINE if key in gptq}}
    return {"ppl": outcome.ppl["repaired"], "bits_spent": outcome.result.bits_per_weight,
            "methods": list(plan.methods), "reasons": plan.reasons, "checkpoint": repaired.name,
            "recovery": outcome.recovery, **outcome.divergence["repaired"]}


@torch.inference_mode()
def continuation(model, tokenizer, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS) -> str:
    """The greedy continuation of ``prompt`` (``new_tokens`` tokens, decoded)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _continuations(job: Job, done: dict) -> dict:
    bits = job.settings.bits
    texts = {"FP": continuation(job.fp_model, job.tokenizer)}
    for b in bits:
        texts[f"W{b} GPTQ"] = continuation(job.load(job.out / done[f"gptq-w{b}"]["checkpoint"]), job.tokenizer)
    low = min(bits)
    if done[f"repair-w{low}"].get("checkpoint"):
        texts[f"W{low} repaired"] = continuation(job.load(job.out / done[f"repair-w{low}"]["checkpoint"]),
                                                 job.tokenizer)
    return {"prompt": PROMPT, "texts": texts}


# -- in a worker process (bitcliff.cliff.schedule) ---------------------------------------------

_WORKER_JOB: Job | None = None


def start_worker(settings, out: str, device: str) -> None:
    """A worker's initializer: its :class:`Job` (no progress bars: the parent shows the steps)."""
    from transformers.utils import logging as transformers_logging

    global _WORKER_JOB
    transformers_logging.disable_progress_bar()
    _WORKER_JOB = Job.open(settings, Path(out), torch.device(device), progress=False)


def compute_in_worker(name: str, done: dict[str, dict]) -> dict:
    """:func:`compute` on the worker's job."""
    if _WORKER_JOB is None:
        raise RuntimeError("compute_in_worker runs in a worker started with start_worker")
    return compute(_WORKER_JOB, name, done)
