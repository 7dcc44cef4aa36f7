"""The HTML report in a real headless browser (Debian's chromium): it renders, the verdict text
is on the page and the embedded plots are drawn.  Skipped where no chromium is installed."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig, quantize
from bitcliff.diagnosis.run import DiagnoseOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium browser (apt install chromium)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_chromium(tiny_llama, tmp_path):
    q = quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)
    windows = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(0))
    report = bitcliff.diagnose(tiny_llama, q, windows, options=DiagnoseOptions.fast(), progress=False)
    html = report.save(tmp_path / "diag")["html"]

    dom = _chromium("--dump-dom", html.as_uri()).stdout
    assert report.verdict.headline() in dom
    assert dom.count("<img") >= 7

    # The plots are the only saturated colour on the page: compare with the page minus its images.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", html.read_text()))
    with_plots, without_plots = _coloured_fraction(html, tmp_path / "a.png"), _coloured_fraction(bare, tmp_path / "b.png")
    assert with_plots > 0.001 and with_plots > 5 * without_plots, (with_plots, without_plots)


def _coloured_fraction(page, shot) -> float:
    """Screenshot ``page`` and return the share of strongly coloured pixels."""
    import matplotlib.image

    _chromium(f"--screenshot={shot}", "--window-size=1200,4000", page.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]  # float RGB in [0, 1]
    assert pixels.shape[:2] == (4000, 1200)
    assert (pixels < 0.95).any(axis=-1).mean() > 0.01, "the page rendered blank"
    return float((pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean())
