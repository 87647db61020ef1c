"""QATLinear, prepare / convert, and why a fake quant needs a straight-through gradient."""
import doctest

import pytest
import torch
from torch import nn

from qlab.core.quant import fake_quant, qparams, quantize
from qlab.methods.train import QATLinear, QuantizedInput, convert, naive_gradients, prepare
from qlab.methods.train import bitnet, loop, lsq, qat
from qlab.models.modules import QuantLinear

SPECS = ["int4-g32", "int4-channel", "int3-g128-asym-minmax", "int2-channel-asym-minmax", "int4-g32-asym-minmax-fmin",
         "int8-channel", "nf4", "fp8_e4m3", "ternary", "int4-g32-mse"]


def _layer(spec, act_spec=None, learned_scale=False, seed=0):
    torch.manual_seed(seed)
    return QATLinear.from_linear(nn.Linear(72, 24), spec, act_spec, learned_scale)  # 72: a padded last group of 32


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("act", [None, "int8-token-sfp32"])
def test_converted_layer_gives_the_fake_quant_output_bit_for_bit(spec, act):
    layer = _layer(spec, act)
    x = torch.randn(3, 5, 72)
    y_fake = layer(x)
    converted = convert(nn.Sequential(layer), QuantLinear)[0]
    assert isinstance(converted, QuantizedInput if act else QuantLinear)
    assert torch.equal(converted(x), y_fake)


@pytest.mark.parametrize("spec,act", [("int4-g32", None), ("int3-channel", None), ("int2-g32-sfp32", None),
                                      ("int4-g32", "int8-token-sfp32")])
def test_lsq_layer_converts_exactly_after_its_steps_moved(spec, act):
    layer = _layer(spec, act, learned_scale=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x, target = torch.randn(64, 72), torch.randn(64, 24)
    before = layer.lsq.steps.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()
    assert not torch.equal(layer.lsq.steps, before)  # the steps did learn
    x = torch.randn(7, 72)
    assert torch.equal(convert(nn.Sequential(layer), QuantLinear)[0](x), layer(x))


def test_forward_is_the_float_layer_on_the_fake_quantized_weight():
    layer = _layer("int4-g32")
    x = torch.randn(4, 72)
    expected = x @ quantize(layer.weight.detach(), "int4-g32").dequantize().T + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_weight_gradient_is_the_float_gradient_inside_the_range_and_zero_outside():
    """Closed form: for L = sum(R * y) and y = x W_hat^T + b, dL/dW = R^T x where |W| <= 7 s (d W_hat / d W = 1),
    0 elsewhere. Absmax puts every weight inside except where the fp16-rounded scale lands just below
    max|W| / 7: then that row's largest weight is (barely) clipped, and gets no gradient."""
    layer = _layer("int4-channel")
    x, R = torch.randn(9, 72), torch.randn(9, 24)
    (R * layer(x)).sum().backward()
    scale, _ = qparams(layer.weight.detach(), "int4-channel")
    inside = layer.weight.detach().abs() <= 7 * scale[:, None]
    assert (~inside).sum(1).max() <= 1  # at most the largest weight of a row
    assert torch.allclose(layer.weight.grad, (R.T @ x) * inside, atol=1e-5)
    assert torch.allclose(layer.bias.grad, R.sum(0), atol=1e-5)


def test_input_gradient_goes_straight_through_the_activation_quantizer():
    layer = _layer("int4-channel", "int8-token-sfp32")
    x = torch.randn(9, 72, requires_grad=True)
    R = torch.randn(9, 24)
    (R * layer(x)).sum().backward()
    W_hat = fake_quant(layer.weight.detach(), "int4-channel")
    assert torch.allclose(x.grad, R @ W_hat, atol=1e-5)


def test_prepare_replaces_linears_by_pattern_first_match_wins():
    from embedded import tiny_llama

    model = tiny_llama(tied=False)
    prepare(model, {"model.layers.0.*": None, "*.mlp.*": {"spec": "int3-g32", "learned_scale": True},
                    "model.layers.*": "int4-g32"})
    kinds = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(type(m) is nn.Linear for n, m in kinds.items() if n.startswith("model.layers.0.") or n == "lm_head")
    mlp, attn = kinds["model.layers.1.mlp.up_proj"], kinds["model.layers.1.self_attn.q_proj"]
    assert isinstance(mlp, QATLinear) and str(mlp.spec) == "int3-g32-sym-absmax" and mlp.lsq is not None
    assert isinstance(attn, QATLinear) and str(attn.spec) == "int4-g32-sym-absmax" and attn.lsq is None
    ids = torch.randint(0, 256, (2, 16))
    logits = model(ids).logits
    convert(model, QuantLinear)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert torch.equal(model(ids).logits, logits)


def test_prepared_model_starts_as_the_rtn_model():
    """Step 0 of QAT is round-to-nearest: the same logits as quantizing each weight with qlab.quantize."""
    from embedded import tiny_llama

    model, reference = tiny_llama(), tiny_llama()
    prepare(model, {"model.layers.*": "int4-g32"})
    with torch.no_grad():
        for name, m in reference.named_modules():
            if name.startswith("model.layers.") and isinstance(m, nn.Linear):
                m.weight.copy_(quantize(m.weight, "int4-g32").dequantize())
    ids = torch.randint(0, 256, (2, 16))
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)


def test_bad_recipes_raise_clear_errors():
    with pytest.raises(ValueError, match="post-training method"):
        prepare(nn.Sequential(nn.Linear(8, 8)), {"0": "gptq:int4-g128"})
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        prepare(nn.Sequential(nn.Linear(8, 8)), {"*.q_proj": "int4-channel"})
    with pytest.raises(ValueError, match="symmetric int grid"):
        prepare(nn.Sequential(nn.Linear(8, 8)), {"0": {"spec": "nf4", "learned_scale": True}})


def test_naive_fake_quant_trains_nothing_and_the_ste_gets_the_closed_form_gradient():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 32, generator=g), torch.randn(16, 32, generator=g)
    norms = naive_gradients(W, X, "int4-channel")
    assert norms["detached"] == 0.0 and norms["round"] == 0.0
    # the STE's gradient of mean((X W_hat^T - X W^T)^2) w.r.t. W, by hand: 2/n * E^T X with E = X (W_hat - W)^T,
    # masked to the weights inside the range |W| <= 7 s
    E = X @ (fake_quant(W, "int4-channel") - W).T
    inside = W.abs() <= 7 * qparams(W, "int4-channel")[0][:, None]
    assert norms["ste"] == pytest.approx(float((2 / E.numel() * E.T @ X * inside).norm()), rel=1e-5)
    assert norms["ste"] > 0


def test_docstring_examples():
    for module in (qat, lsq, bitnet, loop):
        result = doctest.testmod(module, extraglobs={"torch": torch, "nn": nn})
        assert result.failed == 0 and result.attempted > 0, module.__name__
