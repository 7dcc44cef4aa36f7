"""The GPU check: correctness compiled on CUDA, sanitizers, kernel and decode benchmarks, sized to a lease.

    bench/gpu_check.sh --dry-run              # on any machine: check the plan (CI runs this)
    bench/gpu_check.sh first                  # on the GPU: tests + sanitizers   (command 1 of 2)
    bench/gpu_check.sh second                 # on the GPU: kernel + decode bench (command 2 of 2)
    bench/gpu_check.sh tests kernels ...      # any stages, in order

A lent GPU machine gives minutes, not hours: 15 minutes of device time per session (its start
included), at most 10 a command, eight files back of at most 16 MiB each, two folders deep, and no
network.  So the check is cut into stages with a time limit each, planned as two commands that
each end well inside the command limit with one rerun left in the budget (:data:`COMMANDS`,
:func:`time_plan`).  Every stage writes its log; at the end everything (logs, result JSON, the
tuning cache) goes into one archive beside one summary JSON, and the main result files are copied
beside them: at most :data:`MAX_FILES` files, none deeper than the output folder itself.

Caches never live under the output folder: ``BITCLIFF_CACHE`` and Triton's cache go to a scratch
folder.  The machine may be an H100 or an H200 (``bench/devices.py``): the check reads the device
name at run time and seeds the bitcliff tuning cache with that device's file of
``bench/results/tuning-seed/`` (the static model's ordering of each shape's admissible
candidates, ``bench/sass_model.py --seed-cache``), so that no stage tunes over every candidate: the
launcher measures only the few each seed entry orders.  The summary records the device and the
ceilings the model assumed for it.  The commit comes from ``BITCLIFF_COMMIT`` (the copy of the
tree on the GPU machine has no git history).
GemLite, the peer, is installed from a wheel carried in ``.whl/`` when one is there.

``--dry-run`` runs on the CPU: it checks every path and module the stages use, every third-party
module they import against the GPU machine's package list (``bench/gpu_machine_packages.txt``),
a seed and predictions for every device the machine may be, the files the run would return, and
the time plan; it exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.devices import DEVICES, device_for, slug

ROOT = Path(__file__).resolve().parents[1]

#: The lease, in seconds (the device tool's limits).
BUDGET_S = 15 * 60
COMMAND_LIMIT_S = 10 * 60
START_S = 120  # a machine's start, counted in the budget (a minute or two)
MAX_FILES, MAX_DEPTH = 8, 2
SEED = Path("bench/results/tuning-seed")
PREDICTIONS = Path("bench/results")  # sass-<date>.json, the newest read by bench/kernels.py
WHEELS = Path(".whl")


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]  # run from the repository root; "{py}" is the Python, "{out}" the work folder
    limit_s: int
    paths: tuple[str, ...] = ()  # files and folders the stage needs
    entry: tuple[str, ...] = ()  # python files whose imports must be available there


STAGES = {
    "env": Stage("env", ("{py}", "-m", "bench.gpu_check", "--env"), 30, entry=("bench/gpu_check.py",)),
    # The kernel tests compiled on CUDA (with the capture tests that run them) and the engine's cuda
    # tests (quantize, evaluate, diagnose, repair and the main job's steps on the GPU), eight processes.
    "tests": Stage(
        "tests",
        ("{py}", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "8", "tests/kernels",
         "tests/diagnosis/test_capture.py", "tests/test_cuda.py"),
        150, paths=("tests/kernels", "tests/diagnosis/test_capture.py", "tests/test_cuda.py", "tests/conftest.py"),
        entry=("tests/conftest.py", "tests/kernels/conftest.py", "tests/kernels/test_qmatmul.py",
               "tests/kernels/test_kernel_ops.py", "tests/diagnosis/test_capture.py", "tests/test_cuda.py")),
    "sanitize": Stage(
        "sanitize", ("{py}", "-m", "bench.gpu_check", "--sanitize"), 75,
        paths=("bench/sanitize_kernels.py",), entry=("bench/sanitize_kernels.py",)),
    # Two Llama-3-8B shapes: every variant compiles once (a second or two each) within the limit.
    "kernels": Stage(
        "kernels", ("{py}", "-m", "bench.kernels", "--shapes", "4096x4096", "4096x14336", "--out", "{out}"), 150,
        paths=("bench/kernels.py",), entry=("bench/kernels.py",)),
    "decode": Stage(
        "decode", ("{py}", "-m", "bench.decode", "--model", "random", "llama3-8b-layers",
                   "--new-tokens", "64", "--reps", "3", "--out", "{out}"), 75,
        paths=("bench/decode.py",), entry=("bench/decode.py",)),
}
#: Two commands, each of stages whose limits add up to well inside one command's limit.
COMMANDS = {"first": ("env", "tests", "sanitize"), "second": ("env", "kernels", "decode")}


def time_plan() -> dict:
    """Each command's worst case (its stages' limits) and the lease's: a start, both commands and a
    rerun of the longer one."""
    commands = {name: sum(STAGES[s].limit_s for s in stages) for name, stages in COMMANDS.items()}
    total = START_S + sum(commands.values()) + max(commands.values())
    return {"commands_s": commands, "command_limit_s": COMMAND_LIMIT_S, "start_s": START_S,
            "with_one_rerun_s": total, "budget_s": BUDGET_S,
            "ok": all(t <= 0.8 * COMMAND_LIMIT_S for t in commands.values()) and total <= BUDGET_S}


# ---------------------------------------------------------------------------------------------
# Dry run: what the GPU machine must provide
# ---------------------------------------------------------------------------------------------

# Distribution names whose import name differs.
_IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn", "scikit-image": "skimage", "pillow": "PIL",
                 "opencv-python-headless": "cv2", "pytorch-lightning": "pytorch_lightning",
                 "nvidia-ml-py": "pynvml", "python-dateutil": "dateutil", "pytest-xdist": "xdist",
                 "pytest-benchmark": "pytest_benchmark", "huggingface-hub": "huggingface_hub"}


def available_modules() -> set[str]:
    names = set()
    for line in (ROOT / "bench" / "gpu_machine_packages.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            names.add(_IMPORT_NAMES.get(line, line.replace("-", "_").lower()))
    return names


def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(module, at module level, optional: inside ``try ... except ImportError``) per import."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, top, optional):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, top, optional) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, top, optional))
            elif isinstance(child, ast.Try):
                guards = {getattr(h.type, "id", None) for h in child.handlers}
                visit(child, top, optional or bool(guards & {"ImportError", "ModuleNotFoundError", "Exception"}))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, optional)
            else:
                visit(child, top, optional)

    visit(tree, True, False)
    return out


def _module_file(name: str) -> Path | None:
    for candidate in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def missing_modules(entries) -> tuple[list[str], list[str]]:
    """Third-party modules the entry files reach but the GPU machine lacks: (imported at module
    level, so fatal; imported inside a function, so only fatal if that code runs)."""
    have = available_modules() | set(sys.stdlib_module_names) | {"bitcliff", "bench", "tests", "gemlite"}
    seen, todo = set(), [ROOT / e for e in entries]
    fatal, lazy = set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, top, optional in _imports(path):
            parts = module.split(".")
            for i in range(len(parts), 0, -1):  # the package and every parent package in the repo
                own = _module_file(".".join(parts[:i]))
                if own is not None:
                    todo.append(own)
            if parts[0] in have or optional:
                continue
            where = f"{parts[0]} ({path.relative_to(ROOT)})"
            (fatal if top else lazy).add(where)
    return sorted(fatal), sorted(lazy)


def dry_run(stages) -> int:
    problems, notes = [], []
    for name in stages:
        stage = STAGES[name]
        for path in stage.paths + stage.entry:
            if not (ROOT / path).exists():
                problems.append(f"{name}: {path} does not exist")
        if stage.argv[1:2] == ("-m",) and stage.argv[2] != "pytest" and _module_file(stage.argv[2]) is None:
            problems.append(f"{name}: module {stage.argv[2]} does not exist")
        fatal, lazy = missing_modules(stage.entry)
        problems += [f"{name}: imports {m}, which the GPU machine does not have" for m in fatal]
        notes += [f"{name}: a function imports {m}, not on the GPU machine (fine unless it runs)" for m in lazy]
    problems += device_problems()
    if not list((ROOT / WHEELS).glob("gemlite-*.whl")):
        notes.append("no GemLite wheel in .whl/: the peer rows will say skipped (pip wheel --no-deps gemlite -w .whl)")
    returned = {c: returned_files(c, COMMANDS[c]) for c in COMMANDS}
    returned["this run"] = returned_files("+".join(stages), stages)
    for command, files in returned.items():
        if len(files) > MAX_FILES:
            problems.append(f"{command} would return {len(files)} files (> {MAX_FILES})")
        if any(f.count("/") >= MAX_DEPTH for f in files):
            problems.append(f"{command} would return a file {MAX_DEPTH} or more folders deep")
    plan = time_plan()
    if not plan["ok"]:
        problems.append(f"time plan does not fit: {plan}")
    print(json.dumps({"stages": list(stages), "time_plan": plan, "returned": returned}, indent=1))
    for line in notes:
        print("note:", line)
    for line in problems:
        print("PROBLEM:", line)
    print("dry run:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def seed_for(device_name: str) -> Path | None:
    """The tuning seed of the device a GPU reports as ``device_name`` (its H100 or H200 family), or
    None where there is no preset or no file for it."""
    device = device_for(device_name)
    if device is None:
        return None
    found = sorted((ROOT / SEED).glob(f"autotune-{slug(device.name)}-triton*.json"))
    return found[-1] if found else None


def device_problems() -> list[str]:
    """Every device the GPU machine may be needs its seed, and the newest predictions its rows."""
    problems = []
    for device in DEVICES:
        if seed_for(device.name) is None:
            problems.append(f"no tuning seed for {device.name} in {SEED} (python -m bench.sass_model --seed-cache)")
    found = sorted((ROOT / PREDICTIONS).glob("sass-2*.json"))  # dated: not sass-before-*
    if not found:
        return problems + [f"no predictions (sass-*.json) in {PREDICTIONS}"]
    predicted = {row.get("device") for row in json.loads(found[-1].read_text())["rows"]}
    problems += [f"{found[-1].name} has no predictions for {d.name}" for d in DEVICES if d.name not in predicted]
    return problems


def returned_files(command: str, stages) -> list[str]:
    """What a command leaves under $OUT: the archive, the summary, the main result JSON."""
    files = [f"gpu-check-{command}.tar.gz", f"gpu-check-{command}.json"]
    if "kernels" in stages:
        files.append("kernels.json")
    if "decode" in stages:
        files.append("decode.json")
    return files


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def env_report() -> int:
    import torch
    import triton

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    preset = device_for(name) if name else None
    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                      "device": name, "model_ceilings": asdict(preset) if preset else None,
                      "seed": str(seed_for(name).relative_to(ROOT)) if name and seed_for(name) else None,
                      "commit": os.environ.get("BITCLIFF_COMMIT", "unknown"), "python": sys.version.split()[0]},
                     indent=1))
    smi = shutil.which("nvidia-smi")
    if smi:
        subprocess.run([smi], check=False)
    return 0 if torch.cuda.is_available() else 1


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/nvidia/nsight-compute/*/compute-sanitizer/compute-sanitizer"):
        for candidate in sorted(Path("/").glob(pattern.lstrip("/"))):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def sanitize() -> int:
    """memcheck and racecheck over ``bench/sanitize_kernels.py --quick``; 'skipped: reason' when
    the sanitizer is missing or refuses the device (it works on one of the machine's runtimes)."""
    tool = find_sanitizer()
    if tool is None:
        print("sanitize: skipped: compute-sanitizer not found")
        return 0
    probe = subprocess.run([tool, "--tool", "memcheck", sys.executable, "-c",
                            "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        reason = (probe.stdout + probe.stderr).strip().splitlines()[-1:] or ["no output"]
        print(f"sanitize: skipped: the sanitizer refuses this device ({reason[0][:200]})")
        return 0
    worst = 0
    for check in ("memcheck", "racecheck"):
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1") if check == "memcheck" else os.environ
        rc = subprocess.run([tool, "--tool", check, "--error-exitcode", "3", sys.executable,
                             "bench/sanitize_kernels.py", "--quick"], env=env, check=False).returncode
        print(f"sanitize: {check}: {'clean' if rc == 0 else f'FAILED (rc={rc})'}")
        worst = max(worst, rc)
    return worst


def seed_cache(cache: Path) -> tuple[str, str]:
    """Copy this device's seed into the tuning cache under the name the launcher will look for
    (this device's name and this Triton's version); (device name, what was seeded)."""
    import triton

    # Asked in a child process: this one starts no CUDA context that would stay open beside the stages.
    asked = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) "
                            "if torch.cuda.is_available() else 'no CUDA device')"],
                           capture_output=True, text=True, check=False, timeout=120)
    name = asked.stdout.strip().splitlines()[-1] if asked.returncode == 0 and asked.stdout.strip() else "unknown"
    seed = seed_for(name)
    if seed is None:
        return name, f"none: no seed for {name!r}: every shape class tunes over all its candidates"
    shutil.copy(seed, cache / f"autotune-{slug(name)}-triton{triton.__version__}.json")
    return name, str(seed.relative_to(ROOT))


def install_wheels(site: Path) -> str:
    wheels = sorted((ROOT / WHEELS).glob("*.whl"))
    if not wheels:
        return "no wheels carried"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, wheels)], check=True)
    return ", ".join(w.name for w in wheels)


def run(stages, command: str) -> int:
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bitcliff-gpu-check-"))
    work = scratch / "work"  # logs and results, archived at the end
    cache = scratch / "cache"
    work.mkdir()
    cache.mkdir()
    device, seeded = seed_cache(cache)
    site = scratch / "site"
    env = dict(os.environ, BITCLIFF_CACHE=str(cache), TRITON_CACHE_DIR=str(scratch / "triton"),
               TRITON_DEFAULT_FP_FUSION="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    try:
        wheels = install_wheels(site)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), env.get("PYTHONPATH")]))
    except (OSError, subprocess.CalledProcessError) as exc:
        wheels = f"install failed: {exc}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    preset = device_for(device)
    summary = {"command": command, "commit": os.environ.get("BITCLIFF_COMMIT", "unknown"), "wheels": wheels,
               "device": device, "model_ceilings": asdict(preset) if preset else None, "seed": seeded,
               "time_plan": time_plan(), "stages": []}
    for name in stages:
        stage = STAGES[name]
        argv = [a.format(py=sys.executable, out=str(work)) for a in stage.argv]
        start = time.time()
        with open(work / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=stage.limit_s).returncode
                verdict = "ok" if rc == 0 else f"FAILED (rc={rc})"
            except subprocess.TimeoutExpired:
                verdict = f"TIMED OUT after {stage.limit_s} s"
        tail = (work / f"{name}.log").read_text(errors="replace").splitlines()[-6:]
        summary["stages"].append({"stage": name, "verdict": verdict, "seconds": round(time.time() - start, 1),
                                  "limit_s": stage.limit_s, "tail": tail})
        print(f"{name:9} {verdict:24} {time.time() - start:6.1f} s (limit {stage.limit_s})", flush=True)
    # The tuning cache the run used and grew comes back inside the archive.
    shutil.copytree(cache, work / "tuning", dirs_exist_ok=True)
    for pattern, name in (("kernels-*.json", "kernels.json"), ("decode-*.json", "decode.json")):
        found = sorted(work.glob(pattern))
        if found:
            shutil.copy(found[-1], out / name)
    with tarfile.open(out / f"gpu-check-{command}.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=f"gpu-check-{command}")
    (out / f"gpu-check-{command}.json").write_text(json.dumps(summary, indent=1) + "\n")
    for txt in sorted(work.glob("*-summary.txt")):
        print(f"--- {txt.name}\n{txt.read_text()}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(s["verdict"] != "ok" for s in summary["stages"]) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help=f"stages ({', '.join(STAGES)}) or a command ({', '.join(COMMANDS)})")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sanitize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.env:
        return env_report()
    if args.sanitize:
        return sanitize()
    names = args.stages or ["first", "second"]
    command = "+".join(names)
    stages = []
    for name in names:
        if name in COMMANDS:
            stages += [s for s in COMMANDS[name] if s not in stages]
        elif name in STAGES:
            stages.append(name)
        else:
            parser.error(f"unknown stage or command {name!r}: stages {list(STAGES)}, commands {list(COMMANDS)}")
    if args.dry_run:
        return dry_run(stages)
    return run(stages, command)


if __name__ == "__main__":
    sys.exit(main())
