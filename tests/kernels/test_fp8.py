import pytest
import torch

from qlab.kernels.fp8 import quantize_fp8, quantize_fp8_reference


def _all_e4m3_values_and_midpoints():
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    v = v[v.isfinite()].unique()
    mid = (v[1:] + v[:-1]) / 2  # exact ties: round to the even mantissa
    return torch.cat([v, mid, mid * (1 + 2**-20), mid * (1 - 2**-20), torch.tensor([-0.0])])


def test_hand_example():
    q, s = quantize_fp8_reference(torch.tensor([[1.0, -3.5, 0.3]]), "tensor")
    assert s.item() == 1 / 128 and q.float().tolist() == [[128.0, -448.0, 40.0]]


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_bit_exact_with_torch_cast(seeded, backend, granularity):
    gen = seeded(0)
    x = torch.randn(5, 150, generator=gen) * 3
    x[1] = 0.0
    x[2] = torch.randn(150, generator=gen) * 1e-3  # subnormals after scaling, per tensor
    grid = _all_e4m3_values_and_midpoints()
    x = torch.cat([x.reshape(-1), grid]).reshape(1, -1) if granularity == "tensor" else x
    q, s = quantize_fp8(x, granularity, backend=backend)
    q_ref, s_ref = quantize_fp8_reference(x, granularity)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # every bit, signs of zero included


def test_every_grid_point_and_tie_per_token(backend):
    grid = _all_e4m3_values_and_midpoints()
    half = grid.numel() // 2
    top = torch.tensor([448.0])
    x = torch.stack([torch.cat([grid[:half], top]), torch.cat([grid[half:2 * half], top])])  # scale 1 per row
    q, s = quantize_fp8(x, "token", backend=backend)
    assert s.tolist() == [1.0, 1.0]
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(torch.randn(2, 4), "channel")
