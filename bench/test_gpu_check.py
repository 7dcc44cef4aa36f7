"""The GPU check's plan, checked on the CPU (``bench/gpu_check.sh --dry-run``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_passes():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run: ok" in done.stdout


def test_the_plan_fits_the_lease():
    plan = gpu_check.time_plan()
    assert plan["ok"] and plan["with_one_rerun_s"] <= gpu_check.BUDGET_S
    for command, stages in gpu_check.COMMANDS.items():
        files = gpu_check.returned_files(command, stages)
        assert len(files) <= gpu_check.MAX_FILES and all("/" not in f for f in files)


def test_dry_run_names_a_missing_path_and_a_missing_package(monkeypatch, capsys, tmp_path):
    stage = gpu_check.Stage("broken", ("{py}", "-m", "bench.nowhere"), 10, paths=("tests/nowhere.py",),
                            entry=("bench/test_sass_model.py",))
    monkeypatch.setitem(gpu_check.STAGES, "broken", stage)
    monkeypatch.setattr(gpu_check, "available_modules", lambda: {"torch"})  # pytest is then missing
    assert gpu_check.dry_run(["broken"]) == 1
    out = capsys.readouterr().out
    assert "tests/nowhere.py does not exist" in out
    assert "module bench.nowhere does not exist" in out
    assert "imports pytest" in out


def test_an_unknown_stage_is_refused(capsys):
    try:
        gpu_check.main(["nonsense", "--dry-run"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unknown stage or command 'nonsense'" in capsys.readouterr().err


def test_dry_run_needs_a_seed_for_every_device(monkeypatch, tmp_path):
    """The machine may be an H100 or an H200: the check takes the seed of the device it finds."""
    monkeypatch.setattr(gpu_check, "SEED", tmp_path)  # an empty seed folder
    problems = gpu_check.device_problems()
    assert any("no tuning seed for NVIDIA H100 80GB HBM3" in p for p in problems)
    assert any("no tuning seed for NVIDIA H200" in p for p in problems)
    (tmp_path / "autotune-NVIDIA_H200-triton3.6.0.json").write_text("{}")
    assert gpu_check.seed_for("NVIDIA H200") == tmp_path / "autotune-NVIDIA_H200-triton3.6.0.json"
    assert gpu_check.seed_for("NVIDIA H100 80GB HBM3") is None
