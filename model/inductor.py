"""What torch.compile's CPU code generation is told before the trainer or the server compiles anything."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def pin_cpu_simd_width() -> int | None:
    """Set inductor's CPU vector width (`cpp.simdlen`) to that of the instruction set it picks, unless already set;
    returns the width in use (None where inductor finds no vector ISA).

    Why: left unset, torch 2.13 on an AMX Xeon (its pick: AVX-512 with AMX tiles) generated loops of 8 floats for
    kernels built with 16-float AVX-512 vectors. Each store then wrote 8 floats past its loop's end: a compiled
    Linear-SiLU-Linear under autograd returned values 0.08 off from its second call on, and the process died of heap
    corruption (`free(): invalid pointer`) now and then. With the width named, the generated loops and the vectors
    they are built with agree (tests/model/test_inductor.py)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if inductor_config.cpp.simdlen is None:
        isa = pick_vec_isa()
        if not isa:
            return None
        inductor_config.cpp.simdlen = isa.bit_width()
        log.info("inductor CPU code: %d-bit vectors (%s)", inductor_config.cpp.simdlen, isa)
    return inductor_config.cpp.simdlen
