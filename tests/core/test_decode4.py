"""The one-pass 4-bit and 8-bit decoders give the two-pass path's bits (values() looked up, then scaled per group):
both in C (qlab/core/_cpu.c: AVX-512 permutes for 4 bits, on one and two threads) and in numba."""
import numpy as np
import pytest
import torch

import qlab.core.decode4 as decode4_module
from qlab import quantize
from qlab.core import scales as _scales
from qlab.core.decode4 import decode4, decode8, run_length
from qlab.core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken


def two_pass(qt):
    """QuantizedTensor.dequantize as it was before decode4: the reference the kernel must match bit for bit."""
    Q, _ = qt.spec.granularity.to_groups(qt.values())
    zp = None if qt.zero_point is None else qt.zero_point.reshape(-1).float()
    mn = None if qt.minimum is None else qt.minimum.reshape(-1).float()
    x_hat = _scales.dequantize_groups(Q, qt.scales().reshape(-1), zp, mn, overwrite=True)
    return qt.spec.granularity.from_groups(x_hat, qt.shape).to(qt.dtype)


SPECS = ["nf4", "nf4-b64-dq", "nf4-b64-sfp32", "fp4_e2m1", "int4-g32-asym-minmax", "int4-g32-asym-minmax-fmin",
         "int4-channel", "int4-token-asym-minmax", "int4-tensor", "int4-g16-sbf16",
         # decode8: signed grids (restricted and full), unsigned with zero points or float minima
         "int8", "int8-full", "int8-tensor", "int8-g32-asym-minmax", "int8-g32-asym-minmax-fmin", "int8-token-asym-minmax",
         "int8-g16-sbf16", "int8-b64-sfp32",
         # decode8 through a 256-value table: FP8 formats (NaN codes included) and bitsandbytes' dynamic 8-bit code
         "fp8_e4m3", "fp8_e5m2-channel", "fp8_e4m3-g32", "dynamic8-b64"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(8, 64), (5, 96), (3, 7, 32), (13, 10), (7, 9), (1, 2)])
def test_one_pass_equals_two_pass_bit_for_bit(spec, shape, cpu_loops):
    gen = torch.Generator().manual_seed(sum(shape) + len(spec))
    W = torch.randn(shape, generator=gen) * 3
    W.reshape(-1)[: min(W.numel(), 64)] = 0  # an all-zero group (scale 0) at the start
    W.reshape(-1)[-1] = 40.0  # an outlier in the last group
    qt = quantize(W, spec)
    x_hat = qt.dequantize()
    assert x_hat.dtype == torch.float32 and x_hat.shape == W.shape
    assert torch.equal(x_hat.view(torch.int32), two_pass(qt).view(torch.int32)), (spec, shape)



@pytest.mark.parametrize("spec", ["nf4-b64-sfp32", "int4-channel", "int4-tensor", "int8-token-asym-minmax", "int8-tensor",
                                  "fp8_e4m3", "fp8_e5m2-b64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_tensors_equal_two_pass_bit_for_bit(spec, threads, cpu_loops):
    # 3 x 16,389 values, an odd count (the last byte holds one code); one and two torch threads give the same bits
    W = torch.randn(3, (1 << 14) + 5, generator=torch.Generator().manual_seed(5))
    qt = quantize(W, spec)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x_hat = qt.dequantize()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(x_hat.view(torch.int32), two_pass(qt).view(torch.int32))


@pytest.mark.parametrize("mode", ["scale", "zero_point", "minimum"])
def test_decode4_on_every_byte_value_and_odd_lengths(mode, cpu_loops):
    # every byte value in every group, groups of 2..96 values, counts ending inside a group and inside a byte,
    # scales across magnitudes (subnormal products included)
    rng = np.random.default_rng(7)
    table = torch.from_numpy(rng.standard_normal(16).astype(np.float32))
    for L in (2, 30, 32, 64, 96):
        for n in (1, L - 1, L, 3 * L + 1, 257 * L - 3):
            if n <= 0:
                continue
            packed = torch.from_numpy(np.resize(np.arange(256, dtype=np.uint8), (n + 1) // 2).copy())
            G = -(-n // L)
            scale = torch.from_numpy((10.0 ** rng.uniform(-40, 30, G)).astype(np.float32))
            extra = {mode: torch.from_numpy(rng.standard_normal(G).astype(np.float32))} if mode != "scale" else {}
            got = decode4_module.decode4(packed, n, table, L, scale, **extra)
            codes = torch.stack([packed & 15, packed >> 4], 1).reshape(-1)[:n].long()
            v, s = table[codes], scale.repeat_interleave(L)[:n]
            zp_or_min = extra[mode].repeat_interleave(L)[:n] if extra else None
            want = v * s + zp_or_min if mode == "minimum" else (v - zp_or_min) * s if mode == "zero_point" else v * s
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (L, n)


def test_c_loops_refuse_bad_arguments():
    if decode4_module._cpu is None:
        pytest.skip("qlab.core._cpu is not built")
    decode4, decode8 = decode4_module._cpu.decode4, decode4_module._cpu.decode8
    packed, table, out = np.zeros(4, np.uint8), np.zeros(16, np.float32), np.zeros(8, np.float32)
    scale = np.ones(4, np.float32)
    decode4(packed, 8, table, 2, scale, None, None, out, 1)
    table8 = np.arange(256, dtype=np.float32) - 127
    decode8(np.zeros(8, np.uint8), 8, table8, 2, scale, None, None, out, 2)
    with pytest.raises(ValueError, match="L > 0 and even"):
        decode4(packed, 8, table, 3, scale, None, None, out, 1)
    with pytest.raises(ValueError, match="threads >= 1"):
        decode8(packed, 4, table8, 1, scale, None, None, out, 0)
    with pytest.raises(ValueError, match="table must be a contiguous float32 array of at least 256"):
        decode8(packed, 4, table, 1, scale, None, None, out, 1)
    with pytest.raises(ValueError, match="table must be a contiguous float32 array of at least 16"):
        decode4(packed, 8, table[:8], 2, scale, None, None, out, 1)
    with pytest.raises(ValueError, match="scale must be a contiguous float32 array of at least 4"):
        decode4(packed, 8, table, 2, scale.astype(np.float64), None, None, out, 1)
    with pytest.raises(ValueError, match="codes must be a contiguous uint8 array of at least 5"):
        decode4(packed, 9, table, 2, np.ones(5, np.float32), None, None, out, 1)
    with pytest.raises(ValueError, match="out must be a contiguous float32 array of at least 9"):
        decode4(np.zeros(5, np.uint8), 9, table, 2, np.ones(5, np.float32), None, None, out, 1)
    with pytest.raises(ValueError, match="zero_point must be"):
        decode8(packed, 4, table8, 2, scale, np.ones(1, np.float32), None, out, 1)


def test_run_lengths_of_each_granularity():
    assert run_length(PerBlock(64), (5, 13)) == 64
    assert run_length(PerTensor(), (5, 13)) == 65
    assert run_length(PerToken(), (5, 13)) == 13
    assert run_length(PerChannel(0), (5, 13)) == 13
    assert run_length(PerGroup(4), (5, 12)) == 4
    assert run_length(PerGroup(4), (5, 13)) is None  # padded groups are not runs of the flat tensor
    assert run_length(PerGroup(4, axis=-2), (8, 12)) is None
    assert run_length(PerChannel(1), (5, 13)) is None
    assert run_length(PerChannel(0), (0, 13)) is None and run_length(PerTensor(), ()) is None


def test_decoder_by_hand(cpu_loops):
    # codes 0..3 (low nibble first), a table q -> q/2, L = 2: groups (0, 1) and (2, 3)
    packed = torch.tensor([0x10, 0x32], dtype=torch.uint8)
    table = torch.arange(16, dtype=torch.float32) / 2
    scale = torch.tensor([2.0, 10.0])
    assert decode4(packed, 4, table, 2, scale).tolist() == [0.0, 1.0, 10.0, 15.0]
    assert decode4(packed, 4, table, 2, scale, zero_point=torch.tensor([1.0, 0.0])).tolist() == [-2.0, -1.0, 10.0, 15.0]
    assert decode4(packed, 3, table, 2, scale, minimum=torch.tensor([0.5, -1.0])).tolist() == [0.5, 1.5, 9.0]
    with pytest.raises(ValueError, match="even run length"):
        decode4(packed, 4, table, 3, scale)


def test_autograd_through_the_scales_keeps_the_torch_path():
    qt = quantize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), "nf4")
    qt.scale = qt.scale.clone().requires_grad_(True)
    x_hat = qt.dequantize()
    x_hat.sum().backward()
    assert qt.scale.grad is not None and qt.scale.grad.shape == qt.scale.shape
    with torch.no_grad():
        assert torch.equal(qt.dequantize(), x_hat.detach())


def test_decoder8_by_hand(cpu_loops):
    # codes 0, 1, 254, 255 of a grid whose code 0 is -127: values -127, -126, 127, 128; L = 2
    codes = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    scale = torch.tensor([2.0, 0.5])
    signed, unsigned = torch.arange(256.0) - 127, torch.arange(256.0)
    assert decode8(codes, 4, signed, 2, scale).tolist() == [-254.0, -252.0, 63.5, 64.0]
    assert decode8(codes, 4, unsigned, 2, scale, zero_point=torch.tensor([1.0, 255.0])).tolist() == [-2.0, 0.0, -0.5, 0.0]
    assert decode8(codes, 3, unsigned, 2, scale, minimum=torch.tensor([0.5, -1.0])).tolist() == [0.5, 2.5, 126.0]
    # E4M3 codes 0x38 (1.0), 0x7E (448), 0xFF (NaN): the table's values times the scale
    fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    got = decode8(torch.tensor([0x38, 0x7E, 0xFF], dtype=torch.uint8), 3, fp8, 3, torch.tensor([0.5]))
    assert got[:2].tolist() == [0.5, 224.0] and got[2].isnan()
