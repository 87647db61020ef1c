"""Kernel tests run the Triton kernels under the interpreter on this CPU (compiled, on a GPU).

Triton 3.9 decides at import time whether it can run without a GPU, so TRITON_INTERPRET=1 is set
here, before anything imports triton.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def backend():
    """'triton' on a GPU, else 'interpret'; the tests are skipped when Triton is not installed."""
    pytest.importorskip("triton")
    return "triton" if torch.cuda.is_available() else "interpret"


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def seeded():
    """seeded(s) -> a torch.Generator seeded with s (fixtures small and reproducible)."""
    return lambda seed=0: torch.Generator().manual_seed(seed)
