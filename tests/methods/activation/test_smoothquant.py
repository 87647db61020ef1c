import pytest
import torch

from qlab.models.modules import W8A8Linear
from qlab.methods.activation.smoothquant import (WEIGHT_SPEC, int8_matmul, max_abs,
                                         quantize_activations, smoothing_scales, smoothquant, w8a8_output_error)
from qlab.core.quant import quantize


def test_half_migration_balances_the_ranges(gen):
    """alpha = 1/2: max|X_j / s_j| = max|W_j s_j| = sqrt(max|X_j| max|W_j|) (eq. 4)."""
    X = torch.randn(100, 32, generator=gen) * torch.logspace(-1, 2, 32)
    W = torch.randn(16, 32, generator=gen)
    s = smoothing_scales(max_abs(X), [W], alpha=0.5)
    expected = (max_abs(X) * W.abs().amax(0)).sqrt()
    assert torch.allclose(max_abs(X / s), expected, rtol=1e-5)
    assert torch.allclose((W * s).abs().amax(0), expected, rtol=1e-5)
    # alpha = 1 moves everything to the weights: every activation channel has max 1
    assert torch.allclose(max_abs(X / smoothing_scales(max_abs(X), [W], alpha=1.0)), torch.ones(32))


def test_integer_matmul_is_torchs_int8_gemm(gen):
    X = torch.randn(8, 64, generator=gen)
    W = torch.randn(32, 64, generator=gen)
    qx, qw = quantize_activations(X, "token"), quantize(W, WEIGHT_SPEC)
    ix = qx.values().to(torch.int8)
    iw = qw.values().to(torch.int8)
    acc = torch._int_mm(ix.contiguous(), iw.T.contiguous())  # torch's own int8 x int8 -> int32 GEMM
    expected = acc.double() * qx.scales().double()[:, None] * qw.scales().double()[None, :]
    assert torch.allclose(int8_matmul(qx, qw).double(), expected, rtol=1e-6)
    exact = (qx.values().long() @ qw.values().long().T).double()  # int64 sums
    assert torch.equal(int8_matmul(qx, qw), exact.mul(qx.scales().double()[:, None]).mul(qw.scales().double()[None, :]).float())
    # and the hand rule of vector-wise int8: round(x * 127 / absmax) per row
    assert torch.equal(ix[0].float(), torch.round(X[0] * 127 / X[0].abs().max()))


def test_static_scale_saturates():
    qx = quantize_activations(torch.tensor([[0.5, 2.0, -4.0]]), "static", static_scale=2.0 / 127)
    assert qx.values().tolist() == [[32.0, 127.0, -127.0]]
    with pytest.raises(ValueError, match="calibrated"):
        quantize_activations(torch.ones(1, 3), "static")


@pytest.mark.parametrize("act", ["token", "tensor", "static"])
def test_smoothing_beats_naive_w8a8_on_outlier_activations(real_layer, act):
    W, X = real_layer
    X = X.clone()
    X[:, :4] *= 10.0  # ~200x outlier channels, as in LLM activations
    ref = X @ W.T
    naive = W8A8Linear.from_linear(_linear(W), act=act, act_max=max_abs(X))
    e_naive = float(((naive(X) - ref) ** 2).mean())
    result = smoothquant([W], max_abs(X), alpha=0.5)
    smoothed = W8A8Linear(result.qweights[0], act=act, static_scale=float(max_abs(X / result.s).max()) / 127)
    e_smooth = float(((smoothed(X / result.s) - ref) ** 2).mean())
    assert e_smooth < 0.5 * e_naive, (e_smooth, e_naive)


def test_w8a8_linear_keeps_shape_and_bias(gen):
    lin = torch.nn.Linear(64, 16)
    x = torch.randn(2, 5, 64, generator=gen)
    y = W8A8Linear.from_linear(lin)(x)
    assert y.shape == (2, 5, 16)
    assert torch.allclose(y, lin(x), atol=0.05)


def _linear(W):
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return lin


def test_smoothquant_through_the_walker_keeps_the_function():
    """Folding SmoothQuant's scales into the RMSNorms keeps the float model's function; then every Linear is
    a W8A8Linear and the logits stay close."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from qlab.methods import METHODS
    from qlab.models.walker import quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    # the fold alone: SmoothQuant with int8 weights left float (rtn at fp16 would round them; use the scales only)
    result = METHODS["smoothquant"]([model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.up_proj.weight],
                                    [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))],
                                    WEIGHT_SPEC, alpha=0.5)
    folded = copy.deepcopy(model)
    layer = folded.model.layers[0]
    from qlab.models.transforms import fold_into_norm
    fold_into_norm(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], result.fold)
    with torch.no_grad():
        assert torch.allclose(folded(tokens).logits, before, atol=1e-4)
    q, report = quantize_model(model, {"model.layers.*": {"method": "smoothquant", "spec": "int8-channel-sym-absmax-sfp32"}},
                               tokens)
    assert sum(isinstance(m, W8A8Linear) for m in q.modules()) == 14
    assert set(report.layers.spec[report.layers.name.str.startswith("model.layers")]) == {"smoothquant:int8-channel-sym-absmax-sfp32"}
    with torch.no_grad():
        after = q(tokens).logits
    assert torch.allclose(after, before, atol=0.05)


def _w8a8_by_hand(X, W, static_scale=None):
    """int8 absmax by hand: W per output row, X per token (or one given scale), integer matmul, rescale."""
    sw = W.abs().amax(1, keepdim=True) / 127
    sx = X.abs().amax(1, keepdim=True) / 127 if static_scale is None else torch.tensor(static_scale)
    Wq = torch.round(W / sw).clamp(-127, 127)
    Xq = torch.round(X / sx).clamp(-127, 127)
    return (Xq.double() @ Wq.double().T) * sx.double() * sw.double().T


def test_w8a8_output_error_by_hand(gen):
    X_calib = torch.randn(64, 48, generator=gen) * torch.logspace(-1, 1, 48)
    X_test = torch.randn(32, 48, generator=gen) * torch.logspace(-1, 1, 48)
    Ws = [torch.randn(16, 48, generator=gen), torch.randn(8, 48, generator=gen) * 3]
    ref = [X_test.double() @ W.double().T for W in Ws]
    pooled = lambda Y_hats: float(sum(((Yh - Y) ** 2).sum() for Yh, Y in zip(Y_hats, ref)) /  # noqa: E731
                                  sum((Y ** 2).sum() for Y in ref))
    naive = pooled([_w8a8_by_hand(X_test, W) for W in Ws])
    assert w8a8_output_error(Ws, X_calib, X_test, "token") == pytest.approx(naive, rel=1e-4)
    # SmoothQuant, alpha = 0.3, static activation scale from the calibration set, all by hand (eq. 4)
    w_max = torch.stack([W.abs().amax(0) for W in Ws]).amax(0)
    s = X_calib.abs().amax(0) ** 0.3 / w_max ** 0.7
    static = float((X_calib / s).abs().max()) / 127
    smoothed = pooled([_w8a8_by_hand(X_test / s, W * s, static) for W in Ws])
    assert w8a8_output_error(Ws, X_calib, X_test, "static", alpha=0.3) == pytest.approx(smoothed, rel=1e-4)
    with pytest.raises(ValueError, match="weights must be"):
        w8a8_output_error([Ws[0][:, :10]], X_calib, X_test)


def test_channels_dead_in_calibration_are_not_smoothed(real_layer):
    """max|X_j| = 0 in calibration gives s_j = 1; with the old 1e-5 floor the smoothed W8A8 error on inputs
    where those channels fire was 0.998 (against 7.9e-5 unsmoothed)."""
    W, X = real_layer
    dead = torch.tensor([3, 300])
    calib = X.clone()
    calib[:, dead] = 0
    s = smoothing_scales(max_abs(calib), [W], alpha=0.5)
    assert torch.equal(s[dead], torch.ones(2))
    assert w8a8_output_error([W], calib, X, "token", alpha=0.5) < 0.01
