import pytest
import torch

from qlab.kernels.int8 import (int8_matmul, int8_matmul_reference, quantize_per_token_int8,
                               quantize_per_token_int8_reference, w8a8_linear)
from qlab.core.quant import quantize


def _activations(m, k, gen):
    x = torch.randn(m, k, generator=gen) * 2
    x[0] = 0.0  # an all-zero token
    x[1, :3] = torch.tensor([0.5, -1.0, 0.25])  # the docstring's hand example
    x[1, 3:] = 0.0
    x[2] = (torch.arange(k) - k // 2) * (127 / (k // 2)) / 2  # many exact .5 ties: 63.5 -> 64, 62.5 -> 62
    return x


def test_hand_example():
    q, s = quantize_per_token_int8_reference(torch.tensor([[0.5, -1.0, 0.25]]))
    assert q.tolist() == [[64, -127, 32]] and s.item() == pytest.approx(1 / 127)


@pytest.mark.parametrize("m, k", [(5, 203), (3, 64)])
def test_quantize_kernel_is_bit_exact(seeded, backend, m, k):
    x = _activations(m, k, seeded(k))
    q, s = quantize_per_token_int8(x, backend=backend)
    q_ref, s_ref = quantize_per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[0].abs().sum() == 0 and s[0] == 1.0
    # and against qlab's core quantizer (symmetric restricted int8, per token, fp32 scales)
    qt = quantize(x[1:], "int8-token-sfp32")
    assert torch.equal(q[1:].long(), qt.codes() - 127)


@pytest.mark.parametrize("m, n, k", [(5, 45, 203), (33, 17, 64), (1, 70, 100)])
def test_int32_accumulation_is_exact(seeded, backend, m, n, k):
    gen = seeded(m + n + k)
    qx = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    qw = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    acc = int8_matmul(qx, qw, backend=backend)
    assert acc.dtype == torch.int32 and torch.equal(acc, int8_matmul_reference(qx, qw))
    assert acc.abs().max() > 2**16  # the sums really exceed 16 bits


def test_scales_in_the_epilogue(seeded, backend):
    gen = seeded(3)
    x, w = _activations(6, 150, gen), torch.randn(40, 150, generator=gen) * 0.05
    qx, sx = quantize_per_token_int8_reference(x)
    qw, sw = quantize_per_token_int8_reference(w)  # per output channel
    y = int8_matmul(qx, qw, sx, sw, backend=backend)
    torch.testing.assert_close(y, int8_matmul_reference(qx, qw, sx, sw), rtol=1e-6, atol=1e-6)
    # the whole W8A8 layer against the fp32 matmul: each product carries at most half a step of
    # error in each factor, so |y - x w^T| <= sum_k (|x| sw/2 + |w| sx/2 + sx sw/4)
    y_layer = w8a8_linear(x, qw, sw, backend=backend)
    bound = (x.abs() @ (sw[:, None] / 2).expand(-1, 150).T + (sx[:, None] / 2) * (w.abs().sum(1))[None, :]
             + 150 * sx[:, None] * sw[None, :] / 4)
    err = (y_layer - x @ w.T).abs()
    assert (err <= bound + 1e-5).all()
