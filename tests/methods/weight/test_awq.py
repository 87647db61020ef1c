import pytest
import torch

from qlab.methods.weight.awq import apply_clip, awq, awq_scales, mean_abs, search_clip, search_scale
from qlab.methods.weight.rtn import rtn
from qlab.core.quant import fake_quant


def out_err(W, X, W_eff):
    return float(((X @ W.T - X @ W_eff.T) ** 2).mean())


def test_scales_formula_by_hand():
    x = torch.tensor([4.0, 1.0, 0.25])
    # alpha = 1/2: [2, 1, 0.5] / sqrt(2 * 0.5) = [2, 1, 0.5]; alpha = 1: [4, 1, .25] / sqrt(1)
    assert torch.allclose(awq_scales(x, 0.5), torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(awq_scales(x, 1.0), x)
    assert torch.equal(awq_scales(x, 0.0), torch.ones(3))  # alpha = 0 is plain RTN
    assert torch.allclose(mean_abs(torch.tensor([[1.0, -2.0], [-3.0, 0.0]])), torch.tensor([2.0, 1.0]))


def test_alpha_zero_loss_is_rtn(real_layer):
    W, X = real_layer
    spec = "int4-g64-asym-minmax"
    s, alpha, losses = search_scale([W], X, spec, n_grid=4)
    assert losses[0].item() == pytest.approx(out_err(W, X, rtn(W, spec).dequantize()), rel=1e-5)
    assert losses[int(alpha * 4)] == losses.min()
    assert torch.allclose(s, awq_scales(mean_abs(X), alpha))


@pytest.mark.parametrize("bits", [3, 4])
def test_real_layer_beats_rtn(real_layer, bits):
    W, X = real_layer
    spec = f"int{bits}-g64-asym-minmax"
    result = awq(W, X, spec)
    assert 0 < result.alpha < 1
    # the model computes (x / s) Q(clip(W s))^T; folding s leaves the float function unchanged
    assert torch.allclose((X / result.s) @ (W * result.s).T, X @ W.T, rtol=1e-4, atol=1e-3)
    e_awq = float(((X @ W.T - (X / result.s) @ result.qweights[0].dequantize().T) ** 2).mean())
    e_rtn = out_err(W, X, rtn(W, spec).dequantize())
    assert e_awq < 0.6 * e_rtn, (e_awq, e_rtn)


def test_clip_search_matches_brute_force(gen):
    """One output channel, one group: the chosen range minimises the group's output error over the grid."""
    W = torch.randn(1, 16, generator=gen)
    W[0, 3] = 6.0  # one large weight: clipping it a little buys a finer step for the other 15
    X = torch.randn(64, 16, generator=gen)
    spec = "int3-channel-asym-minmax"
    errs = []
    for i in range(10):
        m = W.abs().max() * (1 - i / 20)
        errs.append(float(((X @ (fake_quant(W.clamp(-m, m), spec) - W).T) ** 2).mean()))
    best = min(range(10), key=errs.__getitem__)
    assert search_clip(W, X, spec).item() == pytest.approx(6.0 * (1 - best / 20))


def test_apply_clip_by_hand():
    W = torch.tensor([[1.0, -5.0, 2.0, 0.5]])
    assert torch.equal(apply_clip(W, torch.tensor([[2.0, 1.0]]), 2), torch.tensor([[1.0, -2.0, 1.0, 0.5]]))


def test_shared_input_gives_one_scale(real_layer):
    W, X = real_layer
    q = torch.nn.Linear(576, 64, bias=False)
    result = awq([W, q], X, "int4-g128-asym-minmax", clip=False)
    assert [qt.shape for qt in result.qweights] == [(192, 576), (64, 576)]
    assert result.s.shape == (576,) and result.max_val is None


def test_bad_input(real_layer):
    W, X = real_layer
    with pytest.raises(ValueError, match="per-group"):
        awq(W, X, "nf4")
    with pytest.raises(ValueError, match="weights must be"):
        awq(W[:, :100], X, "int4-g64")


def test_ragged_last_group(real_layer):
    """576 columns in groups of 128: four full groups and one of 64."""
    W, X = real_layer
    max_val = search_clip(W, X, "int4-g128-asym-minmax")
    assert max_val.shape == (192, 5)
    clipped = apply_clip(W, max_val, 128)
    assert clipped.shape == W.shape
    for k, start in enumerate(range(0, 576, 128)):  # every group, the last one 64 wide
        block, limit = W[:, start:start + 128], max_val[:, k:k + 1]
        assert torch.equal(clipped[:, start:start + 128], torch.maximum(torch.minimum(block, limit), -limit))
    assert torch.equal(apply_clip(torch.tensor([[1.0, -5.0, 2.0]]), torch.tensor([[2.0, 1.5]]), 2),
                       torch.tensor([[1.0, -2.0, 1.5]]))


def test_clip_helps_with_a_ragged_group(real_layer):
    W, X = real_layer
    spec = "int3-g128-asym-minmax"
    err = lambda r: float(((X @ W.T - (X / r.s) @ r.qweights[0].dequantize().T) ** 2).mean())  # noqa: E731
    assert err(awq(W, X, spec)) < err(awq(W, X, spec, clip=False))
