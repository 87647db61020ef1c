import pytest
import torch


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
