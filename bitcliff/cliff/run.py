"""The main job: the 4 -> 3 -> 2-bit cliff of one model, why it happens, and what repair buys.

For every width: RTN and GPTQ (bitcliff's best settings), each evaluated; the GPTQ model
diagnosed (signal degradation or computation collapse); repaired at the budget the diagnosis
plans for; evaluated again.  Then one greedy continuation of a fixed prompt per setting, so the
cliff can be read as well as measured.  The steps (:mod:`bitcliff.cliff.steps`) run in order, or
two at a time in worker processes on a CPU with two cores or more (:mod:`bitcliff.cliff.schedule`),
with the same numbers.  Everything lands in one run folder:

* ``state.json``: the settings and every finished step's result.  Running the same command again
  reuses the finished steps (an interrupted run resumes); other settings in the same folder are
  refused, never mixed.  The settings hold what the inputs contain, not only their names: the
  text's sha256 and a model folder's digest, so an edited ``--text-file`` or model folder is
  refused too.
* ``gptq-w3g64/``, ``gptq-w3g64-repaired/``: the checkpoints (``bitcliff.load`` reads them);
  ``gptq-w3g64-diagnosis/``: the diagnosis (``report.html``).
* ``cliff.json`` and ``report.html`` (:mod:`bitcliff.cliff.report`), rewritten at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitcliff import numerics
from bitcliff.cliff.schedule import Step, run_steps, usable_cores, worker_count
from bitcliff.cliff.steps import (
    Job,
    compute,
    compute_in_worker,
    job_steps,
    outputs_intact,
    start_worker,
)
from bitcliff.device import describe, resolve_device
from bitcliff.storage import (
    MANIFEST,
    OccupiedOutputError,
    check_replaceable,
    write_json,
    write_manifest,
)

STATE_FILE = "state.json"


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
        from bitcliff.repairs.plan import check_budget

        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"bits must be distinct widths, got {self.bits}")
        for bits in self.bits:
            QuantConfig(bits=bits, group_size=self.group_size)  # names a bad width or group size
        check_budget(self.budget)  # repair's own check: the same values pass both, inf and NaN neither
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
    def open(cls, folder: Path, settings: dict, restart: bool = False,
             adoptable: frozenset = frozenset()) -> "StepStore":
        """Resume the run in ``folder`` or start one.

        ``adoptable``: keys of ``settings`` that a run folder written before they were recorded
        may lack and still be resumed (they are added to it).

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
            else:
                old = saved.get("settings", {})
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)
                              and not (k in adoptable and k not in old))
                if diff:
                    unrecorded = [k for k in diff if k.endswith("_sha256") and k not in old]
                    why = (f"; it was written before its inputs' content was recorded ({', '.join(unrecorded)}), so its "
                           "results cannot be tied to them" if unrecorded
                           else "; the content of --text-file changed since" if "text_sha256" in diff
                           else "; the --model folder changed since" if "model_folder_sha256" in diff else "")
                    raise ValueError(f"{folder} holds a run with other settings ({', '.join(diff)}){why}; pass "
                                     "--restart to discard it, or choose another --out")
                store = cls(folder, settings, saved.get("steps", {}))
                if old != settings:
                    store.save()  # record the adopted fingerprints
                return store
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

    def drop_stale(self, steps: list[Step], progress: bool = True) -> list[str]:
        """Forget every finished step whose folder is gone or changed since it was written, with
        every step computed from it (and the continuations, which read every checkpoint); returns
        their names.  A run folder written before steps recorded their folders' digests holds
        none, so its steps are judged by their folders' presence."""
        stale = set()
        for name, result in self.steps.items():
            named = [result[key].split("/")[0] for key in ("checkpoint", "report") if isinstance(result.get(key), str)]
            if not outputs_intact(self.folder, result) or any(not (self.folder / f).is_dir() for f in named):
                stale.add(name)
        if not stale:
            return []
        needs = {s.name: set(s.needs) for s in steps}
        changed = True
        while changed:  # and whatever was computed from a stale step
            dependents = {n for n, wants in needs.items() if wants & stale and n not in stale}
            changed = bool(dependents)
            stale |= dependents
        stale = sorted((stale | {"continuations"}) & set(self.steps))
        if progress:
            print(f"computing again {', '.join(stale)}: a folder they wrote or read was deleted or changed "
                  f"in {self.folder}", file=sys.stderr)
        for name in stale:
            del self.steps[name]
        self.save()
        return stale


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


def input_fingerprints(settings: CliffSettings, text: str) -> dict:
    """What the inputs that can change under the same name hold, for the run's identity: the
    text's sha256 (``--text-file`` is a path) and, for a model given as a folder, the folder's
    digest (the input embeddings' fingerprint misses a fine-tune that leaves them alone).  A
    finished step is reused only when they are the same as when it was computed."""
    import hashlib
    import os

    from bitcliff.assets import MODEL_ALIASES, MODELS
    from bitcliff.storage import folder_digest

    prints = {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    key = settings.model.strip().lower()
    folder = Path(os.path.expanduser(settings.model))
    if MODEL_ALIASES.get(key, key) not in MODELS and folder.is_dir():
        prints["model_folder_sha256"] = folder_digest(folder)
    return prints


def _embedded_fingerprints(settings: CliffSettings) -> frozenset:
    """The fingerprints a run folder written before they were recorded may lack and still be
    resumed: those of an embedded text, whose cached file is checked against its recorded digest
    whenever it is read, so its name stands for its content."""
    from bitcliff.assets import TEXTS

    return frozenset({"text_sha256"}) if settings.text.strip().lower() in TEXTS else frozenset()


def run_cliff(settings: CliffSettings, out: Path, restart: bool = False, progress: bool = True,
              device: str | torch.device = "cpu", workers: int | None = None) -> dict:
    """Run (or resume) the cliff in ``out`` on ``device``; returns the summary written to ``cliff.json``.

    ``workers``: steps computed at once (:mod:`bitcliff.cliff.schedule`; None: two on a CPU with
    two cores or more, one on a GPU).  The full-precision evaluation runs alone first, on every
    core: it is the unit the job's time is measured in.

    A run on a GPU computes in half precision, so its numbers are not the CPU's: the run folder
    records the device's kind and dtype, and a folder holding a CPU run is not resumed on a GPU.
    """
    from bitcliff.cliff.report import write_report
    from bitcliff.models import model_fingerprint
    from bitcliff.quant.config import QuantConfig

    device = resolve_device(device)
    job = Job.open(settings, out, device, progress)
    fp_model = job.fp_model
    identity = {**settings.to_dict(), "model_fingerprint": model_fingerprint(fp_model, digits=16),
                **input_fingerprints(settings, job.text)}
    dtype = next(fp_model.parameters()).dtype
    if device.type != "cpu":  # the CPU's fp32 is the protocol's reference (and what older run folders hold)
        identity["compute"] = f"{device.type} {dtype}"
    store = StepStore.open(Path(out), identity, restart, adoptable=_embedded_fingerprints(settings))
    middle = job_steps(settings.bits)
    store.drop_stale(middle, progress)
    bar = tqdm(total=len(middle) + 3, desc="cliff", unit="step", disable=not progress)
    bar.update(sum(name in store.steps for name in ["fp", *(s.name for s in middle)]))
    done = dict(store.steps)

    def record(name: str, result: dict) -> None:
        store.put(name, result)
        bar.update()

    if "fp" not in done:
        done["fp"] = compute(job, "fp", done)
        record("fp", done["fp"])
    if workers is None:
        workers = worker_count(device, sum(s.name not in done for s in middle))
    threads = max(1, usable_cores() // workers)
    here = lambda name, have: compute(job, name, have)  # noqa: E731
    run_steps(middle, done, compute_in_worker if workers > 1 else here, record, workers=workers,
              initializer=start_worker, initargs=(settings, str(out), str(device)), threads=threads)
    if "continuations" not in done:
        done["continuations"] = compute(job, "continuations", done)
        record("continuations", done["continuations"])
    bar.close()
    k = job.fp_model.config.hidden_size
    widths = [{"bits": b, "effective_bits": QuantConfig(bits=b, group_size=settings.group_size).effective_bits(k),
               "rtn": done[f"rtn-w{b}"], "gptq": done[f"gptq-w{b}"], "diagnosis": done[f"diagnosis-w{b}"],
               "repair": done[f"repair-w{b}"]} for b in settings.bits]
    # The name the user gave (an embedded name, a folder, a hub id), not where the cache put it.
    parameters = sum(p.numel() for p in job.fp_model.parameters())
    name = f"{settings.model} ({job.fp_model.config.model_type}, {parameters / 1e6:.0f}M parameters)"
    summary = {"model": name, "settings": settings.to_dict(), "device": describe(device), "dtype": str(dtype),
               "cpu_paths": numerics.state(), "workers": workers, "fp": done["fp"], "widths": widths,
               "continuations": done["continuations"],
               "seconds": round(sum(s.get("seconds", 0) for s in store.steps.values()), 1)}
    write_json(Path(out) / "cliff.json", summary)
    write_report(summary, Path(out))
    write_manifest(Path(out), "cliff-run")
    return summary
