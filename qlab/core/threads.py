"""qlab's compiled loops on torch's threads, without numba's parallel layer.

numba's ``parallel=True`` loops run on its OpenMP layer here, and once that pool was up it slowed torch's own
OpenMP work in the same process (whole-model GPTQ 3x slower). So qlab's compiled loops release the GIL instead
(numba's ``nogil=True``, the C extension's ``Py_BEGIN_ALLOW_THREADS``), take a range of their work, and
``run_split`` hands disjoint ranges to Python threads: as many pieces as torch has threads
(``torch.get_num_threads()``, so ``torch.set_num_threads(1)`` keeps everything on the calling thread), the
calling thread doing the first. Each piece writes its own part of the output: the bits do not depend on the split.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None


def pieces(n: int, grain: int) -> int:
    """How many pieces ``run_split`` cuts [0, n) into: torch's thread count, fewer when a piece would hold
    fewer than ``grain`` items (handing work to a thread costs tens of microseconds)."""
    return max(1, min(torch.get_num_threads(), n // max(1, grain)))


def run_split(work, n: int, grain: int) -> None:
    """``work(start, stop)`` over contiguous pieces of [0, n) (``pieces``), in parallel; ``work`` must release
    the GIL to gain anything. Exceptions from any piece are raised here."""
    global _pool
    k = pieces(n, grain)
    if k == 1:
        work(0, n)
        return
    if _pool is None or _pool._max_workers < k - 1:
        _pool = ThreadPoolExecutor(k - 1, thread_name_prefix="qlab-split")
    bounds = [n * i // k for i in range(k + 1)]
    futures = [_pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    try:
        work(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()
