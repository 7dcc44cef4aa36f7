"""Interoperability with the peer GPTQ implementation, GPTQModel (optional: needs ``gptqmodel``).

A small version of ``bench/peer_gptqmodel.py`` on a tiny random Llama: bitcliff's checkpoints
must load in GPTQModel and GPTQModel's (v1 and v2) in bitcliff, with bit-identical dequantized
weights and matching float32 logits.  Skipped where gptqmodel is not installed (as in CI); see
the bench module's docstring for the install recipe of a separate environment that has it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "gptqmodel",
    reason="the peer GPTQ implementation (PyPI gptqmodel) is not installed here; run the cross-check "
    "with `python -m bench.peer_gptqmodel --peer-python PATH` (recipe in that module's docstring)",
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`
from bench import peer_gptqmodel as peer  # noqa: E402

peer._setup_peer_env()


def _assert_rows_pass(rows):
    assert rows, "no checkpoint was cross-read"
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    assert not failed, "\n" + peer.format_table(rows)


@pytest.mark.parametrize(
    ("bits", "nonnegative_rows"),
    [
        (4, 0),  # every zero point >= 1: bitcliff's default format is what an asym grid gets
        (2, 8),  # some zero points are 0
    ],
)
def test_bitcliff_checkpoint_loads_in_gptqmodel(tmp_path, bits, nonnegative_rows):
    model_dir = peer.build_tiny_model(tmp_path / "fp", nonnegative_rows=nonnegative_rows)
    _, eval_ids = peer.random_ids(model_dir, 1, 32)
    rows = peer.bitcliff_to_peer(model_dir, bits, False, 64, tmp_path, eval_ids)
    assert any(r["default_format"] for r in rows), "bitcliff's default format was not cross-read"
    _assert_rows_pass(rows)


def test_gptqmodel_checkpoint_loads_in_bitcliff(tmp_path):
    model_dir = peer.build_tiny_model(tmp_path / "fp", nonnegative_rows=8)
    calib_ids, eval_ids = peer.random_ids(model_dir, 4, 64)
    rows = peer.peer_to_bitcliff(model_dir, 2, False, 64, calib_ids, tmp_path, eval_ids)
    assert {r["checkpoint_format"] for r in rows} == {"gptq", "gptq_v2"}
    assert rows[0]["written_checkpoint_format"] == "gptq"  # GPTQModel's default save format is v1
    assert rows[0]["zeros_eq_0"] or rows[1]["zeros_eq_0"], "no zero point of 0: the v1 '-1' case went untested"
    _assert_rows_pass(rows)


def test_a_mixed_precision_checkpoint_loads_in_gptqmodel(tmp_path):
    model_dir = peer.build_tiny_model(tmp_path / "fp", nonnegative_rows=0)
    calib_ids, eval_ids = peer.random_ids(model_dir, 4, 64)
    rows = peer.mixed_to_peer(model_dir, 3.5, calib_ids, tmp_path, eval_ids)
    assert rows[0]["dynamic_entries"] > 0, "no module was set apart: the dynamic entries went untested"
    _assert_rows_pass(rows)
