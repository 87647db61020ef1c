import pytest
import torch

from qlab.methods.activation.llm_int8 import llm_int8_matmul, outlier_columns
from qlab.models.modules import Int8Linear


def vectorwise_int8(X, W):
    """Plain vector-wise int8 written out by hand (round(x * 127 / absmax) per row of X and of W)."""
    ax, aw = X.abs().amax(1, keepdim=True), W.abs().amax(1, keepdim=True)
    qx, qw = torch.round(X * 127 / ax), torch.round(W * 127 / aw)
    return (qx.double() @ qw.double().T * (ax / 127).double() * (aw / 127).double().T).float()


def test_hand_example():
    X = torch.tensor([[1.0, 8.0], [2.0, -1.0]])
    out = llm_int8_matmul(X, torch.tensor([[1.0, 1.0]]))
    assert out.outliers.tolist() == [False, True]
    assert out.fraction == 0.5
    assert torch.allclose(out.Y, torch.tensor([[9.0], [1.0]]))


def test_without_outliers_it_is_vectorwise_int8(gen):
    X, W = torch.randn(16, 64, generator=gen), torch.randn(8, 64, generator=gen)
    out = llm_int8_matmul(X, W, threshold=float("inf"))
    assert out.fraction == 0.0
    assert torch.allclose(out.Y, vectorwise_int8(X, W), rtol=1e-5, atol=1e-5)


def test_decomposition_rescues_outlier_features(gen):
    X, W = torch.randn(64, 256, generator=gen), torch.randn(32, 256, generator=gen) * 0.05
    X[:, [7, 100]] *= 40.0  # two systematic outlier features
    ref = X @ W.T
    mixed = llm_int8_matmul(X, W)
    assert outlier_columns(X).nonzero().flatten().tolist() == [7, 100]
    assert mixed.fraction == 2 / 256
    e_mixed = float(((mixed.Y - ref) ** 2).mean())
    e_plain = float(((vectorwise_int8(X, W) - ref) ** 2).mean())
    assert e_mixed < 0.1 * e_plain, (e_mixed, e_plain)


def test_int8_linear_matches_bitsandbytes_layout_by_hand(gen):
    """Int8Linear stores W int8 per row over all columns (bitsandbytes' CB / SCB); the outlier column runs in
    float against the de-quantized weight, the rest int8 x int8 with per-token activation scales."""
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(3, 4, 64, generator=gen)
    x[..., 5] = 10.0
    layer = Int8Linear.from_linear(lin)
    y = layer(x)
    assert y.shape == (3, 4, 8) and layer.last_fraction == 1 / 64
    W = lin.weight.detach()
    sw = W.abs().amax(1, keepdim=True) / 127
    Wq = torch.round(W / sw).clamp(-127, 127)  # the stored codes
    X = x.reshape(-1, 64)
    O = torch.zeros(64, dtype=torch.bool)
    O[5] = True
    Xr = X[:, ~O]
    sx = Xr.abs().amax(1, keepdim=True) / 127
    by_hand = X[:, O] @ (Wq * sw)[:, O].T + ((torch.round(Xr / sx).double() @ Wq[:, ~O].double().T) * sx.double() * sw.double().T).float()
    assert torch.allclose(y.reshape(-1, 8), by_hand + lin.bias, atol=1e-5, rtol=0)
    assert torch.allclose(y, lin(x), atol=0.05)


@pytest.mark.parametrize("threshold", [float("nan"), 0.0, -6.0, "6"])
def test_threshold_must_be_a_positive_number(threshold):
    """threshold=nan used to find no outliers silently (every comparison with NaN is False)."""
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        llm_int8_matmul(torch.randn(4, 16), torch.randn(8, 16), threshold=threshold)
