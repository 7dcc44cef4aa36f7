"""Full-precision predictions kept on disk: read back whole and equal, keyed by every weight and the
windows, and computed again where a file is damaged, cut short or another's."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import bitcliff
from bitcliff import QuantConfig
from bitcliff import reference_cache as cache
from bitcliff.cli import main as cli_main
from bitcliff.divergence import evaluate_against, evaluate_with_reference, reference_predictions

FIELDS = ("top_logprobs", "top_ids", "rest_logprob", "nll", "eval_ids")


def windows(seed=0):
    return torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(seed))


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def test_a_second_run_reads_what_the_first_computed(tiny_llama, tmp_path, monkeypatch):
    ids = windows()
    first = cache.cached_reference_predictions(tiny_llama, ids, top_k=8, cache_dir=tmp_path, progress=False)
    [stored] = tmp_path.glob("*.safetensors")
    assert stored.stat().st_size < 3 * 11 * (8 * 8 + 8) + 4096  # 8 bytes per kept token and position, header
    monkeypatch.setattr(cache, "reference_predictions", None)  # no second computation possible
    second = cache.cached_reference_predictions(tiny_llama, ids, top_k=8, cache_dir=tmp_path, progress=False)
    assert same(first, second)


def test_a_cached_run_equals_an_uncached_one(tiny_llama, tmp_path):
    """Every token kept (top_k = V = 128): the cached figures are the side-by-side run's, to rounding."""
    quantized = bitcliff.quantize(copy.deepcopy(tiny_llama), QuantConfig(bits=2, group_size=32), progress=False)
    ids = windows(1)
    direct = evaluate_against(quantized, tiny_llama, ids, progress=False)
    for _ in range(2):  # computed, then read back
        kept = cache.cached_reference_predictions(tiny_llama, ids, top_k=128, cache_dir=tmp_path, progress=False)
        result = evaluate_with_reference(quantized, kept, progress=False)
        for key in ("kl_mean", "kl_p99", "kl_max", "same_top_pct", "ppl", "ppl_fp"):
            assert result[key] == pytest.approx(direct[key], rel=1e-5, abs=1e-7), key


def test_the_key_holds_every_weight_the_dtype_and_the_windows(tiny_llama):
    ids = windows()
    key = cache.cache_key(tiny_llama, ids, 8)
    tuned = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # embeddings untouched
    assert cache.cache_key(tuned, ids, 8)["weights"] != key["weights"]
    assert cache.cache_key(copy.deepcopy(tiny_llama).to(torch.bfloat16), ids, 8)["weights"] != key["weights"]
    assert cache.cache_key(tiny_llama, windows(1), 8)["eval_ids"] != key["eval_ids"]
    files = {cache.cache_file(k) for k in (key, cache.cache_key(tiny_llama, ids, 16), cache.cache_key(tuned, ids, 8))}
    assert len(files) == 3


def _damage_a_value(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # in the last tensor's bytes: the header still reads
    path.write_bytes(bytes(data))


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [_damage_a_value, _cut_short], ids=["a-value-changed", "cut-short"])
def test_a_damaged_file_is_computed_again_and_replaced(tiny_llama, tmp_path, caplog, damage):
    ids = windows()
    first = cache.cached_reference_predictions(tiny_llama, ids, top_k=8, cache_dir=tmp_path, progress=False)
    [stored] = tmp_path.glob("*.safetensors")
    damage(stored)
    with caplog.at_level(logging.WARNING, logger="bitcliff.reference_cache"):
        again = cache.cached_reference_predictions(tiny_llama, ids, top_k=8, cache_dir=tmp_path, progress=False)
    assert "cannot be used" in caplog.text and "computing them again" in caplog.text
    assert same(first, again)
    key = cache.cache_key(tiny_llama, ids, 8)
    assert same(cache.read_predictions(stored, key), first)  # the file is whole again


def test_a_file_of_another_key_is_not_trusted(tiny_llama, tmp_path, caplog):
    ids = windows()
    key = cache.cache_key(tiny_llama, ids, 8)
    other = cache.cache_key(tiny_llama, windows(1), 8)
    cache.write_predictions(cache.cache_file(key, tmp_path), other,
                            reference_predictions(tiny_llama, windows(1), top_k=8, progress=False))
    with caplog.at_level(logging.WARNING, logger="bitcliff.reference_cache"):
        assert cache.read_predictions(cache.cache_file(key, tmp_path), key) is None
    assert "another model, other windows or another top_k" in caplog.text


def test_eval_against_twice_runs_the_reference_once(tiny_folder, tmp_path, capsys, monkeypatch):
    text = str(tiny_folder.parent / "text.txt")
    checkpoint = tmp_path / "w3"
    assert cli_main(["quantize", "--model", str(tiny_folder), "--bits", "3", "--group-size", "32",
                     "--out", str(checkpoint)]) == 0
    reports = []
    for run in range(3):
        report = tmp_path / f"eval{run}.json"
        flags = ["--no-reference-cache"] if run == 2 else ["--reference-cache", str(tmp_path / "fp")]
        assert cli_main(["eval", str(checkpoint), "--against", str(tiny_folder), "--text-file", text,
                         "--windows", "2", "--seq-len", "64", "--json", str(report), *flags]) == 0
        reports.append(json.loads(report.read_text()))
        if run == 0:
            assert len(list((tmp_path / "fp").glob("*.safetensors"))) == 1
            monkeypatch.setattr(cache, "reference_predictions", None)  # the second run must read the file
    capsys.readouterr()
    cached, again, exact = reports
    assert {k: v for k, v in cached.items() if k.startswith("kl")} == {k: v for k, v in again.items() if k.startswith("kl")}
    assert "most likely tokens" in cached["kl_over"] and exact["kl_over"] == "the full vocabulary"
    assert cached["kl_mean"] == pytest.approx(exact["kl_mean"], rel=1e-5)  # vocabulary 128: every token kept
