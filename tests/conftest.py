import os

import pytest
import torch

# Triton decides at import time whether it runs without a GPU: set its interpreter on before any test
# module (or transformers, which may import triton) gets the chance to import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def weight(gen):
    """A small Linear-like weight [out=16, in=576] (576 = the embedded model's width) with outliers."""
    w = torch.randn(16, 576, generator=gen) * 0.02
    w[3, 100] = 0.5
    w[7, 575] = -0.4
    return w


@pytest.fixture
def one_thread():
    """Small matmuls on 2 shared cores run far faster on one thread than on two oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["C", "numba"])
def cpu_loops(request, monkeypatch):
    """Run the test with the C loops of qlab.core._cpu, then with their numba twins (the C module switched off)."""
    from qlab.core import decode4
    from qlab.core.formats import floating, integer

    if request.param == "C" and decode4._cpu is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build qlab.core._cpu (pip install -e . with a C compiler)")
        pytest.skip("qlab.core._cpu is not built (no C compiler at install): qlab runs the numba loops")
    if request.param == "numba":
        monkeypatch.setattr(decode4, "_cpu", None)
        monkeypatch.setattr(floating, "_cpu", None)
        monkeypatch.setattr(integer, "_cpu", None)
    return request.param
