"""The codebook (AQLM) matmul kernel against its torch reference, a hand example, and exact integer cases."""
import pytest
import torch

from qlab.core.tensor import CodebookTensor
from qlab.kernels.codebook import (codebook_dequantize, codebook_matmul, codebook_matmul_reference,
                                   codebook_matmul_tensor)


def _weight(M, bits, n, k, gen, d=8, scaled=True):
    codes = torch.randint(1 << bits, (M, n, k // d), generator=gen)
    codebooks = (torch.randn(M, 1 << bits, d, generator=gen) * 0.1).half()  # stored at fp16, as AQLM's
    scale = (torch.rand(n, generator=gen) + 0.5).half() if scaled else None
    return codes, codebooks, scale


def test_hand_example(backend):
    # the module docstring's example: W = [[0, 2, 2, 0]], x = [1, 2, 3, 4] -> 2*2 + 3*2 = 10
    codes, books, scale = torch.tensor([[[1, 0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([2.0])
    assert codebook_dequantize(codes, books, scale).tolist() == [[0.0, 2.0, 2.0, 0.0]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    for b in ("torch", backend):
        assert codebook_matmul(x, codes, books, scale, backend=b).tolist() == [[10.0]]


@pytest.mark.parametrize("M, bits, m, n", [(2, 4, 1, 33), (1, 8, 7, 40), (2, 8, 19, 24)])
def test_integer_codebooks_are_exact(seeded, backend, M, bits, m, n):
    """Small-integer codebook entries, scales and activations: every partial sum is an integer below 2^24, so
    the kernel must agree with the reference exactly, whatever the order of its additions."""
    gen = seeded(bits * 100 + n)
    codes = torch.randint(1 << bits, (M, n, 12), generator=gen)  # K = 96
    books = torch.randint(-3, 4, (M, 1 << bits, 8), generator=gen).float()
    scale = torch.randint(1, 4, (n,), generator=gen).float()
    x = torch.randint(-5, 6, (m, 96), generator=gen).float()
    assert torch.equal(codebook_matmul(x, codes, books, scale, backend=backend),
                       x @ codebook_dequantize(codes, books, scale).T)


# one unit in the last place of the output per activation dtype (the accumulation orders differ)
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("M, bits, m, n, k, dtype", [
    (2, 8, 1, 40, 64, torch.float32),     # AQLM 2x8, GEMV
    (1, 8, 5, 33, 96, torch.float16),     # 1x8, N ragged
    (2, 8, 17, 24, 48, torch.bfloat16),   # GEMM, M ragged, K not a multiple of BLOCK_K
    (1, 16, 3, 20, 128, torch.float32),   # 1x16: a 65,536-vector codebook
])
def test_kernel_matches_reference(seeded, backend, M, bits, m, n, k, dtype):
    gen = seeded(m * 1000 + k)
    codes, books, scale = _weight(M, bits, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    expected = codebook_matmul_reference(x, codes, books, scale).float()
    y = codebook_matmul(x, codes, books, scale, backend=backend)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=RTOL[dtype], atol=RTOL[dtype] * expected.abs().max().item())


def test_codebook_tensor_goes_straight_in(seeded, backend):
    gen = seeded(3)
    codes, books, scale = _weight(2, 8, 24, 64, gen)
    t = CodebookTensor((24, 64), codes, books, scale, bits=8)
    x = torch.randn(2, 3, 64, generator=gen)  # leading dims are flattened and restored
    assert torch.equal(codebook_dequantize(codes, books, scale), t.dequantize())
    y = codebook_matmul_tensor(x, t, backend=backend)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ t.dequantize().T, rtol=1e-5, atol=1e-6)
    unscaled = codebook_matmul(x, codes, books, None, backend=backend)  # no row scale
    torch.testing.assert_close(unscaled, x @ codebook_dequantize(codes, books, None).T, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_value_errors(seeded):
    codes, books, scale = _weight(2, 8, 8, 64, seeded())
    with pytest.raises(ValueError, match="K = 64"):
        codebook_matmul(torch.randn(1, 63), codes, books, scale)
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        codebook_matmul(torch.randn(1, 64), codes + 200, books, scale)
    with pytest.raises(ValueError, match="K = 32"):  # codebooks of 4-vectors: 8 groups of 4 cover 32 inputs, not 64
        codebook_matmul(torch.randn(1, 64), codes, books[:, :, :4], scale)
    with pytest.raises(ValueError, match="one entry per output row"):
        codebook_matmul(torch.randn(1, 64), codes, books, scale[:5])
    with pytest.raises(ValueError, match=r"codes must be \[M=2"):
        codebook_matmul(torch.randn(1, 64), codes[:1], books, scale)
