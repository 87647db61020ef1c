import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlab.methods.weight.awq import awq
from qlab.methods.weight.gptq import gptq, hessian
from qlab.models.walker import quantize_model
from qlab.core.quant import fake_quant

SPEC = "int3-g32-asym-minmax"


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _logit_errors(model, reference, names, tokens):
    """Mean squared logit error against ``reference`` of ``model``, and of RTN (fake_quant) on the same Linears."""
    rtn_model = copy.deepcopy(reference)
    for name in names:
        w = rtn_model.get_submodule(name).weight
        w.data = fake_quant(w.data, SPEC)
    ref = reference(input_ids=tokens).logits
    return tuple(float(((m(input_ids=tokens).logits - ref) ** 2).mean()) for m in (model, rtn_model))


def test_sequential_gptq_on_a_tiny_llama():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    calib, test = torch.randint(0, 128, (16, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)
    model, report = quantize_model(model, {"model.layers.*": f"gptq:{SPEC}"}, calib, batch_size=4, true_sequential=True)
    results = report.qtensors
    assert len(results) == 2 * 7
    # the model holds the de-quantized weights
    for name, qt in results.items():
        assert torch.equal(model.get_submodule(name).weight.data, qt.dequantize())

    # layer 1 was calibrated on the inputs produced by the already-quantized layer 0:
    # re-running GPTQ on its original weight with the quantized model's own inputs gives the same codes
    captured = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for start in range(0, 16, 4):
            model(input_ids=calib[start:start + 4], use_cache=False)
    hook.remove()
    original = reference.model.layers[1].mlp.down_proj.weight.data
    again = gptq(original, hessian(torch.cat(captured)), SPEC)
    same = (again.codes() == results["model.layers.1.mlp.down_proj"].codes()).float().mean()
    assert same > 0.999

    # and the quantized model is closer to the float one than round-to-nearest on every linear
    e_gptq, e_rtn = _logit_errors(model, reference, results, calib)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


def test_one_pass_mode_shares_inputs():
    """Without true-sequential, q/k/v of layer 0 read the same input: GPTQ with the H of that input."""
    model = tiny_llama()
    reference = copy.deepcopy(model)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    _, report = quantize_model(model, {"model.layers.*": f"gptq:{SPEC}"}, calib, batch_size=4)
    results = report.qtensors
    captured = []
    layer0 = reference.model.layers[0]
    hook = layer0.self_attn.k_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for start in range(0, 8, 4):
            reference(input_ids=calib[start:start + 4], use_cache=False)
    hook.remove()
    H = hessian(torch.cat(captured))
    for name in ("q_proj", "k_proj", "v_proj"):
        again = gptq(getattr(layer0.self_attn, name).weight.data, H, SPEC)
        assert torch.equal(again.codes(), results[f"model.layers.0.self_attn.{name}"].codes())


@pytest.mark.parametrize("method, passes", [("gptq", [4, 2]), ("awq", [2, 2])])
def test_calibration_pass_stops_at_the_last_linear(method, passes):
    """A layer's calibration pass ends once down_proj has its input (its output is not needed), and the last
    layer's outputs are never computed: down_proj runs only in the pass that feeds the next layer. GPTQ
    (sequential) runs each layer twice, the second time quantized, for the next layer's inputs; AWQ once, the
    float layer's outputs of its calibration pass being the next layer's inputs."""
    model = tiny_llama()
    down, q = [0, 0], [0, 0]
    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda m, a, y, i=i: down.__setitem__(i, down[i] + 1))
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, y, i=i: q.__setitem__(i, q[i] + 1))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, {"model.layers.*": f"{method}:{SPEC}"}, calib, batch_size=4, inplace=True)
    assert down == [2, 0]  # layer 0: its two batches in the pass that feeds layer 1; layer 1: none
    assert q == passes


def _awq_on_tiny_llama():
    """(AWQ-quantized model, its float copy, the calibration windows, the size report) of a tiny Llama whose
    activations have outlier channels, as in real LLMs."""
    model = tiny_llama()
    for name, p in model.named_parameters():
        if "layernorm" in name:
            p.data = torch.ones_like(p)
            p.data[:3] = 30.0
    reference = copy.deepcopy(model)
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = quantize_model(model, {"model.layers.*": {"method": "awq", "spec": SPEC, "n_grid": 10}}, calib,
                                   batch_size=4)
    return model, reference, calib, report


def test_awq_through_the_walker_on_a_tiny_llama():
    model, reference, calib, report = _awq_on_tiny_llama()
    results = report.qtensors
    assert len(results) == 2 * 7
    for name, qt in results.items():
        assert torch.equal(model.get_submodule(name).weight.data, qt.dequantize())
    e_awq, e_rtn = _logit_errors(model, reference, results, calib)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_awq_calibrates_on_the_float_models_activations():
    """As llm-awq (run_awq takes each layer's inputs from the float layer before it): AWQ of layer 1 through the
    walker equals AWQ run by hand on layer 1's weights with the float model's own inputs, bit for bit."""
    _, reference, calib, report = _awq_on_tiny_llama()
    layer1 = reference.model.layers[1]
    captured = {"q": [], "down": []}
    hooks = [layer1.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured["q"].append(a[0])),
             layer1.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured["down"].append(a[0]))]
    with torch.no_grad():
        for start in range(0, 8, 4):
            reference(input_ids=calib[start:start + 4], use_cache=False)
    for h in hooks:
        h.remove()
    down = awq(layer1.mlp.down_proj.weight.data, captured["down"], SPEC, n_grid=10)
    assert torch.equal(down.qweights[0].codes(), report.qtensors["model.layers.1.mlp.down_proj"].codes())
    attn = layer1.self_attn
    qkv = awq([attn.q_proj.weight.data, attn.k_proj.weight.data, attn.v_proj.weight.data], captured["q"], SPEC,
              n_grid=10, clip=[False, False, True])  # (the reference's clip search skips q and k)
    for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(qkv.qweights[k].codes(), report.qtensors[f"model.layers.1.self_attn.{name}"].codes())
