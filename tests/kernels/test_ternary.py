import pytest
import torch

from qlab.kernels.ternary import TernaryWeight, ternary_matmul, ternary_matmul_reference, ternary_quantize
from qlab.core.quant import quantize


def test_hand_example():
    w = ternary_quantize(torch.tensor([[1.0, 0.0, -1.0, 1.0]]))
    assert w.packed.tolist() == [0b10_00_01_10] and w.values().tolist() == [[1.0, 0.0, -1.0, 1.0]]
    assert w.scale == pytest.approx(0.75)  # gamma = mean |W|


@pytest.mark.parametrize("m, n, k", [(1, 33, 70), (19, 40, 129)])
def test_integer_activations_are_exact(seeded, backend, m, n, k):
    gen = seeded(k)
    w = ternary_quantize(torch.randn(n, k, generator=gen))
    w = TernaryWeight(w.packed, 1.0, w.shape)  # gamma = 1: every partial sum is a small integer
    x = torch.randint(-5, 6, (m, k), generator=gen).float()
    assert torch.equal(ternary_matmul(x, w, backend=backend), x @ w.values().T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_activations(seeded, backend, dtype):
    gen = seeded(5)
    W = torch.randn(24, 100, generator=gen)
    qt = quantize(W, "ternary")
    w = TernaryWeight.from_quantized(qt)
    assert torch.equal(w.dequantize(), qt.dequantize())
    x = torch.randn(17, 100, generator=gen).to(dtype)
    y, ref = ternary_matmul(x, w, backend=backend).float(), ternary_matmul_reference(x, w).float()
    tol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())
