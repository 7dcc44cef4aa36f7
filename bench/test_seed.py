"""The committed tuning seeds (``bench/results/tuning-seed/``): one per device the GPU machine may
be, each entry an ordering of configurations that the tuner's own pruning keeps for its shape, as
the newest committed predictions (``bench/results/sass-*.json``) ranked them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_check
from bench.devices import DEVICES
from bench.seed import SEED_ORDER_MAX, cache_key, parse_key, rejected

ROOT = Path(__file__).resolve().parents[1]
SEEDS = sorted((ROOT / gpu_check.SEED).glob("*.json"))


def _entries(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_is_a_seed_for_every_device_and_no_other():
    found = {gpu_check.seed_for(d.name) for d in DEVICES}
    assert None not in found and found == set(SEEDS)
    assert gpu_check.seed_for("NVIDIA H100 PCIe") == gpu_check.seed_for("NVIDIA H100 80GB HBM3")
    assert gpu_check.seed_for("Tesla T4") is None


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_the_seed_holds_only_what_the_pruning_keeps(path):
    entries = _entries(path)
    assert entries and rejected(entries, 132) == []
    for key, entry in entries.items():
        # An ordering with both predicted bounds, not a measured winner.
        assert 1 <= len(entry["order"]) <= SEED_ORDER_MAX == 2
        assert all(over < ser for over, ser in entry["predicted_us"])
        serialized = [ser for _, ser in entry["predicted_us"]]
        assert serialized == sorted(serialized), key
        assert all(over < serialized[0] for over, _ in entry["predicted_us"][1:]), key


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_batch_one_entries_fill_every_scheduler_and_keep_two_tiles_a_slice(path):
    """The two rules an audit of an earlier seed found broken (4 of its 6 batch-1 picks at 4096 x
    4096 and 4096 x 14336 had fewer than 4 x 132 warps; W3 at 4096 x 4096 split K into slices of
    one tile), checked directly on every gemv configuration of the Llama-3 shapes."""
    for key, entry in _entries(path).items():
        f = parse_key(key)
        if f["schedule"] != "gemv":
            continue
        units = f["k"] // 32
        for c in entry["order"]:
            warps = f["m"] * -(-f["n"] // c["BLOCK_N"]) * c["SPLIT_K"] * c["num_warps"]
            assert warps >= 4 * 132 and 2 * c["SPLIT_K"] * c["BLOCK_U"] <= units, (key, c)


def test_the_seeds_are_the_committed_predictions():
    """Each seed entry is the order the newest committed predictions give its device and shape."""
    newest = sorted((ROOT / "bench" / "results").glob("sass-2*.json"))[-1]  # dated, not sass-before-*
    result = json.loads(newest.read_text())
    for device in DEVICES:
        entries = _entries(gpu_check.seed_for(device.name))
        rows = [r for r in result["rows"] if r["device"] == device.name]
        assert len(rows) == len(entries)
        for r in rows:
            key = cache_key(r["schedule"], r["bits"], result["group"], r["dtype"], r["capture"], r["M"], r["N"], r["K"])
            assert entries[key]["order"] == [o["config"] for o in r["order"]]
            assert r["overlapped_s"] <= r["serialized_s"] and r["latency_s"] > 0
