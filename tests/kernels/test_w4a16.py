import pytest
import torch

from qlab.kernels.w4a16 import Int4Weight, pack_int4, unpack_int4, w4a16_matmul, w4a16_matmul_reference
from qlab.core.packing import pack
from qlab.core.quant import quantize


def test_nibble_order_is_low_first_as_in_qlab_packing():
    codes = torch.tensor([1, 2, 15])
    assert pack_int4(codes).tolist() == [0x21, 0x0F]
    assert torch.equal(pack_int4(codes), pack(codes, bits=4))
    assert unpack_int4(torch.tensor([0x21, 0x0F], dtype=torch.uint8), 3).tolist() == [1, 2, 15]


def _random_weight(n, k, group, asym, gen):
    codes = torch.randint(0, 16, (n, k), generator=gen)
    n_groups = -(-k // group)
    scale = torch.rand(n, n_groups, generator=gen) * 0.1 + 0.01
    zero = torch.randint(0, 16, (n, n_groups), generator=gen).float() if asym else None
    return Int4Weight(pack_int4(codes), scale, zero, (n, k), group)


# tolerance per activation dtype: one unit in the last place of the output (fp32 accumulation order differs)
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("m, n, k, group, asym, dtype", [
    (1, 40, 200, 32, True, torch.float32),     # GEMV, ragged K (200 = 6 groups of 32 + 8), odd rows
    (3, 33, 130, 64, False, torch.float16),    # small batch, N and K ragged, symmetric
    (1, 17, 257, 128, True, torch.bfloat16),   # odd K: rows are not byte aligned in the stream
    (20, 37, 257, 128, True, torch.bfloat16),  # GEMM, M ragged (20 = 16 + 4)
    (17, 64, 96, 32, False, torch.float32),    # GEMM, symmetric
    (33, 48, 160, 64, True, torch.float16),    # GEMM, last group half full
])
def test_kernel_matches_reference(seeded, backend, device, m, n, k, group, asym, dtype):
    gen = seeded(m * 1000 + k)
    w = _random_weight(n, k, group, asym, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    expected = w4a16_matmul_reference(x, w).float()
    y = w4a16_matmul(x, w, backend=backend).float()
    assert y.shape == (m, n)
    torch.testing.assert_close(y, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * expected.abs().max().item())


@pytest.mark.parametrize("spec", ["int4-g128-asym-minmax", "int4-g32", "int4-g64-full"])
def test_quantized_tensor_goes_straight_in(seeded, backend, spec):
    gen = seeded(1)
    W = torch.randn(24, 200, generator=gen) * 0.02
    qt = quantize(W, spec)
    x = torch.randn(2, 3, 200, generator=gen)  # leading dims are flattened and restored
    assert torch.equal(Int4Weight.from_quantized(qt).dequantize(), qt.dequantize())
    y = w4a16_matmul(x, qt, backend=backend)
    torch.testing.assert_close(y, x @ qt.dequantize().T, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_value_errors(seeded):
    w = _random_weight(8, 40, 32, False, seeded())
    with pytest.raises(ValueError, match="last dimension must be the weight.s K = 40"):
        w4a16_matmul(torch.randn(1, 41), w)
    with pytest.raises(ValueError, match="implements the int4 grid"):
        Int4Weight.from_quantized(quantize(torch.randn(8, 40), "int8-g32"))
    with pytest.raises(ValueError, match="multiple of 16"):
        w4a16_matmul(torch.randn(1, 40), Int4Weight(w.packed, w.scale, None, (8, 40), 20), backend="interpret")


@pytest.mark.parametrize("spec", ["nf4-g64", "fp4_e2m1-g32", "int4-g32-asym-minmax-fmin", "int4-channel", "int8-g32"])
def test_views_refuse_grids_they_do_not_implement(spec):
    """NF4 and FP4 are 4-bit too, but not scale * (code - zero): accepting them gave relative errors of 20.5
    and 3.8 against the tensor's own dequantization."""
    from qlab import quantize
    from qlab.kernels.w4a16 import Int4Weight

    with pytest.raises(ValueError, match="W4A16"):
        Int4Weight.from_quantized(quantize(torch.randn(8, 64), spec))


def test_kernels_refuse_non_finite_activations():
    from qlab.kernels.fp8 import quantize_fp8
    from qlab.kernels.int8 import quantize_per_token_int8

    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    for fn in (quantize_per_token_int8, quantize_fp8):
        for backend in ("torch", "interpret"):
            with pytest.raises(ValueError, match="NaN/Inf"):
                fn(x, backend=backend)
