"""The FP8 kernels as the KV cache uses them: per-token scales over [B, H, T, D], a static per-tensor scale, and the
decode kernel, bit for bit against the torch reference and torch's own float8_e4m3fn cast (Triton interpreted on
a CPU, compiled on a GPU)."""
import pytest
import torch

from qlab.kernels.fp8 import dequantize_fp8, dequantize_fp8_reference, quantize_fp8


def test_decode_every_code_as_torch_does(backend):
    """All 256 E4M3 bytes (NaN codes 0x7F / 0xFF, subnormals, both zeros) decode as torch's cast, scale 1."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(4, 64)
    got = dequantize_fp8(codes, torch.ones(1), backend=backend)
    want = codes.float()
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 2
    ok = ~want.isnan()
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))  # -0.0 included
    assert got[0, 1] == 2.0**-9 and got[1, 62] == 448  # the smallest subnormal; the largest normal, 0x7E = 1.75 * 2**8


def test_kv_layout_per_token_round_trip(seeded, backend):
    """Keys [B, H, T, D]: one scale per token and head, codes and read-back bit-exact with the torch reference and
    with x / s cast by torch."""
    x = torch.randn(2, 3, 5, 64, generator=seeded(1)) * 4
    x[0, 1, 3] = 0.0  # an all-zero token: scale 1
    x[1, 2, :, 7] *= 50  # an outlier channel
    q, s = quantize_fp8(x, "token", backend=backend)
    q_ref, s_ref = quantize_fp8(x, "token", backend="torch")
    assert s.shape == (2, 3, 5) and torch.equal(s, s_ref) and s[0, 1, 3] == 1
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    by_torch = (x / (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-30)).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8)[x.abs().amax(-1) > 0], by_torch.view(torch.uint8)[x.abs().amax(-1) > 0])
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_fp8(q, s, dtype, backend=backend)
        assert got.dtype == dtype and torch.equal(got, dequantize_fp8_reference(q_ref, s_ref, dtype))
    assert torch.equal(dequantize_fp8(q, s, backend=backend), q.float() * s[..., None])


def test_static_scale_saturates_as_vllm(seeded, backend):
    """A static scale (calibrated, per tensor): values beyond 448 s saturate to +-448 s, never NaN; codes equal
    torch's cast of clamp(x / s) for every E4M3 value and tie."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[v.isfinite()].unique()
    ties = (v[1:] + v[:-1]) / 2
    s = 0.03125  # a power of two: x = value * s is exact, so x / s hits every value and tie exactly
    x = torch.cat([v, ties, torch.tensor([1000.0, -1e6, 449.0])]) * s
    x = torch.cat([x, torch.randn(40, generator=seeded(2))]).reshape(1, 2, 1, -1)  # [B, H, T, D]: 2 rows
    q, scale = quantize_fp8(x, "tensor", backend=backend, scale=s)
    assert scale.tolist() == [s]
    want = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    read = dequantize_fp8(q, scale, backend=backend)
    assert torch.isfinite(read).all() and read.abs().max() == 448 * s
    assert torch.equal(read, want.float() * s)


def test_bad_inputs():
    with pytest.raises(ValueError, match="one per tensor"):
        quantize_fp8(torch.randn(2, 4), "token", scale=1.0)
    with pytest.raises(ValueError, match="finite float > 0"):
        quantize_fp8(torch.randn(2, 4), "tensor", scale=0.0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8(torch.zeros(2, 4), torch.ones(1))
    with pytest.raises(ValueError, match="per-token scale"):
        dequantize_fp8(torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(3))
