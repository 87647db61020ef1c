import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")


def test_every_kernel_compiles_for_a_gpu_without_one():
    """The interpreter forgives what the compiler rejects (a constexpr reassigned in an unrolled loop
    was one such bug here); so each distinct launch of each kernel is also compiled to an sm_80 binary.
    The same process, having imported Triton in compiled mode, must refuse the interpreter clearly."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, refusal, line = out.stdout.strip().splitlines()
    assert refusal.startswith("interpreter: Triton was imported before TRITON_INTERPRET=1 was set")
    for name in ("_gemm_kernel", "_gemv_kernel", "_matmul_kernel", "_quantize_kernel", "_absmax_kernel",
                 "_dequantize_kernel", "_fwht_kernel", "_codebook_kernel"):
        assert name in line, line
