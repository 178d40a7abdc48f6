"""Where and in which precision the model computes: one `pick_device`, one `DTYPES` table, and the `auto`
precision that follows what the hardware computes natively."""

from __future__ import annotations

import logging
import os
import platform
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


# oneDNN's ISA levels (the values of its ONEDNN_MAX_CPU_ISA) by the bf16 instructions a run kept to one of them may
# use: none below AVX512_CORE_BF16 (oneDNN still "supports" bf16 on AVX512_CORE, by emulation), AVX512-BF16 below
# the AMX levels. Any other value (ALL, the AMX levels and above) leaves AMX too.
BF16_INSTRUCTIONS = ("none", "AVX512-BF16", "AMX")
ONEDNN_ISA_BF16 = {
    **dict.fromkeys(("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"), "none"),
    **dict.fromkeys(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512"), "AVX512-BF16"),
}


def onednn_max_isa() -> str | None:
    """The ISA level a run keeps oneDNN to (oneDNN reads ONEDNN_MAX_CPU_ISA, then its older name DNNL_MAX_CPU_ISA);
    None when unrestricted."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")


def bf16_instructions_allowed(max_isa: str | None) -> str:
    """The most a run kept to oneDNN level `max_isa` may use of BF16_INSTRUCTIONS."""
    return ONEDNN_ISA_BF16.get((max_isa or "ALL").upper(), "AMX")


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU computes natively, as torch and oneDNN see it."""

    isa: str  # torch's dispatch level: "AVX2", "AVX512", "DEFAULT", ...
    native_bf16: bool  # bf16 instructions (AVX512-BF16 or AMX) that oneDNN may use; without them bf16 is emulated


def has_native_bf16(onednn_bf16: bool, machine: str, avx512_bf16: bool, max_isa: str | None) -> bool:
    """Whether bf16 matmuls run on bf16 instructions. oneDNN's own answer (`onednn_bf16`) is also yes on x86 CPUs
    with AVX-512 but no AVX512-BF16 (Skylake-SP, Cascade Lake), where it emulates them: measured here with oneDNN
    kept to AVX512_CORE, a 1536 x 576 bf16 product ran 65-70 GFLOP/s at 64-320 rows against fp32's 244-314 (and
    206 with AVX512-BF16). So on x86 the CPU must have AVX512-BF16 (every AMX CPU has it too), and the run must let
    oneDNN use it; elsewhere (ARM's bf16) oneDNN's answer stands."""
    if not onednn_bf16:
        return False
    if machine not in ("x86_64", "AMD64"):
        return True
    return avx512_bf16 and bf16_instructions_allowed(max_isa) != "none"


def cpu_capability() -> CpuCapability:
    """Ask torch and oneDNN, not /proc/cpuinfo: they know what their kernels will actually use (and honour
    ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA when a run restricts them)."""
    isa = torch.backends.cpu.get_cpu_capability()
    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = has_native_bf16(onednn, platform.machine(), torch.cpu._is_avx512_bf16_supported(), onednn_max_isa())
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
