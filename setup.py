"""The one compiled extension; everything else is in pyproject.toml.

qlab/core/_lut4.c is decode4's 4-bit table lookup with AVX-512 permutes. It is optional: without a C compiler
the install goes on, and qlab.core.decode4 runs its numba loop, which gives the same bits.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("qlab.core._lut4", ["qlab/core/_lut4.c"], optional=True,
                             extra_compile_args=["-O2", "-ffp-contract=off"])])  # no fused multiply-adds: decode4's bits
