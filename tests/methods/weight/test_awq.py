import pytest
import torch

from qlab.methods.weight.awq import (_lower_doubled, _quadratic_forms, apply_clip, awq, awq_scales, mean_abs, sample_tokens,
                                     search_clip, search_scale)
from qlab.methods.weight.rtn import rtn
from qlab.core.quant import fake_quant, quantize


def out_err(W, X, W_eff):
    return float(((X @ W.T - X @ W_eff.T) ** 2).mean())


def brute_force_scale(weights, X, spec, n_grid):
    """AWQ's scale search written out from the paper (eq. 5): for alpha = i / n_grid, s = mean|x|^alpha
    normalised by sqrt(max s * min s); the effective weight Q(W diag(s)) diag(s)^-1 by plain RTN; the mean
    squared output error, averaged over the Linears that read X. Returns (s, alpha, losses) of the best alpha."""
    x_mean = X.abs().mean(dim=0)
    losses = []
    for i in range(n_grid):
        s = x_mean ** (i / n_grid)
        s = s / torch.sqrt(s.max() * s.min())
        losses.append(sum(out_err(W, X, quantize(W * s, spec).dequantize() / s) for W in weights) / len(weights))
    best = min(range(n_grid), key=losses.__getitem__)
    s = x_mean ** (best / n_grid)
    return s / torch.sqrt(s.max() * s.min()), best / n_grid, losses


def brute_force_clip(W, X, spec, group):
    """AWQ's clip search written out: for every output channel and group of ``group`` columns, try
    max_val = (1 - i/20) max|w_group| for i < 10, RTN the clipped group, keep the range with the least
    mean squared error of that group's contribution to the output."""
    out, n_in = W.shape
    best = torch.zeros(out, -(-n_in // group))
    for k, start in enumerate(range(0, n_in, group)):
        Wg, Xg = W[:, start:start + group], X[:, start:start + group]
        org_max = Wg.abs().amax(dim=1, keepdim=True)
        errs = []
        for i in range(10):
            m = org_max * (1 - i / 20)
            Wq = quantize(torch.maximum(torch.minimum(Wg, m), -m), spec).dequantize()  # the group alone: same groups
            errs.append(((Xg @ (Wq - Wg).T) ** 2).mean(dim=0))  # [out]
        choice = torch.stack(errs).argmin(dim=0)  # first of equals, as a strict "<" search keeps
        best[:, k] = org_max[:, 0] * (1 - choice / 20)
    return best


def test_scales_formula_by_hand():
    x = torch.tensor([4.0, 1.0, 0.25])
    # alpha = 1/2: [2, 1, 0.5] / sqrt(2 * 0.5) = [2, 1, 0.5]; alpha = 1: [4, 1, .25] / sqrt(1)
    assert torch.allclose(awq_scales(x, 0.5), torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(awq_scales(x, 1.0), x)
    assert torch.equal(awq_scales(x, 0.0), torch.ones(3))  # alpha = 0 is plain RTN
    assert torch.allclose(mean_abs(torch.tensor([[1.0, -2.0], [-3.0, 0.0]])), torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("in_features", [576, 1536, 100])
def test_statistics_of_batches_kept_apart(gen, in_features):
    """mean|x| a block of channels at a time and the evenly spaced tokens, from a list of batches, are bit for
    bit those of the whole concatenated tensor."""
    batches = [torch.randn(4, 300, in_features, generator=gen) * torch.rand(in_features, generator=gen) * 3
               for _ in range(5)] + [torch.randn(1, 77, in_features, generator=gen)]
    X = torch.cat([b.reshape(-1, in_features) for b in batches])
    assert torch.equal(mean_abs(batches), X.abs().mean(dim=0))
    assert torch.equal(mean_abs(X), X.abs().mean(dim=0))
    for n in (512, 4096, 7):
        chosen = X[torch.linspace(0, len(X) - 1, min(n, len(X))).long()]
        assert torch.equal(sample_tokens(batches, n), chosen) and torch.equal(sample_tokens(X, n), chosen)


def test_batches_give_the_same_result_as_one_tensor(real_layer):
    W, X = real_layer
    spec = "int4-g128-asym-minmax"
    whole, batched = awq(W, X, spec, n_grid=4), awq(W, list(X.split(300)), spec, n_grid=4)
    assert whole.alpha == batched.alpha and torch.equal(whole.s, batched.s)
    assert torch.equal(whole.max_val[0], batched.max_val[0])
    assert torch.equal(whole.qweights[0].codes(), batched.qweights[0].codes())


def test_alpha_zero_loss_is_rtn(real_layer):
    W, X = real_layer
    spec = "int4-g64-asym-minmax"
    s, alpha, losses = search_scale([W], X, spec, n_grid=4)
    assert losses[0].item() == pytest.approx(out_err(W, X, rtn(W, spec).dequantize()), rel=1e-5)
    # the whole search agrees with the paper's formula evaluated alpha by alpha in this file
    s_ref, alpha_ref, losses_ref = brute_force_scale([W], X, spec, n_grid=4)
    assert losses.tolist() == pytest.approx(losses_ref, rel=1e-4)
    assert alpha == alpha_ref and 0 < alpha < 1  # (not an end of the grid: the choice is real)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)


def test_alpha_zero_is_exactly_rtn(real_layer):
    """A one-point grid leaves only alpha = 0: s = 1 and the codes, scales and zero points of plain RTN."""
    W, X = real_layer
    spec = "int4-g64-asym-minmax"
    r = awq(W, X, spec, n_grid=1, clip=False)
    ref = quantize(W, spec)
    assert r.alpha == 0 and torch.equal(r.s, torch.ones(576))
    assert torch.equal(r.qweights[0].codes(), ref.codes())
    assert torch.equal(r.qweights[0].scales(), ref.scales())
    assert torch.equal(r.qweights[0].zero_point, ref.zero_point)


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


def test_shared_input_gives_one_scale(real_layer, gen):
    """Two Linears reading the same input get one s, chosen on their joint output error, and each is
    stored as the RTN codes of W diag(s)."""
    W, X = real_layer
    spec = "int4-g128-asym-minmax"
    q = torch.nn.Linear(576, 64, bias=False)
    with torch.no_grad():
        q.weight.copy_(torch.randn(64, 576, generator=gen) * 0.5)  # its error outweighs W's
    result = awq([W, q], X, spec, n_grid=10, clip=False)
    s_ref, alpha_ref, losses_ref = brute_force_scale([W, q.weight.detach()], X, spec, n_grid=10)
    alone = brute_force_scale([W], X, spec, n_grid=10)[1]
    assert result.alpha == alpha_ref != alone  # the second Linear moves the choice
    torch.testing.assert_close(result.s, s_ref, rtol=1e-6, atol=0)
    assert result.losses.tolist() == pytest.approx(losses_ref, rel=1e-4)
    assert result.max_val is None
    for qt, Wi in zip(result.qweights, [W, q.weight.detach()]):
        ref = quantize(Wi * result.s, spec)
        assert qt.shape == Wi.shape and torch.equal(qt.codes(), ref.codes())
        assert torch.equal(qt.scales(), ref.scales()) and torch.equal(qt.zero_point, ref.zero_point)


def test_bad_input(real_layer):
    W, X = real_layer
    with pytest.raises(ValueError, match="per-group"):
        awq(W, X, "nf4-b100")  # blocks of 100 straddle the 576-wide rows
    with pytest.raises(ValueError, match="per-group"):
        awq(W, X, "int4-tensor")
    assert awq(W, X[:64], "nf4-b64", n_grid=2, clip=False).qweights[0].shape == W.shape  # b64 divides 576: groups
    with pytest.raises(ValueError, match="weights must be"):
        awq(W[:, :100], X, "int4-g64")


def test_ragged_last_group(real_layer):
    """576 columns in groups of 128: four full groups and one of 64."""
    W, X = real_layer
    X = X[::2]  # 512 tokens: search_clip scores all of them (n_tokens=512)
    max_val = search_clip(W, X, "int4-g128-asym-minmax")
    assert max_val.shape == (192, 5)
    # every (channel, group) range, the ragged last group too, is the one a plain loop finds
    assert torch.equal(max_val, brute_force_clip(W, X, "int4-g128-asym-minmax", 128))
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


def test_channels_dead_in_calibration_keep_scale_one(real_layer):
    """A channel with mean|x| = 0 in calibration gets s = 1 (it used to get a tiny s that rounded its weights
    to zero); the live channels' scales are those of the live channels alone."""
    W, X = real_layer
    dead = torch.tensor([5, 200, 411])
    Xd = X.clone()
    Xd[:, dead] = 0
    x_mean = Xd.abs().mean(0)
    s = awq_scales(x_mean, 0.5)
    assert torch.equal(s[dead], torch.ones(3))
    live = torch.ones(576, dtype=torch.bool)
    live[dead] = False
    expect = x_mean[live] ** 0.5
    assert torch.allclose(s[live], expect / (expect.max() * expect.min()).sqrt())
    r = awq([W], Xd, "int4-g64-asym-minmax", n_grid=4)
    assert (r.qweights[0].dequantize()[:, dead] != 0).any()


@pytest.mark.parametrize("in_features,block", [(576, 256), (1536, 256), (100, 7)])
def test_quadratic_forms_from_the_lower_triangle(gen, in_features, block):
    """tr(dW_k H dW_k^T) of each of two stacked Linears (96 and 40 rows), from H's lower triangle with the
    off-diagonal doubled, is the full product's value in float64."""
    X = torch.randn(2000, in_features, generator=gen) * torch.rand(in_features, generator=gen) * 3
    H = X.T @ X
    dW = torch.randn(136, in_features, generator=gen) * 0.01
    forms = _quadratic_forms(dW, _lower_doubled(H), [0, 96, 136], block)
    for form, rows in zip(forms, (dW[:96], dW[96:])):
        assert form == pytest.approx(float(((rows.double() @ H.double()) * rows.double()).sum()), rel=1e-5)
