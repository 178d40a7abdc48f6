"""Where and in which precision the model computes: one `pick_device`, one `DTYPES` table, and the `auto`
precision that follows what the hardware computes natively."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; `cuda` without CUDA is a clear error."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU computes natively, as torch and oneDNN see it."""

    isa: str  # torch's dispatch level: "AVX2", "AVX512", "DEFAULT", ...
    native_bf16: bool  # oneDNN has a bf16 path (AVX512-BF16 or AMX); without it bf16 matmuls are emulated


def cpu_capability() -> CpuCapability:
    """Ask torch and oneDNN, not /proc/cpuinfo: they know what their kernels will actually use (and honour
    ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA when a run restricts them)."""
    isa = torch.backends.cpu.get_cpu_capability()
    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuCapability(isa=isa, native_bf16=native)


def resolve_dtype(
    setting: str,
    device: torch.device,
    capability: Callable[[], CpuCapability] = cpu_capability,
) -> torch.dtype:
    """The compute dtype for `setting` on `device`. `auto` is bf16 only where it is native (a CUDA device with
    bf16, a CPU with AVX512-BF16 or AMX); elsewhere fp32, because emulated bf16 matmuls are ~100x slower.
    `capability` is a seam for tests that fake the other kind of CPU."""
    if setting != "auto":
        try:
            return DTYPES[setting]
        except KeyError:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {setting!r}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if capability().native_bf16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).removeprefix("torch.")
