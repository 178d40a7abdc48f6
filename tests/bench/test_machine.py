from __future__ import annotations

import torch

from bench.machine import cpu_flags, cpu_model, describe_machine, isa_label, machine_line

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpuinfo_parsing():
    assert {"avx2", "amx_bf16"} <= cpu_flags(CPUINFO)
    assert cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_flags("no flags here") == set()


def test_isa_label_names_the_kind_of_cpu():
    amx = cpu_flags(CPUINFO)
    assert isa_label("AVX512", True, amx) == "AMX"
    assert isa_label("AVX512", True, {"avx512_bf16"}) == "AVX512-BF16"
    assert isa_label("AVX512", False, {"avx512f"}) == "AVX-512"
    assert isa_label("AVX2", False, {"avx2"}) == "AVX2"
    # A run restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) on an AMX machine says AVX2.
    assert isa_label("AVX2", False, amx) == "AVX2"
    # One kept to AVX512_CORE_BF16 (approximating Cooper Lake or Zen 4) says what our bf16 kernels then run.
    assert isa_label("AVX512", True, amx, "AVX512_CORE_BF16") == "AVX512-BF16"
    assert isa_label("AVX512", True, amx, "avx512_core_amx") == "AMX"


def test_describe_machine_records_isa_threads_and_measurements(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # MKL runs torch's fp32 matmuls: restricted apart
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    record = describe_machine(measure=False)
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"] == torch.get_num_threads()
    assert record["restricted"] == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert "bandwidth_gbs" not in record
    line = machine_line({**record, "bandwidth_gbs": 18.04, "matmul_gflops": {"float32": 90.2, "bfloat16": 0.9}})
    assert record["isa"] in line and "read 18.0 GB/s" in line and "float32 90 / bfloat16 1 GFLOP/s" in line
    assert "restricted ATEN_CPU_CAPABILITY=avx2" in line
