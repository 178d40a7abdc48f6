"""What machine a result was measured on: CPU model, ISA (as torch and oneDNN use it, plus the kernel's flags for
AVX-512, AVX512-BF16 and AMX), threads, and optionally the measured read bandwidth and matmul FLOP/s, so figures
from different kinds of machine are never mixed."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from model.device import bf16_instructions_allowed, cpu_capability, onednn_max_isa

# /proc/cpuinfo flags that name the ISA extensions the precision and kernel choices depend on.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags from /proc/cpuinfo (`cpuinfo` text for tests); empty when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# What keeps a run to a lower ISA than the CPU's, to approximate an AVX2-only machine on an AVX-512 one: torch's
# own kernels and the native ones (ATEN_CPU_CAPABILITY), oneDNN (packed linears, bf16 support), and MKL, which runs
# torch's fp32 matmuls (on the AMX Xeon 1024^2 fp32 went from 321 to 187 GFLOP/s with it, and did not move with the
# other two). fbgemm (int8) has no such switch: it runs its AVX-512 kernels whatever is set.
RESTRICTING_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_label(torch_isa: str, native_bf16: bool, flags: set[str], onednn_max: str | None = None) -> str:
    """One word for tables: AMX, AVX512-BF16, AVX-512, AVX2 (or torch's level when it is none of these).
    AMX comes from the CPU flags (torch's dispatch level does not name it) and oneDNN's ISA limit (`onednn_max`,
    ONEDNN_MAX_CPU_ISA); the rest from what torch/oneDNN use, so a run restricted by ATEN_CPU_CAPABILITY /
    ONEDNN_MAX_CPU_ISA is labelled by what it really ran."""
    amx_allowed = bf16_instructions_allowed(onednn_max) == "AMX"
    if native_bf16 and amx_allowed and "amx_bf16" in flags and torch_isa.startswith("AVX512"):
        return "AMX"
    if native_bf16:
        return "AVX512-BF16"
    if torch_isa.startswith("AVX512"):
        return "AVX-512"
    return torch_isa


def describe_machine(measure: bool = True, quick: bool = False) -> dict[str, Any]:
    """The machine record every bench result carries; `measure` adds read bandwidth (GB/s) and fp32/bf16 matmul
    GFLOP/s from `bench.ceiling` (a few seconds; `quick` uses smaller sizes)."""
    cap = cpu_capability()
    flags = cpu_flags()
    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "isa": isa_label(cap.isa, cap.native_bf16, flags, onednn_max_isa()),
        "torch_cpu_capability": cap.isa,
        "native_bf16": cap.native_bf16,
        "cpu_flags": sorted(f for f in ISA_FLAGS if f in flags),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "restricted": {k: os.environ[k] for k in RESTRICTING_ENV if k in os.environ},
    }
    if measure:
        from bench.ceiling import measure_matmul_flops, measure_read_bandwidth

        record["bandwidth_gbs"] = (
            measure_read_bandwidth(nbytes=(256 << 20) if quick else (1 << 30), repeats=3 if quick else 5) / 1e9
        )
        n = 512 if quick else 1024
        record["matmul_gflops"] = {
            name: measure_matmul_flops(dtype, n=n, repeats=3) / 1e9
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
        }
    return record


def machine_line(record: dict[str, Any]) -> str:
    """The record as one line for a table's heading."""
    parts = [f"{record['cpu']}, {record['isa']}", f"{record['threads']} of {record['cores']} threads"]
    if record.get("restricted"):
        parts.append("restricted " + " ".join(f"{k}={v}" for k, v in record["restricted"].items()))
    if "bandwidth_gbs" in record:
        parts.append(f"read {record['bandwidth_gbs']:.1f} GB/s")
    if "matmul_gflops" in record:
        parts.append("matmul " + " / ".join(f"{k} {v:.0f}" for k, v in record["matmul_gflops"].items()) + " GFLOP/s")
    parts.append(f"torch {record['torch']}")
    return "; ".join(parts)
