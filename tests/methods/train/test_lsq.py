"""LSQ (Esser et al. 2020): the gradients checked with autograd against the paper's eq. 3 written out by hand."""
import math

import pytest
import torch

from qlab.core.quant import fake_quant, quantize
from qlab.methods.train import LSQWeight, lsq_fake_quant


def _hand_gradients(x, s, q_n, q_p, g):
    """Eq. 3 times g for the step, and the STE for x, element by element in plain Python."""
    d_s, d_x = [], []
    for xi in x.tolist():
        v = xi / s
        if v <= -q_n:
            d_s.append(-q_n), d_x.append(0.0)
        elif v >= q_p:
            d_s.append(q_p), d_x.append(0.0)
        else:
            d_s.append(-v + round(v)), d_x.append(1.0)
    return g * sum(d_s), torch.tensor(d_x)


def test_gradient_matches_the_paper_inside_and_outside_the_range():
    s, q_n, q_p = 0.25, 7, 7  # int4 restricted: [-7, 7]; range [-1.75, 1.75]
    x = torch.tensor([0.3, -0.61, 1.1, 1.74, 0.05, -1.2, 2.0, 9.0, -1.9, -30.0], requires_grad=True)
    step = torch.tensor([s], requires_grad=True)
    g = 1 / math.sqrt(x.numel() * q_p)
    lsq_fake_quant(x[None], step, q_n, q_p, g).sum().backward()
    d_s, d_x = _hand_gradients(x.detach(), s, q_n, q_p, g)
    assert step.grad.item() == pytest.approx(d_s, rel=1e-6)
    assert torch.allclose(x.grad, d_x)  # 1 inside, 0 outside
    assert d_x.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # the example really has both cases


def test_gradient_per_element_for_random_groups():
    """Per group, d x_hat_i / d s_group = g * (eq. 3)_i: checked element by element with a one-hot upstream."""
    g_rng = torch.Generator().manual_seed(1)
    X = torch.randn(3, 16, generator=g_rng) * 2
    steps = torch.tensor([0.2, 0.35, 0.5])
    for row in range(3):
        for col in range(16):
            s = steps.clone().requires_grad_(True)
            x = X.clone().requires_grad_(True)
            lsq_fake_quant(x, s, 4, 3, 0.5)[row, col].backward()  # int3 full range: [-4, 3]
            d_s, d_x = _hand_gradients(X[row, col:col + 1], steps[row].item(), 4, 3, 0.5)
            assert s.grad[row].item() == pytest.approx(d_s, abs=1e-6)
            assert s.grad.count_nonzero() <= 1  # only this element's own group
            assert x.grad[row, col].item() == pytest.approx(d_x.item(), abs=1e-6)


def test_forward_is_round_to_nearest_with_the_given_step():
    """The forward value equals qlab.quantize with the same scale, bit for bit (the conversion relies on it)."""
    W = torch.randn(8, 72)
    lsq = LSQWeight(W, "int3-g32")
    with torch.no_grad():
        lsq.steps.mul_(0.8)  # any step, not only the rule's
    expected = quantize(W, "int3-g32", scale=lsq.step()).dequantize()
    assert torch.equal(lsq(W), expected)


def test_initial_steps_follow_the_spec_rule_so_step_0_is_rtn():
    W = torch.randn(8, 72)
    for spec in ("int4-g32", "int4-channel", "int3-g32-mse", "int8-tensor"):
        assert torch.equal(LSQWeight(W, spec)(W), fake_quant(W, spec)), spec


def test_gradient_scale_is_one_over_sqrt_n_qp():
    W = torch.randn(16, 64)
    assert LSQWeight(W, "int4-channel").g == pytest.approx(1 / math.sqrt(64 * 7))  # N = a row of 64
    assert LSQWeight(W, "int4-g32").g == pytest.approx(1 / math.sqrt(32 * 7))
    assert LSQWeight(W, "int8-tensor").g == pytest.approx(1 / math.sqrt(1024 * 127))  # the paper's per-layer case


def test_learned_step_approaches_the_mse_optimal_step():
    """Minimising |x_hat - W|^2 over the step alone: LSQ (from absmax) ends near the error of qlab's mse rule
    (a grid search over clipping ratios), far below absmax's."""
    W = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    lsq = LSQWeight(W, "int3-channel-sfp32")
    opt = torch.optim.Adam(lsq.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        ((lsq(W) - W) ** 2).sum().backward()
        opt.step()
    err = lambda W_hat: float(((W_hat.detach() - W) ** 2).sum())  # noqa: E731
    absmax, mse = err(fake_quant(W, "int3-channel-sfp32")), err(fake_quant(W, "int3-channel-mse-sfp32"))
    learned = err(lsq(W))
    print(f"absmax {absmax:.2f}, mse rule {mse:.2f}, learned {learned:.2f}")
    assert learned < 0.8 * absmax
    assert learned < 1.05 * mse


@pytest.mark.parametrize("spec", ["nf4", "int4-g32-asym-minmax", "fp8_e4m3", "ternary"])
def test_specs_without_an_lsq_gradient_raise(spec):
    with pytest.raises(ValueError, match="symmetric int grid"):
        LSQWeight(torch.randn(4, 64), spec)


def _lsq_net_reference(x, s, q_n, q_p):
    """LSQ as the widely used reproduction zhutmost/lsq-net (quan/quantizer/lsq.py) writes it, per tensor:
    the detach tricks (y - y_grad).detach() + y_grad for the gradient scale and for round, g = 1/sqrt(Q_P N)."""
    g = 1.0 / (q_p * x.numel()) ** 0.5
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, -q_n, q_p)
    return ((v.round() - v).detach() + v) * s_scaled


def test_module_gradients_agree_with_the_lsq_net_reproduction():
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(3))
    lsq = LSQWeight(W, "int4-tensor-sfp32")
    with torch.no_grad():
        lsq.steps.mul_(0.6)  # clip some weights, so both branches of eq. 3 contribute
    s_ref = lsq.steps.detach().clone().requires_grad_(True)
    w_ours, w_ref = W.clone().requires_grad_(True), W.clone().requires_grad_(True)
    R = torch.randn(16, 48)
    (R * lsq(w_ours)).sum().backward()
    (R * _lsq_net_reference(w_ref, s_ref, 7, 7)).sum().backward()
    assert 0 < (W.abs() > 7 * s_ref.detach()).float().mean() < 0.5
    assert torch.allclose(lsq(W), _lsq_net_reference(W, s_ref.detach(), 7, 7), atol=1e-6)
    assert lsq.steps.grad.item() == pytest.approx(s_ref.grad.item(), rel=1e-5)
    assert torch.allclose(w_ours.grad, w_ref.grad)


def test_module_step_gradient_per_channel_is_eq_3_times_g():
    W = torch.randn(2, 8, generator=torch.Generator().manual_seed(4)) * 3
    lsq = LSQWeight(W, "int3-channel-sfp32")  # [-3, 3]
    with torch.no_grad():
        lsq.steps.mul_(0.5)
    lsq(W).sum().backward()
    g = 1 / math.sqrt(8 * 3)  # N = 8 values per row share a step
    for row in range(2):
        d_s, _ = _hand_gradients(W[row], lsq.steps[row].item(), 3, 3, g)
        assert lsq.steps.grad[row].item() == pytest.approx(d_s, rel=1e-5)
