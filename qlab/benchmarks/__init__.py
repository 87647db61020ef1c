"""Benchmark scripts (speed, not correctness: correctness lives in tests/). Run them as modules,
e.g. ``python -m qlab.benchmarks.kernels``."""
