"""Fixtures for the algorithm tests: one real layer of the embedded model, with correlated inputs.

The weight is read straight from the embedded GGUF file (``blk.5.attn_v.weight``, Q4_1 blocks of 32,
de-quantized with the gguf package's own decoder), so these tests do not need the transformers load.
The calibration inputs are synthetic but shaped like a transformer's: strongly correlated channels
(a random low-rank mixing plus noise) and a handful of outlier channels ~20x larger than the rest.
"""
import gguf
import pytest
import torch

from qlab.models import embedded_gguf_path


def gguf_weight(name: str) -> torch.Tensor:
    reader = gguf.GGUFReader(embedded_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()


def correlated_inputs(n: int, dim: int, seed: int = 0, rank: int = 32, outliers: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, dim, generator=g)
    X = torch.randn(n, rank, generator=g) @ mixing / rank**0.5 + 0.3 * torch.randn(n, dim, generator=g)
    X[:, torch.randperm(dim, generator=g)[:outliers]] *= 20.0
    return X


@pytest.fixture(scope="session")
def real_layer(request):
    """(W [192, 576], X [1024, 576]): SmolLM2-135M layer 5 v_proj and correlated inputs.

    Parsing the GGUF file takes ~10 s (its 49k-token vocabulary), so the weight is kept in pytest's cache.
    """
    cached = request.config.cache.mkdir("qlab-algorithms") / "blk.5.attn_v.weight.pt"
    if not cached.exists():
        torch.save(gguf_weight("blk.5.attn_v.weight"), cached)
    return torch.load(cached), correlated_inputs(1024, 576)


@pytest.fixture(autouse=True)
def _methods_on_one_thread(one_thread):
    """Every method test runs on one thread (the ``one_thread`` fixture of tests/conftest.py)."""
    yield
