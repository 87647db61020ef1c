import pytest
import torch

from qlab.core.formats import get_grid
from qlab.kernels.nf4 import NF4Weight, nf4_dequantize, nf4_dequantize_reference, nf4_gemv, nf4_gemv_reference, nf4_quantize
from qlab.core.quant import quantize


def nearest(values, table):
    """Index of the nearest entry of ``table`` for each value, by brute force over the whole table."""
    return (values[:, None] - table[None, :]).abs().argmin(dim=1)


def qlora_double_quant(W, blocksize):
    """QLoRA's NF4 with double-quantized absmax (Dettmers et al. 2023, sec. 3, eq. 6), written out plainly:

    c1 = absmax of each block of ``blocksize`` consecutive elements, stored in fp16 (the 'nf4' spec's scale
    dtype); c1 minus its mean, in blocks of 256, each divided by its own absmax c2 (fp32) and rounded to the
    nearest of the 256 levels of the 8-bit dynamic map; decoded c1_hat = table[code] * c2 + mean.
    Returns (codes, c1_hat, c1, half_step) per first-level block, half_step = c2 * half the gap between the
    two table levels around (c1 - mean) / c2: the largest error a round-to-nearest code can make there.
    """
    flat = W.reshape(-1).float()
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize))  # zeros do not change an absmax
    c1 = flat.reshape(-1, blocksize).abs().amax(dim=1).half().float()
    mean = c1.mean().item()
    table = get_grid("dynamic8").levels
    codes, c1_hat, half_step = [], [], []
    for start in range(0, c1.numel(), 256):
        v = c1[start:start + 256] - mean
        c2 = v.abs().max()
        u = v / c2
        code = nearest(u, table)
        codes.append(code)
        c1_hat.append(table[code] * c2 + mean)
        above = torch.searchsorted(table, u).clamp(1, 255)  # table[above - 1] <= u <= table[above]
        half_step.append(c2 * (table[above] - table[above - 1]) / 2)
    return torch.cat(codes), torch.cat(c1_hat), c1, torch.cat(half_step)


def nf4_expected(W, blocksize):
    """The dequantized NF4 weight: each element rounded to the nearest NF4 level of W / c1_hat, times c1_hat."""
    _, c1_hat, _, _ = qlora_double_quant(W, blocksize)
    e = torch.arange(W.numel())
    scale = c1_hat[e // blocksize]
    levels = get_grid("nf4").levels
    return (levels[nearest(W.reshape(-1).float() / scale, levels)] * scale).reshape(W.shape)


@pytest.mark.parametrize("shape, blocksize", [((37, 131), 64), ((8, 64), 64), ((130, 70), 32)])
def test_dequantize_kernel_is_exact(seeded, backend, shape, blocksize):
    # (130, 70) has 285 blocks of 32: more than one 256-block of double-quantized absmax
    W = torch.randn(*shape, generator=seeded(shape[0])) * 0.02
    qt = quantize(W, f"nf4-b{blocksize}-dq")
    w = NF4Weight.from_quantized(qt)
    expected = nf4_expected(W, blocksize)  # recomputed from W in this file, not by qlab
    assert torch.equal(qt.dequantize(), expected)
    ref = nf4_dequantize_reference(w)
    assert torch.equal(ref, expected)  # the kernels' torch reference agrees with it bit for bit
    assert torch.equal(nf4_dequantize(w, backend=backend), expected)
    half = nf4_dequantize(w, dtype=torch.float16, backend=backend)
    assert half.dtype == torch.float16 and torch.equal(half, expected.half())


@pytest.mark.parametrize("shape, blocksize", [((64, 64), 64), ((130, 70), 32)])
def test_double_quant_constants_and_size(seeded, shape, blocksize):
    W = torch.randn(*shape, generator=seeded(1))
    w = nf4_quantize(W, blocksize)
    assert torch.equal(w.levels, get_grid("nf4").levels)
    assert torch.equal(w.absmax_table, get_grid("dynamic8").levels)  # bitsandbytes' 8-bit dynamic map
    n_blocks = -(-W.numel() // blocksize)
    assert w.absmax_codes.dtype == torch.uint8 and w.absmax_codes.numel() == n_blocks
    assert w.absmax_scale.numel() == -(-n_blocks // 256) and w.absmax_blocksize == 256
    assert w.bits_per_weight == pytest.approx(4 + 8 / blocksize + 32 / (blocksize * 256))  # QLoRA: 4.127 at 64
    codes, c1_hat, c1, half_step = qlora_double_quant(W, blocksize)
    # every 8-bit code is the nearest level (a code off by one level is not), and decodes exactly
    assert torch.equal(w.absmax_codes.long(), codes)
    assert torch.equal(w.absmax(), c1_hat)
    # hence c1 is within half a step of the dynamic map (at its own magnitude) of the true absmax
    assert ((w.absmax() - c1).abs() <= half_step * (1 + 1e-6)).all()
    assert w.absmax_mean == pytest.approx(c1.mean().item(), rel=1e-6)


@pytest.mark.parametrize("m, n, k", [(1, 33, 130), (3, 20, 64)])
def test_gemv_matches_reference(seeded, backend, m, n, k):
    gen = seeded(k)
    W = torch.randn(n, k, generator=gen) * 0.05
    w = nf4_quantize(W)
    x = torch.randn(m, k, generator=gen)
    y = nf4_gemv(x, w, backend=backend)
    torch.testing.assert_close(y, nf4_gemv_reference(x, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, x @ nf4_expected(W, 64).T, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="nf4-b<size>-dq"):
        NF4Weight.from_quantized(quantize(torch.randn(4, 64), "nf4"))
    w = nf4_quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="last dimension must be the weight.s K = 64"):
        nf4_gemv(torch.randn(1, 65), w)
    with pytest.raises(ValueError, match="2-d weight"):
        nf4_gemv(torch.randn(1, 64), nf4_quantize(torch.randn(2, 4, 64)))
