"""Model FLOPs utilisation: the FLOPs a step needs, the hardware's peak in the precision the run computes in,
and their ratio.

MFU = tokens/s across all ranks x FLOPs/token / (world size x per-device peak). The peak comes from the
datasheet for GPUs we know (dense, no sparsity), else from timing large matmuls here in the compute dtype.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ModelConfig

log = logging.getLogger(__name__)

# Datasheet dense peaks per device in TFLOP/s, by compute dtype. The first key found in the device name wins,
# so the more specific names come first ("H100 PCIe" before "H100"). fp32 is the non-tensor-core peak: the
# trainer's fp32 does not enable TF32.
DATASHEET_TFLOPS: dict[torch.dtype, tuple[tuple[str, float], ...]] = {
    torch.bfloat16: (
        ("B200", 2250.0),
        ("H200", 989.4),
        ("GH200", 989.4),
        ("H100 PCIe", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.4),  # SXM
        ("A100", 312.0),
        ("L40S", 362.1),
        ("L40", 181.0),
        ("A10G", 70.0),
        ("A10", 125.0),
        ("L4", 121.0),
        ("RTX 4090", 165.2),
    ),
    torch.float32: (
        ("B200", 80.0),
        ("H200", 66.9),
        ("GH200", 66.9),
        ("H100 PCIe", 51.2),
        ("H100 NVL", 60.0),
        ("H100", 66.9),
        ("A100", 19.5),
        ("L40S", 91.6),
        ("L40", 90.5),
        ("A10G", 31.2),
        ("A10", 31.2),
        ("L4", 30.3),
        ("RTX 4090", 82.6),
    ),
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H Q T (nanoGPT / PaLM appendix B)."""
    return 6.0 * config.num_params() + 12.0 * config.n_layer * config.n_head * config.head_dim * seq_len


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak FLOP/s of a device named `device_name` (as CUDA reports it) in `dtype`, if known."""
    for key, tflops in DATASHEET_TFLOPS.get(dtype, ()):
        if key in device_name:
            return tflops * 1e12
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (best of `repeats`, after a warm-up). Large enough that
    the kernel, not the call, is timed: n=1024 on a CPU (2.1 GFLOP, ~20 ms at 100 GFLOP/s: 2048 gave the same
    figure within this host's noise for 8x the work at every trainer start), 8192 on a GPU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s and where the figure came from (for the log line)."""

    flops: float
    source: str


def device_peak(
    device: torch.device,
    dtype: torch.dtype,
    configured_tflops: float | None = None,
    device_name: Callable[[torch.device], str] | None = None,
    measure: Callable[[torch.device, torch.dtype], float] | None = None,
) -> Peak:
    """The per-device peak for MFU: `peak_tflops` from the config, else the datasheet's for a known GPU in the
    compute dtype, else measured here in that dtype. `device_name` and `measure` are seams for tests."""
    if configured_tflops:
        return Peak(configured_tflops * 1e12, "configured peak_tflops")
    if device.type == "cuda":
        name = (device_name or torch.cuda.get_device_name)(device)
        flops = datasheet_peak_flops(name, dtype)
        if flops is not None:
            return Peak(flops, f"datasheet {name}, {str(dtype).removeprefix('torch.')} dense")
    return Peak(
        (measure or measure_matmul_flops)(device, dtype),
        f"measured {str(dtype).removeprefix('torch.')} matmul on {device.type}",
    )


class MfuMeter:
    """MFU of a throughput, never above 100%: a figure above it means the peak is wrong (a measurement that
    caught the CPU at a slow moment, a wrong datasheet entry), so it is clamped and reported once."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int = 1) -> None:
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self._warned = False

    def __call__(self, tokens_per_s: float) -> float | None:
        """`tokens_per_s` counts every rank's tokens; the denominator is every rank's peak."""
        if not self.peak_flops:
            return None
        mfu = tokens_per_s * self.flops_per_token / (self.world_size * self.peak_flops)
        if mfu > 1.0:
            if not self._warned:
                log.warning(
                    "MFU computed as %.0f%% against a peak of %.3g FLOP/s per device: the peak is too low; "
                    "reporting 100%% (set peak_tflops to the hardware's datasheet figure)",
                    100 * mfu,
                    self.peak_flops,
                )
                self._warned = True
            return 1.0
        return mfu
