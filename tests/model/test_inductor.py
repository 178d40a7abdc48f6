"""torch.compile's CPU code generation is given its vector width before anything compiles (model/inductor.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.inductor import pin_cpu_simd_width

REPO = Path(__file__).resolve().parents[2]


def test_the_width_is_the_picked_isas_unless_already_set():
    import torch._inductor.config as inductor_config  # here, not at collection: ~1 s per test worker
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    # config.patch, not monkeypatch: monkeypatch's undo deleted the key from inductor's config for the rest of the run.
    before = inductor_config.cpp.simdlen
    with inductor_config.patch({"cpp.simdlen": None}):
        isa = pick_vec_isa()
        assert pin_cpu_simd_width() == (isa.bit_width() if isa else None)
        assert inductor_config.cpp.simdlen == (isa.bit_width() if isa else None)
    with inductor_config.patch({"cpp.simdlen": 256}):
        assert pin_cpu_simd_width() == 256  # a width the user chose is kept
    assert inductor_config.cpp.simdlen == before


@pytest.mark.skipif(
    not torch.cpu._is_avx512_supported(),
    reason="the mismatch needs a CPU with vectors wider than AVX2's (and the compile costs ~20 s on an AVX2 EPYC)",
)
def test_a_compiled_training_block_computes_what_eager_does_call_after_call():
    """On an AMX Xeon, torch 2.13 left to itself generated 8-float loops for 16-float AVX-512 vectors: from the second
    call on the output was 0.08 off, and the process sometimes died of heap corruption. A child process, so that such
    a death fails this test instead of the run."""
    code = """
import torch
from model.inductor import pin_cpu_simd_width
pin_cpu_simd_width()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64))
x = torch.randn(8, 64)
ref = m(x)
compiled = torch.compile(m)
diffs = [float((compiled(x) - ref).abs().max()) for _ in range(3)]
assert max(diffs) < 1e-5, diffs
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.returncode, run.stderr[-2000:])
