"""The one compiled extension; everything else is in pyproject.toml.

qlab/core/_cpu.c holds four CPU loops in C (the 4-bit and 8-bit decoders, the E4M3 and integer encoders) on torch's OpenMP
threads. It is optional: without a C compiler the install goes on, and qlab runs the numba loops, which give the
same bits on one thread.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("qlab.core._cpu", ["qlab/core/_cpu.c"], optional=True,
                             # no fused multiply-adds (the numba loops' bits); OpenMP: torch's libgomp at run time
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp", "-mprefer-vector-width=512"],
                             extra_link_args=["-fopenmp"])])
