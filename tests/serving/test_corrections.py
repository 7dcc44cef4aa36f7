"""A repaired checkpoint's corrections as the vLLM plugin's layers add them: read from the folder,
cut to a rank's rows and columns, they give what ``bitcliff.load``'s modules give (no vLLM needed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bitcliff
from bitcliff.diagnosis.run import DiagnoseOptions
from bitcliff.kernels import ops as kernel_ops
from bitcliff.quant.outliers import SparseOutliers
from bitcliff.quant.qlinear import QuantLinear
from bitcliff.quant.tensor_files import CheckpointError
from bitcliff.serving.corrections import ModuleCorrection, StoredCorrections, for_rank


def _dense(correction: ModuleCorrection, n: int, k: int) -> torch.Tensor:
    """fp32 ``[N, K]``: the low-rank term plus the outliers, as one matrix (the reference)."""
    dense = torch.zeros(n, k)
    if correction.a is not None:
        dense += correction.b @ correction.a
    if correction.outliers is not None:
        dense += correction.outliers.dense()
    return dense


def _shards():
    gen = torch.Generator().manual_seed(0)
    k, sizes = 10, (6, 4)
    first = ModuleCorrection(a=torch.randn(2, k, generator=gen), b=torch.randn(6, 2, generator=gen),
                             outliers=SparseOutliers.from_entries(torch.tensor([0, 3, 5]), torch.tensor([9, 1, 4]),
                                                                  torch.randn(3, generator=gen), (6, k)))
    second = ModuleCorrection(outliers=SparseOutliers.from_entries(torch.tensor([1, 2]), torch.tensor([0, 7]),
                                                                   torch.randn(2, generator=gen), (4, k)),
                              bias=torch.randn(4, generator=gen))
    return k, sizes, [first, second]


@pytest.mark.parametrize("rows,columns", [
    ([3, 4, 5, 8, 9], range(10)),  # column-parallel: rank 1 of 2 of each fused shard
    ([0, 1, 2, 6, 7], range(10)),  # rank 0
    (range(10), [5, 6, 7, 8, 9]),  # row-parallel: the second half of the inputs
])
def test_a_ranks_cut_equals_the_dense_corrections_rows_and_columns(rows, columns):
    k, sizes, shards = _shards()
    rows, columns = torch.tensor(list(rows)), torch.tensor(list(columns))
    cut = for_rank(shards, sizes, k, rows, columns, with_bias=True)
    dense = torch.cat([_dense(c, n, k) for c, n in zip(shards, sizes)])
    bias = torch.cat([torch.zeros(6), shards[1].bias])
    x = torch.randn(3, columns.numel())
    want = x @ dense[rows][:, columns].t() + bias[rows]
    torch.testing.assert_close(cut.add_to(torch.zeros(3, rows.numel()), x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_corrections_add_to_a_new_output_and_leave_the_kernels_untouched(dtype):
    k, sizes, shards = _shards()
    cut = for_rank(shards, sizes, k, torch.arange(10), torch.arange(k), with_bias=True)
    y, x = torch.randn(2, 3, 10).to(dtype), torch.randn(2, 3, k)
    before = y.clone()
    out = cut.add_to(y, x)
    assert torch.equal(y, before) and out.shape == y.shape and out.dtype == dtype
    want = (y.float() + cut.add_to(torch.zeros(2, 3, 10), x)).to(dtype)
    torch.testing.assert_close(out, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_row_parallel_parts_sum_to_the_whole_and_the_bias_is_added_once():
    k, sizes, shards = _shards()
    rows, x = torch.arange(10), torch.randn(4, k)
    whole = for_rank(shards, sizes, k, rows, torch.arange(k), with_bias=True).add_to(torch.zeros(4, 10), x)
    parts = [for_rank(shards, sizes, k, rows, cols, with_bias=first).add_to(torch.zeros(4, 10), x[:, cols])
             for cols, first in ((torch.arange(5), True), (torch.arange(5, 10), False))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)


def test_layers_without_corrections_get_none():
    assert for_rank([None, None], (4, 4), 8, torch.arange(8), torch.arange(8), with_bias=True) is None


@pytest.fixture(scope="module")
def repaired_folder(tmp_path_factory):
    """A tiny repaired checkpoint with quantized low-rank factors, fp16 factors and sparse outliers."""
    from repair_fixtures import repair_setup

    fp, q, calib = repair_setup()
    evaluation = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(2))
    report = bitcliff.diagnose(fp, q, evaluation, options=DiagnoseOptions.fast(), progress=False)
    folders = {}
    for name, methods, factor_bits in (("quantized", ["lowrank", "outliers"], 4), ("adapter", ["lowrank"], 16)):
        repaired = copy.deepcopy(q)
        plan = bitcliff.plan_repair(report, 1.0, methods=methods, factor_bits=factor_bits)
        result = bitcliff.repair(fp, repaired, calib, plan, progress=False)
        folders[name] = bitcliff.save(repaired, tmp_path_factory.mktemp(name) / "r", extra_files=result.files())
    return folders


@pytest.mark.parametrize("kind", ["quantized", "adapter"])
def test_read_corrections_give_what_bitcliff_load_gives(repaired_folder, kind):
    folder = repaired_folder[kind]
    model = bitcliff.load(folder)
    stored = StoredCorrections(folder)
    corrected = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        correction = stored.module(name)
        assert stored.shape(name) == (module.out_features, module.in_features)
        x = torch.randn(5, module.in_features)
        with torch.no_grad():
            codes_only = kernel_ops.run(x, module.kernel_layout(), module.bias)
            want = module(x)
        if correction is None:
            torch.testing.assert_close(codes_only, want, rtol=0, atol=0)
            continue
        corrected += 1
        n, k = stored.shape(name)
        cut = for_rank([correction], [n], k, torch.arange(n), torch.arange(k), with_bias=False)
        # the same fp32 terms summed in another order: within 1e-5 of the output's scale
        torch.testing.assert_close(cut.add_to(codes_only, x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert corrected


def test_the_folder_is_sent_not_the_tensors(repaired_folder):
    import pickle

    stored = StoredCorrections(repaired_folder["quantized"])
    assert any(stored.module(n) for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                          "model.layers.1.mlp.down_proj"))
    again = pickle.loads(pickle.dumps(stored))
    assert again.folder == stored.folder and again._modules is None


def test_corrections_of_a_module_the_checkpoint_lacks_are_refused(repaired_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "r"
    shutil.copytree(repaired_folder["quantized"], folder)
    tensors = load_file(folder / "outliers.safetensors")
    save_file({k.replace("model.layers.0.", "model.layers.7."): v for k, v in tensors.items()},
              folder / "outliers.safetensors")
    # a manifest written before digests were recorded binds the file by name only, so the
    # module check is what catches it
    manifest = json.loads((folder / ".bitcliff-manifest.json").read_text())
    manifest.pop("digests", None)
    (folder / ".bitcliff-manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.layers\.7\..*not a quantized linear of the checkpoint"):
        StoredCorrections(folder).module("model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("damage", ["missing", "foreign"])
def test_a_repair_file_missing_or_not_the_checkpoints_own_is_refused(repaired_folder, tmp_path, damage):
    """Never a model served without its repairs, or with another checkpoint's."""
    import shutil

    folder = tmp_path / "r"
    shutil.copytree(repaired_folder["quantized"], folder)
    if damage == "missing":
        (folder / "lowrank.safetensors").unlink()
        match = "lacks lowrank.safetensors"
    else:
        shutil.copy(repaired_folder["adapter"] / "adapter_model.safetensors", folder)
        match = "adapter_model.safetensors is not this checkpoint's own"
    with pytest.raises(CheckpointError, match=match):
        StoredCorrections(folder)
