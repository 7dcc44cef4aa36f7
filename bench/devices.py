"""The GPUs the static model predicts for, with where each figure comes from.

A lent GPU machine is an H100 (80 GB) or an H200 (141 GB): both are GH100 chips with 132 SMs and
the same issue rates and matrix rate, and differ in memory bandwidth (about 3.0 against 4.3 TB/s),
which moves the balance between instruction issue and bytes.  ``bench/sass_model.py`` predicts
for both from the same compiled code and writes one tuning seed per device;
``bench/gpu_check.py`` reads the device name at run time and takes the matching seed and
predictions (:func:`device_for`).

No GPU library is imported here: the GPU check's dry run reads this on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """The figures the model assumes for one GPU."""

    name: str = "NVIDIA H200"  # as torch.cuda.get_device_name reports it
    sms: int = 132  # device query on the lent H200 and H100 alike
    clock_hz: float = 1.98e9  # SM clock read by nvidia-smi under load on the lent H200
    bandwidth: float = 4.3e12  # B/s, a device-to-device copy measured on the lent H200 (read + write)
    matrix_flops: float = 790e12  # bf16/fp16 dense matmul measured there through torch
    mma_sync_share: float = 0.5  # assumed: mma.sync (HMMA) code reaches half of the wgmma rate
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    # Assumed, to be measured by bench/kernels.py (the 4096 x 4096 rows at batch 1 are mostly this):
    # from one kernel's end to the next one's first instruction in a CUDA graph replay, about 2 us
    # on Hopper; then a tail of about 1 us: the first weight loads wait one DRAM round trip before
    # any work can start and the last stores (split-K: the partial sums, a counter, the final read)
    # one more before the kernel ends.  Added to every kernel's time and to fp16's alike.
    launch_s: float = 2.0e-6
    tail_s: float = 1.0e-6

    @property
    def latency_s(self) -> float:
        """The fixed cost of one launch, whatever its size."""
        return self.launch_s + self.tail_s


H200 = Device()
# The H100 of this workplace's device notes: copy 3.0 TB/s, bf16 matmul 798 TFLOP/s; its clock is
# assumed to be the H200's (the same chip and maximum clock), not read under load.
H100 = Device(name="NVIDIA H100 80GB HBM3", bandwidth=3.0e12, matrix_flops=798e12)
DEVICES = (H200, H100)


def device_for(name: str) -> Device | None:
    """The preset for a device name as the GPU reports it (``"NVIDIA H100 80GB HBM3"``,
    ``"NVIDIA H200"``, other H100 and H200 variants by their family), or None if unknown."""
    upper = name.upper()
    for family, device in (("H200", H200), ("H100", H100)):
        if family in upper:
            return device
    return None


def slug(name: str) -> str:
    """A device name as the tuning cache spells it in file names (``tuning.TuningCache.path``)."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
