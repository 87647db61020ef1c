import pytest
import torch

from qlab.core.formats import get_grid
from qlab.kernels.nf4 import NF4Weight, nf4_dequantize, nf4_dequantize_reference, nf4_gemv, nf4_gemv_reference, nf4_quantize
from qlab.core.quant import quantize


@pytest.mark.parametrize("shape, blocksize", [((37, 131), 64), ((8, 64), 64), ((130, 70), 32)])
def test_dequantize_kernel_is_exact(seeded, backend, shape, blocksize):
    # (130, 70) has 285 blocks of 32: more than one 256-block of double-quantized absmax
    W = torch.randn(*shape, generator=seeded(shape[0])) * 0.02
    qt = quantize(W, f"nf4-b{blocksize}-dq")
    w = NF4Weight.from_quantized(qt)
    ref = nf4_dequantize_reference(w)
    assert torch.equal(ref, qt.dequantize())  # the reference agrees with qlab's core bit for bit
    assert torch.equal(nf4_dequantize(w, backend=backend), ref)
    half = nf4_dequantize(w, dtype=torch.float16, backend=backend)
    assert half.dtype == torch.float16 and torch.equal(half, ref.half())


def test_double_quant_constants_and_size(seeded):
    w = nf4_quantize(torch.randn(64, 64, generator=seeded(1)))
    assert torch.equal(w.levels, get_grid("nf4").levels)
    assert w.absmax_codes.dtype == torch.uint8 and w.absmax_codes.numel() == 64 * 64 // 64
    assert w.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))  # QLoRA: 4.127
    exact = torch.randn(64, 64, generator=seeded(1)).reshape(-1, 64).abs().amax(1)
    # c1 after double quantization is within half an int8 step of the true absmax
    step = w.absmax_scale.max().item()
    assert (w.absmax() - exact).abs().max() <= step / 2 + 1e-7


@pytest.mark.parametrize("m, n, k", [(1, 33, 130), (3, 20, 64)])
def test_gemv_matches_reference(seeded, backend, m, n, k):
    gen = seeded(k)
    w = nf4_quantize(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(m, k, generator=gen)
    y = nf4_gemv(x, w, backend=backend)
    torch.testing.assert_close(y, nf4_gemv_reference(x, w), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="nf4-b<size>-dq"):
        NF4Weight.from_quantized(quantize(torch.randn(4, 64), "nf4"))
    w = nf4_quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="last dimension must be the weight.s K = 64"):
        nf4_gemv(torch.randn(1, 65), w)
    with pytest.raises(ValueError, match="2-d weight"):
        nf4_gemv(torch.randn(1, 64), nf4_quantize(torch.randn(2, 4, 64)))
