"""qlab.study.gptq_view: per-column output error with and without the cross terms, against hand values."""
import pytest
import torch

from qlab.methods.weight.gptq import output_error
from qlab.study.gptq_view import column_output_error


def test_hand_example():
    # X has two perfectly correlated columns; W = (1, 1), W_hat = (1.5, 0.5): D = (-0.5, 0.5) cancels on X
    X = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    s = column_output_error(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.5, 0.5]]), X)
    # A = XᵀX = [[5, 5], [5, 5]], ||X Wᵀ||² = 2² + 4² = 20; diagonal: 0.25 * 5 / 20 each; full: 0
    assert s["diagonal"].tolist() == pytest.approx([0.0625, 0.0625])
    assert s["full"].tolist() == pytest.approx([0.0, 0.0])


def test_full_shares_sum_to_the_output_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g) @ torch.randn(8, 8, generator=g)  # correlated columns
    W = torch.randn(5, 8, generator=g)
    W_hat = W + 0.1 * torch.randn(5, 8, generator=g)
    s = column_output_error(W, W_hat, X)
    assert float(s["full"].sum()) == pytest.approx(output_error(W, W_hat, X), rel=1e-5)
    with pytest.raises(ValueError, match="need W and W_hat of one shape"):
        column_output_error(W, W_hat[:, :4], X)
