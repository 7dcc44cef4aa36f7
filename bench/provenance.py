"""Where a benchmark's numbers come from: the commit they were measured at, and when."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(short: bool = False) -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), or ``BITCLIFF_COMMIT`` where the
    tree has no git history (a copy on a GPU machine), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BITCLIFF_COMMIT", "unknown")


def now() -> str:
    """UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
