import pytest
import torch

from qlab.methods.weight.gptq import HessianAccumulator, gptq, gptq_shared, gptq_sweep, gram, hessian
from qlab.methods.weight.rtn import rtn
from qlab.core.quant import quantize
from qlab.core.spec import QuantSpec


def output_error(W, W_hat, X):
    return float(((X.double() @ (W - W_hat).double().T) ** 2).sum())


def proxy_error(W, W_hat, H):
    D = (W - W_hat).double()
    return float(torch.einsum("ij,jk,ik->", D, H.double(), D))


def test_hand_example_obq_update():
    # one row, H couples columns 0 and 1; column 2 is independent and fixes the scale at 7/7 = 1
    W = torch.tensor([[3.4, 1.4, 7.0]])
    H = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sweep = gptq_sweep(W, H, "int4-tensor", percdamp=0.0)
    # column 0 rounds 3.4 -> 3; eq. 3 moves column 1 by r * 0.4 = 0.2: 1.6 rounds to 2
    assert torch.equal(sweep.W_hat, torch.tensor([[3.0, 2.0, 7.0]]))
    assert torch.equal(rtn(W, "int4-tensor").dequantize(), torch.tensor([[3.0, 1.0, 7.0]]))
    assert proxy_error(W, sweep.W_hat, H) == pytest.approx(0.28)  # 0.16 + 0.36 - 0.24
    assert proxy_error(W, torch.tensor([[3.0, 1.0, 7.0]]), H) == pytest.approx(0.48)
    # per-column OBQ costs (w - q)^2 / (2 d^2): d0^2 = 1 / 0.75, d1 = 1
    assert sweep.losses.tolist() == pytest.approx([0.06, 0.08, 0.0], abs=1e-6)


def test_hessian_is_two_over_n_xtx():
    X = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    assert torch.equal(hessian(X), torch.tensor([[2.0, 2.0], [2.0, 4.0]]))
    acc = HessianAccumulator(2)
    acc.add(X[:1])
    acc.add(X[1:][None])  # leading dims are tokens
    assert torch.equal(acc.H, hessian(X))


@pytest.mark.parametrize("in_features,block", [(576, 256), (1536, 256), (64, 256), (100, 7)])
def test_gram_from_the_upper_triangle_is_x_transpose_x(gen, in_features, block):
    """Bit for bit X.T @ X at the model's widths (MKL computes each entry in the same order), to float32
    rounding for odd blocks; the accumulator sums it per batch."""
    X = torch.randn(600, in_features, generator=gen) * torch.rand(in_features, generator=gen) * 4
    G = gram(X, block)
    assert torch.equal(G, X.T @ X) if block % 64 == 0 else torch.allclose(G, X.T @ X, rtol=1e-5, atol=1e-3)
    acc = HessianAccumulator(in_features)
    acc.add(X[:250])
    acc.add(X[250:][None])
    assert torch.equal(acc.XtX, gram(X[:250]).double() + gram(X[250:]).double())


@pytest.mark.parametrize("spec", ["int4-g64", "int3-g32-asym-minmax", "nf4", "fp8_e4m3", "int4-channel-asym-mse"])
def test_diagonal_hessian_reduces_to_rtn(weight, gen, spec):
    """With a diagonal H the inputs are uncorrelated: there is nothing to compensate, GPTQ == RTN."""
    for H in (torch.eye(576), torch.diag(torch.rand(576, generator=gen) + 0.1)):
        assert torch.equal(gptq(weight, H, spec).codes(), rtn(weight, spec).codes())


@pytest.mark.parametrize("spec", ["int4-g128", "int3-g128-asym-minmax", "int2-g64-asym-minmax", "nf4", "fp8_e4m3"])
def test_codes_are_those_of_the_final_weight(weight, gen, spec):
    X = torch.randn(256, 576, generator=gen) @ torch.randn(576, 576, generator=gen)
    H = hessian(X)
    sweep = gptq_sweep(weight, H, spec)
    qt = gptq(weight, H, spec)
    assert torch.equal(qt.dequantize(), sweep.W_hat)
    assert qt.spec == QuantSpec.parse(spec)
    assert qt.bits_per_weight == rtn(weight, spec).bits_per_weight


def test_losses_telescope_to_the_proxy_error(weight, gen):
    """The per-column OBQ costs sum to (1/2) tr(dW H dW^T) exactly (paper, eq. 2-3, applied column by column)."""
    X = torch.randn(1024, 576, generator=gen) @ torch.randn(576, 576, generator=gen) / 24
    H = hessian(X).double()
    sweep = gptq_sweep(weight.double(), H, "int3-g64-asym-minmax", percdamp=0.0)
    assert 2 * sweep.losses.sum().item() == pytest.approx(proxy_error(weight, sweep.W_hat, H), rel=1e-4)


def test_random_hessian_beats_rtn(gen):
    W = torch.randn(64, 256, generator=gen)
    A = torch.randn(256, 256, generator=gen)
    H = A @ A.T / 256 + 0.01 * torch.eye(256)  # random SPD with a spread spectrum
    for spec in ("int2-channel", "int3-g64-asym-minmax", "int4-g32", "nf4"):
        assert proxy_error(W, gptq(W, H, spec).dequantize(), H) < 0.8 * proxy_error(W, rtn(W, spec).dequantize(), H)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_real_layer_output_error_below_rtn(real_layer, bits):
    W, X = real_layer
    H = hessian(X)
    spec = QuantSpec.integer(bits, group_size=128, symmetric=False)
    e_rtn = output_error(W, rtn(W, spec).dequantize(), X)
    for act_order in (False, True):
        e_gptq = output_error(W, gptq(W, H, spec, act_order=act_order).dequantize(), X)
        assert e_gptq < 0.8 * e_rtn, (bits, act_order, e_gptq, e_rtn)


def test_lazy_blocks_are_exact(weight, gen):
    """Lazy batching only reorders the same updates: any block size gives the same result,
    including blocks smaller than a group (the group's scale then needs the pending updates)."""
    X = torch.randn(300, 576, generator=gen) @ torch.randn(576, 576, generator=gen)
    H = hessian(X).double()
    ref = gptq_sweep(weight.double(), H, "int4-g128-asym-minmax", block_size=576)
    for block_size in (1, 48, 128):
        got = gptq_sweep(weight.double(), H, "int4-g128-asym-minmax", block_size=block_size)
        assert torch.allclose(got.W_hat, ref.W_hat, atol=1e-12)
        assert torch.allclose(got.scale, ref.scale)


def test_act_order_uses_static_groups(weight, gen):
    X = torch.randn(300, 576, generator=gen) * torch.linspace(0.1, 3, 576)
    H = hessian(X)
    sweep = gptq_sweep(weight, H, "int4-g64", act_order=True)
    assert torch.equal(sweep.perm, torch.argsort(torch.diag(H), descending=True))
    # static groups: the scales are RTN's scales of the original weight, groups contiguous in the original order
    assert torch.equal(sweep.scale, rtn(weight, "int4-g64").scales())


def test_dead_inputs(weight, gen):
    X = torch.randn(300, 576, generator=gen)
    X[:, [5, 77]] = 0.0
    qt = gptq(weight, hessian(X), "int4-g128-asym-minmax")
    W_hat = qt.dequantize()
    assert torch.isfinite(W_hat).all()
    # a dead column is rounded to nearest on its group's grid (the reference zeroes it): no error feedback in or out
    s, z = qt.scales()[:, 0], qt.zero_point[:, 0].float()  # columns 5 and 77 sit in group 0
    expect = (torch.clamp(torch.round(weight[:, [5, 77]] / s[:, None] + z[:, None]), 0, 15) - z[:, None]) * s[:, None]
    assert torch.equal(W_hat[:, [5, 77]], expect)


def test_bad_input(weight):
    H = torch.eye(576)
    with pytest.raises(ValueError, match="H must be"):
        gptq(weight, torch.eye(10), "int4-g128")
    with pytest.raises(ValueError, match="runs of input columns"):
        gptq(weight, H, QuantSpec("int4", granularity=QuantSpec.parse("int4-channel@1").granularity))
    with pytest.raises(ValueError, match="2-d"):
        gptq(weight[0], H, "int4-g128")
    with pytest.raises(ValueError, match="double"):
        gptq(weight, H, "nf4-b64-dq")


def test_explicit_order_equals_act_order(weight, gen):
    X = torch.randn(300, 576, generator=gen) * torch.linspace(0.1, 3, 576)
    H = hessian(X)
    a = gptq_sweep(weight, H, "int4-g64", act_order=True)
    b = gptq_sweep(weight, H, "int4-g64", perm=torch.argsort(torch.diag(H), descending=True))
    assert torch.equal(a.W_hat, b.W_hat)
    with pytest.raises(ValueError, match="permutation"):
        gptq_sweep(weight, H, "int4-g64", perm=torch.zeros(576, dtype=torch.long))


def test_half_precision_weight_keeps_its_codes(weight, gen):
    X = torch.randn(600, 576, generator=gen) @ torch.randn(576, 576, generator=gen)
    H = hessian(X)
    W = weight.to(torch.bfloat16)
    sweep = gptq_sweep(W, H, "int8-channel")
    qt = gptq(W, H, "int8-channel")
    assert qt.dtype == torch.bfloat16
    assert torch.equal(qt.dequantize().float(), sweep.W_hat.to(torch.bfloat16).float())
    assert torch.equal(quantize(sweep.W_hat, "int8-channel", scale=sweep.scale).codes(), qt.codes())


@pytest.mark.parametrize("spec", ["int4-g32-asym-minmax", "int3-channel-sym-absmax", "nf4-b32", "int4-g48-sym-mse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_linears_sharing_an_input_can_be_swept_together(spec, act_order):
    """Stacking q/k/v-like weights into one sweep gives each exactly the codes and scales of its own sweep
    (float64, so no BLAS blocking can flip a rounding)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(300, 96, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3, 96, dtype=torch.float64)
    H = hessian(X).double()
    weights = [torch.randn(rows, 96, generator=gen, dtype=torch.float64) for rows in (40, 24, 24)]
    together = gptq_shared(weights, H, spec, act_order=act_order, block_size=32)
    for W, qt in zip(weights, together):
        alone = gptq(W, H, spec, act_order=act_order, block_size=32)
        assert qt.shape == alone.shape and qt.dtype == torch.float64
        assert torch.equal(qt.codes(), alone.codes())
        assert torch.equal(qt.scales(), alone.scales())
        assert (qt.zero_point is None and alone.zero_point is None) or torch.equal(qt.zero_point, alone.zero_point)


def test_shared_sweep_rejects_mismatched_or_per_tensor_weights():
    H = torch.eye(8)
    with pytest.raises(ValueError, match="same input width"):
        gptq_shared([torch.randn(4, 8), torch.randn(4, 6)], H, "int4-channel")
    with pytest.raises(ValueError, match="span rows"):
        gptq_shared([torch.randn(4, 8), torch.randn(4, 8)], H, "int4-tensor")


def test_output_error_is_the_normalised_proxy(weight, gen):
    """||X D^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T) with H = (2/n) X^T X (eq. 1), and = ||D||^2/||W||^2 for X = I."""
    from qlab.methods.weight.gptq import output_error

    X = torch.randn(400, 576, generator=gen) @ torch.randn(576, 576, generator=gen) / 24
    W_hat = rtn(weight, "int3-g64-asym-minmax").dequantize()
    H = hessian(X).double()
    expected = proxy_error(weight, W_hat, H) / proxy_error(weight, torch.zeros_like(weight), H)
    assert output_error(weight, W_hat, X) == pytest.approx(expected, rel=1e-5)
    assert output_error(weight, W_hat, torch.eye(576)) == pytest.approx(
        float(((weight - W_hat).double() ** 2).sum() / (weight.double() ** 2).sum()), rel=1e-6)
    # a list of weights reading one X: the squared errors and norms add up
    two = output_error([weight, 2 * weight], [W_hat, 2 * W_hat], X)
    assert two == pytest.approx(expected, rel=1e-5)  # both terms scale by 4: the ratio is unchanged
    with pytest.raises(ValueError, match="same shapes"):
        output_error(weight, W_hat[:3], X)


def test_compare_orders(weight, gen):
    from qlab.methods.weight.gptq import column_orders, compare_orders, output_error

    X = torch.randn(600, 576, generator=gen) @ torch.randn(576, 576, generator=gen) * torch.linspace(0.1, 3, 576) / 24
    H = hessian(X)
    orders = column_orders(H, seed=3)
    assert sorted(orders["random"].tolist()) == list(range(576))
    assert torch.equal(orders["random"], column_orders(H, seed=3)["random"])
    d = torch.diag(H)
    assert (d[orders["act-order (diag H descending)"]].diff() <= 0).all()
    assert (d[orders["reverse (diag H ascending)"]].diff() >= 0).all()
    table = compare_orders(weight, H, "int3-g128-asym-minmax", {"calib": X}, orders)
    assert list(table.index) == list(orders) + ["RTN (no feedback)"]
    act = gptq(weight, H, "int3-g128-asym-minmax", act_order=True).dequantize()
    assert table.loc["act-order (diag H descending)", "calib"] == pytest.approx(output_error(weight, act, X), rel=1e-12)
    assert table.loc["RTN (no feedback)", "calib"] == pytest.approx(
        output_error(weight, rtn(weight, "int3-g128-asym-minmax").dequantize(), X), rel=1e-12)
    assert (table["calib"].iloc[:4] < table["calib"].iloc[4]).all()  # every order beats RTN on correlated inputs
    # uncorrelated inputs (X^T X diagonal): nothing to compensate, every order reproduces RTN exactly
    X_diag = torch.diag(torch.rand(576, generator=gen) + 0.5)
    flat = compare_orders(weight, hessian(X_diag), "int3-g128-asym-minmax", {"diag": X_diag}, orders)["diag"]
    assert (flat == flat.iloc[-1]).all(), flat


# ---- inputs dead in calibration (issue 16) ---------------------------------------------------------------

def test_all_zero_hessian_gives_round_to_nearest(weight):
    """No calibration information at all: GPTQ has nothing to feed back, and must not zero the weight."""
    from qlab import quantize

    for spec in ("int4-g128-asym-minmax", "int3-channel"):
        qt = gptq(weight, torch.zeros(576, 576), spec)
        assert torch.equal(qt.codes(), quantize(weight, spec).codes())


def test_inputs_dead_in_calibration_keep_their_weights(real_layer):
    """16 input channels never fire in calibration, then do: GPTQ's output error on those inputs stays at RTN's
    level (it was 0.353 against RTN's 0.091 when their weight columns were zeroed)."""
    from qlab import quantize

    W, X = real_layer
    dead = torch.arange(0, 576, 36)
    calib = X.clone()
    calib[:, dead] = 0
    qt = gptq(W, hessian(calib), "int4-g128-asym-minmax")
    err = lambda W_hat: float(((X @ (W - W_hat).T) ** 2).sum() / ((X @ W.T) ** 2).sum())  # noqa: E731
    e_gptq, e_rtn = err(qt.dequantize()), err(quantize(W, "int4-g128-asym-minmax").dequantize())
    assert (qt.dequantize()[:, dead] != 0).any()
    assert e_gptq < 1.2 * e_rtn, (e_gptq, e_rtn)


def test_empty_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one calibration input"):
        hessian(torch.zeros(0, 256))


def test_rotated_gptq_is_gptq_of_the_rotated_weight_against_the_rotated_hessian(real_layer):
    """rotate=True quantizes W' = V S_V W S_U V^T with H' = V S_U H S_U V^T: the codes of a direct gptq call on
    them, rotated back; against H itself (not H') the codes differ."""
    from qlab.core.rotations import RandomizedHadamard
    from qlab.methods.weight.gptq import gptq_method

    W, X = real_layer
    W, X = W[:48], X[:256]
    spec = "int3-g128-asym-minmax"
    qt = gptq_method([W], [X[:128], X[128:]], spec, rotate=True, seed=2).qweights[0]
    acc = HessianAccumulator(576)
    acc.add(X[:128]), acc.add(X[128:])
    R = RandomizedHadamard(48, 576, seed=2)
    Wr, Hr = R.weight(W.double()).float(), R.hessian(acc.H.double()).float()
    direct = gptq(Wr, Hr, spec)
    assert torch.equal(qt.inner.codes(), direct.codes()) and torch.equal(qt.inner.scales(), direct.scales())
    assert torch.equal(qt.dequantize(), R.weight_inverse(direct.dequantize().double()).float())
    assert not torch.equal(qt.inner.codes(), gptq(Wr, acc.H, spec).codes())
    # and the rotation pays on this layer's correlated inputs with outliers: lower output error than plain GPTQ
    plain = gptq_method([W], [X], spec).qweights[0]
    assert output_error(W, qt.dequantize(), X) < output_error(W, plain.dequantize(), X)


def test_rotated_gptq_group_shares_one_input_rotation(real_layer):
    from qlab.methods.weight.gptq import gptq_group

    W, X = real_layer
    H = hessian(X[:256])
    W = W.double()  # float64, so no BLAS blocking can flip a rounding between the stacked and the single sweep
    q, k = gptq_group([W[:64], W[64:96]], H, "int4-g128-asym-minmax", rotate=True, seed=1)
    assert torch.equal(q.SU, k.SU) and q.shape == (64, 576) and k.shape == (32, 576) and k.dtype == torch.float64
    alone = gptq_group([W[64:96]], H, "int4-g128-asym-minmax", rotate=True, seed=1)[0]
    assert torch.equal(k.inner.codes(), alone.inner.codes())  # the stacked sweep gives each its own codes
    with pytest.raises(ValueError, match="no Hadamard construction for n = 100"):
        gptq_group([torch.randn(8, 100)], torch.eye(100), "int4-channel", rotate=True)
