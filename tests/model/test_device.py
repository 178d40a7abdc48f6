"""What counts as native bf16 on a CPU, and how a run's oneDNN ISA limit narrows it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from model.device import bf16_instructions_allowed, cpu_capability, has_native_bf16


@pytest.mark.parametrize(
    ("onednn_bf16", "machine", "avx512_bf16", "max_isa", "expected"),
    [
        (True, "x86_64", True, None, True),  # Cooper Lake, Sapphire Rapids, Zen 4
        # AVX-512 without AVX512-BF16 (Skylake-SP, Cascade Lake): oneDNN says yes and emulates; 4x slower than fp32.
        (True, "x86_64", False, None, False),
        (True, "x86_64", True, "AVX512_CORE", False),  # a run keeping oneDNN to that level emulates it too
        (True, "x86_64", True, "AVX512_CORE_BF16", True),
        (False, "x86_64", False, "AVX2", False),  # AVX2 only (or kept to it)
        (True, "aarch64", False, None, True),  # ARM's bf16: oneDNN's answer stands
        (False, "aarch64", False, None, False),
    ],
)
def test_native_bf16_needs_bf16_instructions_oneDNN_may_use(onednn_bf16, machine, avx512_bf16, max_isa, expected):
    assert has_native_bf16(onednn_bf16, machine, avx512_bf16, max_isa) == expected


def test_onednn_isa_levels_name_the_bf16_instructions_they_allow():
    assert bf16_instructions_allowed(None) == "AMX"
    assert bf16_instructions_allowed("ALL") == "AMX"
    assert bf16_instructions_allowed("avx512_core_amx") == "AMX"
    assert bf16_instructions_allowed("AVX512_CORE_BF16") == "AVX512-BF16"
    assert bf16_instructions_allowed("avx512_core_vnni") == "none"
    assert bf16_instructions_allowed("AVX2") == "none"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 rule")
def test_this_cpu_as_torch_and_onednn_see_it():
    """Unrestricted: native bf16 exactly where the CPU has AVX512-BF16 (and oneDNN). Kept to AVX512_CORE (what an
    AVX-512 CPU without bf16 instructions runs), a fresh process says no and `auto` picks fp32 there."""
    onednn = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if "ONEDNN_MAX_CPU_ISA" not in os.environ and "DNNL_MAX_CPU_ISA" not in os.environ:
        assert cpu_capability().native_bf16 == (onednn and torch.cpu._is_avx512_bf16_supported())
    code = (
        "import torch; from model.device import cpu_capability, resolve_dtype; "
        "print(cpu_capability().native_bf16, resolve_dtype('auto', torch.device('cpu')))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    env.pop("DNNL_MAX_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "torch.float32"]
