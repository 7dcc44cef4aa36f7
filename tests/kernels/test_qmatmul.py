"""Triton dequant-matmul (both schedules, every capture mode) against the plain-torch reference.

On CPU the kernels run through Triton's interpreter (see conftest.py), so shapes are small and the
parametrization is deliberate: the full cross product of bits x group layout x dtype x schedule x
capture at M = 1, every bits x group x schedule at M = 3 (dtype and capture rotated), every bit
width and capture at M = 17 on the tiled path (one gemv case), and a few M = 64 cases.  Split-K, the multi-group tile branch and act-order have their own tests.
Every launch writes into a NaN-poisoned output; inputs are fresh random data, never zeros.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bitcliff.kernels import reference, tuning
from bitcliff.kernels.layout import from_gptq
from bitcliff.kernels.pack import default_g_idx, num_groups, pack_qweight, pack_qzeros

pytestmark = pytest.mark.interpret

# Kernel vs reference, per activation dtype: relative L2 error of y, also used as the elementwise
# rtol (with atol = TOL * rms(y_ref)).  The reference accumulates in fp32 from exact fp32 weights;
# the kernels round y once to the dtype (2**-11 for fp16, 2**-8 for bf16) and, on the tiled path,
# also round each dequantized weight to the dtype before tl.dot.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Capture signals computed from the kernel's own y: only fp32 summation order differs.
TOL_SELF = 1e-5
# ||y_fp||**2 from fp16/bf16 operands with exact fp32 products: summation order only.
TOL_FP_SQ = 1e-4

BITS = (2, 3, 4)
# (group_size, K): aligned groups, a partial last group (160 = 64+64+32, 200 = 128+72), per-channel.
GROUPS = ((32, 96), (64, 160), (128, 200), (-1, 100))
N = 40  # not a multiple of any block


def make_weight(k, n, bits, group_size, g_idx="contiguous", seed=0):
    """Random GPTQ tensors (codes, zeros, fp16 scales; never zeros) and their dense weight."""
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).half()
    gi = default_g_idx(k, group_size)
    if g_idx == "act_order":  # GPTQ act-order: equal groups over a permutation of K
        gi = gi[torch.randperm(k, generator=gen)]
    elif g_idx == "random":  # uneven groups, some possibly empty
        gi = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32)
    tensors = {
        "qweight": pack_qweight(codes, bits), "qzeros": pack_qzeros(zeros, bits),
        "scales": scales, "g_idx": gi.to(torch.int32),
    }
    dense = reference.dequantize(**tensors, bits=bits)
    return tensors, dense


def run_case(kernels, device, *, bits, group_size, k, m, dtype, schedule, capture, config=None,
             g_idx="contiguous", bias=True, lead=None, seed=0):
    tensors, dense = make_weight(k, N, bits, group_size, g_idx, seed)
    layout = from_gptq(**tensors, bits=bits).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*(lead or (m,)), k, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).half() if bias else None
    # The "full-precision" weight: the quantized one plus noise of about half a quantization step.
    w_fp = (dense + 0.005 * torch.randn(dense.shape, generator=gen)).to(dtype)
    tokens = x.numel() // k
    out = torch.full((tokens, N), float("nan"), dtype=dtype, device=device)

    result = kernels.quant_matmul(
        x.to(device), layout, None if b is None else b.to(device), capture=capture,
        weight_fp=w_fp.to(device) if capture == "error" else None,
        schedule=schedule, config=config, out=out,
    )
    y = result if capture == "none" else result[0]
    y_ref = reference.dequant_matmul(x, **tensors, bits=bits, bias=b)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert y.data_ptr() == out.data_ptr()
    y = y.cpu()
    assert torch.isfinite(y).all(), "output elements left unwritten (NaN poison) or non-finite"
    tol = TOL[dtype]
    rel = (y.float() - y_ref.float()).norm() / y_ref.float().norm()
    assert rel < tol, f"relative error {rel:.3g} over {tol}"
    rms = y_ref.float().pow(2).mean().sqrt()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * float(rms))

    if capture == "stats":
        a, mx = (t.cpu() for t in result[1:])
        own = reference.output_stats(y)
        ref = reference.output_stats(y_ref)
        torch.testing.assert_close(a, own["sq_norm"], rtol=TOL_SELF, atol=0)
        torch.testing.assert_close(mx, own["abs_max"], rtol=0, atol=0)
        torch.testing.assert_close(a, ref["sq_norm"], rtol=4 * tol, atol=0)
        torch.testing.assert_close(mx, ref["abs_max"], rtol=2 * tol, atol=0)
    elif capture == "error":
        err, fp = (t.cpu() for t in result[1:])
        ref = reference.output_error(x, dense, w_fp, b)
        torch.testing.assert_close(fp, ref["fp_sq"], rtol=TOL_FP_SQ, atol=0)
        # ||Δ_kernel|| - ||Δ_ref|| is bounded by ||y_kernel - y_ref||: compare norms on y's scale.
        gap = (err.sqrt() - ref["err_sq"].sqrt()).abs()
        assert (gap <= tol * ref["fp_sq"].sqrt() + 1e-6).all(), f"max gap {gap.max():.3g}"
        assert (err > 0).all()
    return layout


def gemv_config(group_size):
    """One K tile per group (the production branch: one scale row per tile)."""
    return {"BLOCK_U": 4 if group_size == -1 else group_size // 32}


CAPTURES = ("none", "stats", "error")


def _small_cases():
    """M = 1: the full cross product.  M = 3: every bits x group x schedule, with the dtype and
    capture mode rotated through the combinations (each still meets every bits and group)."""
    for bits, (gs, k), dtype, schedule, capture in itertools.product(
        BITS, GROUPS, TOL, ("gemv", "tiled"), CAPTURES
    ):
        yield bits, gs, k, 1, dtype, schedule, capture
    for i, (bits, (gs, k), schedule) in enumerate(itertools.product(BITS, GROUPS, ("gemv", "tiled"))):
        yield bits, gs, k, 3, list(TOL)[(i // 2) % 2], schedule, CAPTURES[i % 3]


def _param(bits, gs, k, m, dtype, schedule, capture):
    return pytest.param(bits, gs, k, m, dtype, schedule, capture,
                        id=f"w{bits}-g{gs}-k{k}-m{m}-{str(dtype)[6:]}-{schedule}-{capture}")


@pytest.mark.parametrize("bits,group_size,k,m,dtype,schedule,capture", [_param(*c) for c in _small_cases()])
def test_small_batches(kernels, device, bits, group_size, k, m, dtype, schedule, capture):
    config = gemv_config(group_size) if schedule == "gemv" else None
    run_case(kernels, device, bits=bits, group_size=group_size, k=k, m=m, dtype=dtype,
             schedule=schedule, capture=capture, config=config, seed=bits * 100 + m)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("bits", BITS)
def test_m17_tiled(kernels, device, bits, capture):
    run_case(kernels, device, bits=bits, group_size=64, k=160, m=17, dtype=torch.float16,
             schedule="tiled", capture=capture, seed=bits)


def test_m17_gemv(kernels, device):
    run_case(kernels, device, bits=3, group_size=32, k=96, m=17, dtype=torch.bfloat16,
             schedule="gemv", capture="error", config={"BLOCK_U": 1, "SPLIT_K": 3})


@pytest.mark.parametrize("bits,capture,dtype", [
    (2, "stats", torch.float16), (3, "error", torch.bfloat16), (4, "none", torch.bfloat16),
])
def test_m64_tiled(kernels, device, bits, capture, dtype):
    config = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}
    run_case(kernels, device, bits=bits, group_size=128, k=200, m=64, dtype=dtype,
             schedule="tiled", capture=capture, config=config)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("schedule,config", [
    # K tiles spanning several groups (per-unit scales) and split K across programs.
    ("gemv", {"BLOCK_N": 32, "BLOCK_U": 4, "SPLIT_K": 2}),
    ("tiled", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3}),
])
def test_split_k_and_multi_group_tiles(kernels, device, schedule, config, capture):
    run_case(kernels, device, bits=3, group_size=32, k=224, m=3, dtype=torch.float16,
             schedule=schedule, capture=capture, config=config)
    ws, lock = kernels._workspace(torch.device(device), 1, 1)
    assert not ws.any() and not lock.any(), "split-K must leave its workspace zeroed"


@pytest.mark.parametrize("g_idx", ["act_order", "random"])
@pytest.mark.parametrize("schedule", ["gemv", "tiled"])
@pytest.mark.parametrize("bits", [3, 4])
def test_act_order(kernels, device, bits, schedule, g_idx):
    layout = run_case(kernels, device, bits=bits, group_size=32, k=96, m=3, dtype=torch.float16,
                      schedule=schedule, capture="error", g_idx=g_idx, seed=7 + bits)
    assert layout.kidx is not None


def test_leading_dims_no_bias_and_auto_schedule(kernels, device):
    for lead in ((2, 3), (1, 1, 1)):
        run_case(kernels, device, bits=4, group_size=32, k=96, m=0, lead=lead, dtype=torch.float16,
                 schedule="auto", capture="stats", bias=False)
    assert kernels.choose_schedule(1) == "gemv" and kernels.choose_schedule(64) == "tiled"


def test_rejects_bad_arguments(kernels, device):
    tensors, _ = make_weight(64, 8, 4, 32)
    layout = from_gptq(**tensors, bits=4).to(device)
    x = torch.randn(2, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="63"):
        kernels.quant_matmul(torch.randn(2, 63, dtype=torch.float16, device=device), layout)
    with pytest.raises(ValueError, match="weight_fp"):
        kernels.quant_matmul(x, layout, capture="error")
    with pytest.raises(ValueError, match="capture"):
        kernels.quant_matmul(x, layout, capture="everything")
    with pytest.raises(ValueError, match="int8"):
        kernels.quant_matmul(x.to(torch.int8), layout)


def test_tuning_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("BITCLIFF_CACHE", str(tmp_path))
    cache = tuning.TuningCache()
    dev = torch.device("cpu")
    assert cache.get(dev, "k") is None
    cache.put(dev, "k", {"BLOCK_N": 64, "num_warps": 4})
    assert tuning.TuningCache().get(dev, "k") == {"BLOCK_N": 64, "num_warps": 4}
    assert tuning.TuningCache.path(dev).parent == tmp_path
    assert "triton" in tuning.TuningCache.path(dev).name


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (28672, 8192), (576, 1536)])
@pytest.mark.parametrize("bits", BITS)
def test_autotune_pruning_keeps_sensible_configs(k, n, bits):
    y = torch.empty(1)
    for m in (1, 4):
        args = {"M": m, "N": n, "KP": k, "y_ptr": y}
        kept = tuning.prune_gemv(tuning.gemv_configs(), args, BITS=bits, GROUP_SIZE=128)
        assert kept
        for c in kept:
            assert c.kwargs["BLOCK_N"] // (32 * c.num_warps) in (2, 4, 8)  # columns per thread
            assert c.num_stages in (1, 2)
        # The rule of the seed audit: a warp for every scheduler of every SM, K slices of at
        # least two tiles, wherever some configuration can give them (not SmolLM2's 576 x 1536).
        if k >= 4096:
            units = k // 32
            for c in kept:
                bn, bu, sk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_U"], c.kwargs["SPLIT_K"]
                assert m * -(-n // bn) * sk * c.num_warps >= 4 * 132 and 2 * sk * bu <= units
    for m in (16, 64, 2048):
        args = {"M": m, "N": n, "KP": k, "y_ptr": y}
        kept = tuning.prune_tiled(tuning.tiled_configs(), args, BITS=bits, GROUP_SIZE=128)
        assert kept
        assert all(128 % c.kwargs["BLOCK_K"] == 0 for c in kept)
        assert m <= tuning.SPLIT_MAX_M or all(c.kwargs["SPLIT_K"] == 1 for c in kept)


@pytest.mark.parametrize("bits,group_size,k", [(2, 64, 160), (3, 32, 96), (4, 128, 200), (4, -1, 100)])
def test_dequant_schedule(kernels, device, bits, group_size, k):
    """The dense weight written once, then a matmul: same result as the reference."""
    run_case(kernels, device, bits=bits, group_size=group_size, k=k, m=5, dtype=torch.float16,
             schedule="dequant", capture="none", seed=bits)


def test_dequant_schedule_has_no_capture(kernels, device):
    tensors, _ = make_weight(64, 8, 4, 32)
    layout = from_gptq(**tensors, bits=4).to(device)
    x = torch.randn(2, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="dequant schedule has no fused capture"):
        kernels.quant_matmul(x, layout, capture="stats", schedule="dequant")


def test_measured_choice_keeps_the_faster_and_both_times(tmp_path, monkeypatch):
    monkeypatch.setenv("BITCLIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "TUNING_CACHE", tuning.TuningCache())
    calls = []
    candidates = {"tiled": lambda: calls.append("tiled"), "dequant": lambda: calls.append("dequant")}
    times = {"tiled": 2.0, "dequant": 1.5}
    fake_timer = lambda fn: times[next(name for name, f in candidates.items() if f is fn)]  # noqa: E731
    dev = torch.device("cpu")
    assert tuning.choose_by_measurement(dev, "choice|k", candidates, fake_timer) == "dequant"
    assert calls == ["tiled", "dequant"]  # each compiled and tuned once before timing
    assert tuning.TuningCache().get(dev, "choice|k") == {"schedule": "dequant", "ms": times}
    times["dequant"] = 9.0  # remembered: not timed again
    assert tuning.choose_by_measurement(dev, "choice|k", candidates, fake_timer) == "dequant"


def test_the_pruning_is_one_rule_for_tuner_cache_and_seed():
    """The autotuner's hooks and the cache reader's test of one configuration agree with ``prune``."""
    y = torch.empty(1)
    for schedule, hook, m in (("gemv", tuning.prune_gemv, 1), ("tiled", tuning.prune_tiled, 16)):
        args = {"M": m, "N": 4096, "KP": 4096, "y_ptr": y, "GROUP_SIZE": 128}
        kept = hook(tuning.candidates(schedule), args, GROUP_SIZE=128)
        assert kept == tuning.prune(schedule, tuning.candidates(schedule), m, 4096, 4096, 132, 128)
        kept_dicts = [tuning.config_dict(c) for c in kept]
        for c in tuning.candidates(schedule):
            assert tuning.admissible(schedule, tuning.config_dict(c), m, 4096, 4096, 132, 128) == (
                tuning.config_dict(c) in kept_dicts)


def test_the_launcher_reads_only_admissible_configurations(tmp_path, monkeypatch):
    """A cached configuration the pruning rejects is not launched, whoever wrote it; a seed's order
    is offered for measurement, less what the pruning rejects."""
    monkeypatch.setenv("BITCLIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "TUNING_CACHE", tuning.TuningCache())
    dev = torch.device("cpu")
    shape = dict(schedule="gemv", m=1, n=4096, kp=4096, group=128)
    # An earlier seed's W3 pick at 4096 x 4096: 2 * SPLIT_K * BLOCK_U = 256 > 128 units, and
    # 4 x 32 programs of 4 warps = 512 warps, fewer than one per scheduler of 132 SMs (528).
    rejected = {"BLOCK_N": 1024, "BLOCK_U": 4, "SPLIT_K": 32, "num_warps": 4, "num_stages": 1}
    good = {"BLOCK_N": 128, "BLOCK_U": 2, "SPLIT_K": 32, "num_warps": 1, "num_stages": 1}
    assert not tuning.admissible("gemv", rejected, 1, 4096, 4096, 132, 128)
    assert tuning.admissible("gemv", good, 1, 4096, 4096, 132, 128)
    tuning.TUNING_CACHE.put(dev, "measured-bad", rejected)
    tuning.TUNING_CACHE.put(dev, "measured-good", good)
    tuning.TUNING_CACHE.put(dev, "seeded", {"order": [rejected, good], "predicted_us": [[1.0, 2.0], [1.5, 2.5]]})
    assert tuning.cached_choices(dev, "measured-bad", **shape) == []
    assert tuning.cached_choices(dev, "measured-good", **shape) == [good]
    assert tuning.cached_choices(dev, "seeded", **shape) == [good]
    assert tuning.cached_choices(dev, "absent", **shape) == []
