"""qlab.models.export for W8A8 (the 'w8a8' and 'smoothquant' methods): compressed-tensors "int-quantized"
folders, loaded back by transformers with compressed-tensors' run-time activation fake quantization on CPU.

What is compared, and why not every number is bit for bit:

* weights: compressed-tensors' decompressed int8 x float32 scale is qlab's de-quantized weight, bit for bit,
  and its own IntQuantizationCompressor writes the very int8 codes qlab writes;
* activations: with the same scale, compressed-tensors' fake quantization x -> clamp(round(x / s)) s is qlab's,
  bit for bit. Two rules differ: its dynamic symmetric int8 scale is max|x| / 127.5 (calculate_qparams: half
  of the 255-wide range [-128, 127]) where qlab's is max|x| / 127, and it clamps to -128 where qlab's
  restricted grid stops at -127 (only reached by static scales on inputs beyond the calibration range);
* one Linear: qlab sums the integer products exactly and scales once; compressed-tensors runs a float32 GEMM
  on the de-quantized operands. On one input the two outputs differ by at most the float32 GEMM error bound
  (K + 3) u sum_j |x_hat_j w_hat_j| (u = 2^-24), plus, per token, what the two activation grids can differ by;
* the whole model: with static scales both runtimes use one grid, so the logits differ by float32 rounding
  unless a last-bit difference moves an activation of a later layer onto the next code (not on these batches:
  the gap stays below 1e-3 of W8A8's own error). With dynamic scales they are two W8A8 quantizations of one
  float model, and the logits are held to that: an RMS gap below sqrt(2) times W8A8's own RMS error (what two
  independent errors of that size would give), top-1 tokens agreeing on at least 90% of positions. The
  per-layer check runs on every quantized Linear of the batch's forward.
"""
import json

import pytest
import torch
import transformers
from compressed_tensors.compressors import IntQuantizationCompressor  # a dependency: never skipped
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from safetensors.torch import load_file

import embedded as emb
from embedded import embedded  # noqa: F401
from qlab.methods.activation.smoothquant import quantize_activations
from qlab.models.export import export
from qlab.models.modules import W8A8Linear
from qlab.models.walker import quantize_model

transformers.logging.set_verbosity_error()
U = 2.0**-24  # float32 unit roundoff


def recipe(method: str, act: str, layers: str = "model.layers.*") -> dict:
    return {layers: {"method": method, "spec": "int8-channel-sym-absmax", "act": act}}


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def ids(calib):
    return calib[:2, :16]  # inside the static scales' calibration range


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def linear_bound(x: torch.Tensor, qlab_module: W8A8Linear) -> torch.Tensor:
    """The largest |compressed-tensors' output - qlab's output| on input x that float32 rounding and the
    two activation rules allow (see the module docstring), per output element."""
    x = x.reshape(-1, x.shape[-1]).float()
    w_hat = qlab_module.qweight.dequantize().abs()
    x_hat = quantize_activations(x, qlab_module.act, qlab_module.static_scale).dequantize().abs()
    gemm = x_hat @ w_hat.T
    bound = ((x.shape[-1] + 3) * U * 1.01 + U) * gemm  # 1.01 here and below: slack for the bound's own rounding
    if qlab_module.act == "static":  # below -127.5 s compressed-tensors keeps -128, qlab -127: one step s
        s = qlab_module.static_scale
        bound = bound + 1.01 * s * ((x / s < -127.5).float() @ w_hat.T)
    else:  # dynamic: each grid within half its own step of x, steps max|x| / 127 and max|x| / 127.5
        m = x.abs().amax(dim=1, keepdim=True) if qlab_module.act == "token" else x.abs().max()
        bound = bound + 1.01 * m * (1 / 254 + 1 / 255) * w_hat.sum(dim=1)
    return bound


def compare_layers(loaded, qmodel, names, ids) -> dict:
    """Run ``loaded`` on ids; feed every quantized Linear's actual input to qlab's module as well. Return the
    worst ratio |difference| / bound, how many activations the two runtimes put on different int8 codes, and
    (static scales) how many of them sit below -127.5 s, where only compressed-tensors' grid reaches -128."""
    worst = {"ratio": 0.0, "codes_differ": 0, "below_grid": 0, "codes": 0}

    def hook(name):
        def fn(module, args, theirs):
            x, mine = args[0], qmodel.get_submodule(name)
            ours = mine(x)
            ratio = ((theirs - ours).abs().reshape(-1, ours.shape[-1]) / linear_bound(x, mine)).max()
            worst["ratio"] = max(worst["ratio"], float(ratio))
            # the activations: compressed-tensors' fake quantization with its own run-time scale rule
            ct_x = forward_quantize(module, x, "input", module.quantization_scheme.input_activations)
            assert torch.equal(theirs, torch.nn.functional.linear(ct_x, module.weight))  # it does run fake quant
            qx = quantize_activations(x, mine.act, mine.static_scale)
            worst["codes_differ"] += int((ct_x.reshape(qx.shape) != qx.dequantize()).sum())
            worst["codes"] += x.numel()
            if mine.act == "static":
                worst["below_grid"] += int((x / mine.static_scale < -127.5).sum())
        return fn

    handles = [loaded.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            logits = loaded(ids).logits
    finally:
        for h in handles:
            h.remove()
    return {**worst, "logits": logits}


@pytest.mark.parametrize("method, act", [("w8a8", "token"), ("w8a8", "tensor"), ("w8a8", "static"),
                                         ("smoothquant", "token"), ("smoothquant", "static")])
def test_w8a8_folder_loads_and_matches(tiny, calib, ids, tmp_path, method, act):
    qmodel, report = quantize_model(tiny, recipe(method, act), calib=calib)
    export(qmodel, report, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized" and list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["input_activations"]["strategy"] == ("token" if act == "token" else "tensor")
    assert group["input_activations"]["dynamic"] is (act != "static")
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8

    stored = load_file(tmp_path / "model.safetensors")
    for name in report.qtensors:  # SmoothQuant's s is folded: the norms on disk are the model's folded ones
        mine = qmodel.get_submodule(name)
        assert stored[f"{name}.weight"].dtype == torch.int8
        if act == "static":
            assert stored[f"{name}.input_scale"].item() == torch.tensor(mine.static_scale, dtype=torch.float32).item()
    for key in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(stored[key], qmodel.state_dict()[key])
        assert torch.equal(stored[key], tiny.state_dict()[key]) is (method == "w8a8")  # smoothquant folded s

    loaded = _load(tmp_path)  # kept int8 until the first forward decompresses it
    got = compare_layers(loaded, qmodel, list(report.qtensors), ids)
    for name, qt in report.qtensors.items():
        assert torch.equal(loaded.get_submodule(name).weight, qt.dequantize()), name
    assert got["ratio"] <= 1.0, got["ratio"]
    if act == "static":  # the same scale: on the same input the codes differ exactly where -128 is reached
        assert got["codes_differ"] == got["below_grid"], got
    else:  # max|x| / 127.5 vs / 127: codes differ (the test below checks them equal given qlab's scale)
        assert got["codes_differ"] > 0
    check_logits(got["logits"], qmodel, tiny, ids, act)


def check_logits(theirs, qmodel, model, ids, act):
    """Static scales: the same grid, so the logits differ by float32 GEMM rounding alone (no activation moved to
    another code on this batch): below 1e-3 of W8A8's own error. Dynamic scales: two W8A8 quantizations of one
    float model (max|x| / 127.5 vs / 127); were their errors independent and of equal size, the gap would be
    sqrt(2) times the error (RMS); sharing weights and most codes, it stays below that."""
    with torch.no_grad():
        ours, full = qmodel(ids).logits, model(ids).logits
    gap, noise = theirs - ours, ours - full
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    assert noise.abs().max() > 0
    if act == "static":
        assert gap.abs().max() <= 1e-3 * noise.abs().max(), (float(gap.abs().max()), float(noise.abs().max()))
    else:
        assert rms(gap) <= 2**0.5 * rms(noise), (rms(gap), rms(noise))
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def test_compressed_tensors_fake_quant_with_qlab_scale_is_bit_exact():
    """Given qlab's scales, compressed-tensors' own quantizer gives qlab's activations and codes exactly;
    its dynamic rule alone (max|x| / 127.5) differs, by a hand-checkable amount."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 64, generator=g) * torch.linspace(0.1, 5, 64)
    for act in ("token", "tensor"):
        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=act, dynamic=True)
        qx = quantize_activations(x, act)
        scale = qx.scales().reshape(-1, 1) if act == "token" else qx.scales().reshape(1)
        theirs = fake_quantize(x.reshape(-1, 64), scale, None, args)
        assert torch.equal(theirs, qx.dequantize()), act
    # hand example: one token [1.0, -0.5]: qlab s = 1/127, codes [127, -64] (-63.5 rounds to even);
    # compressed-tensors s = 1/127.5, codes round([127.5, -63.75]) = [128 -> clamp 127, -64]
    module = torch.nn.Linear(2, 1)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    module.quantization_status = None
    theirs = forward_quantize(module, torch.tensor([[[1.0, -0.5]]]), "input", args)
    assert torch.equal(theirs, torch.tensor([[[127.0, -64.0]]]) * (torch.tensor(1.0) / 127.5))
    assert quantize_activations(torch.tensor([[1.0, -0.5]]), "token").values().tolist() == [[127, -64]]
    # a static scale s = 0.5 on x = [-64, -63.9, 63.9]: codes [-128, -128, 128 -> 127] there, [-127, -127, 127] in
    # qlab's restricted grid; one step apart below -127.5 s only
    static = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    x = torch.tensor([[-64.0, -63.9, 63.9]])
    theirs = fake_quantize(x, torch.tensor([0.5]), None, static)
    assert theirs.tolist() == [[-64.0, -64.0, 63.5]]
    assert quantize_activations(x, "static", 0.5).dequantize().tolist() == [[-63.5, -63.5, 63.5]]


def test_int8_codes_equal_compressed_tensors_compressor(tiny, calib):
    """compressed-tensors' IntQuantizationCompressor, given qlab's de-quantized weight and scale, writes
    qlab's int8 codes; its decompressor gives back qlab's weight bit for bit."""
    from qlab.models.export import ct_input_args, ct_tensors, ct_weights_args

    qmodel, report = quantize_model(tiny, recipe("smoothquant", "static"), calib=calib)
    for name, qt in report.qtensors.items():
        module = qmodel.get_submodule(name)
        ours = ct_tensors(qt, module)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_weights_args(qt)),
                                    input_activations=QuantizationArgs(**ct_input_args(module)))
        theirs = IntQuantizationCompressor.compress({"weight": qt.dequantize(), "weight_scale": ours["weight_scale"]}, scheme)
        assert torch.equal(theirs["weight"], ours["weight"]) and theirs["weight"].dtype == torch.int8
        assert torch.equal(IntQuantizationCompressor.decompress(ours, scheme)["weight"], qt.dequantize())


def test_mixed_w8a8_and_weight_only(tiny, calib, ids, tmp_path):
    """A W8A8 block next to a weight-only int4 one: two config groups, two formats, one folder."""
    mix = {"model.layers.0.*": {"method": "w8a8", "spec": "int8-channel-sym-absmax", "act": "static"},
           "model.layers.1.*": "int4-g32-sym-absmax"}
    qmodel, report = quantize_model(tiny, mix, calib=calib)
    export(qmodel, report, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["int-quantized", "pack-quantized"]
    loaded = _load(tmp_path)
    with torch.no_grad():
        loaded(ids)  # the first forward decompresses
    for name, qt in report.qtensors.items():
        assert torch.equal(loaded.get_submodule(name).weight, qt.dequantize()), name


def test_llm_int8_is_refused_with_the_supported_list(tiny, tmp_path):
    qmodel, report = quantize_model(tiny, {"model.layers.*": "llm_int8:int8-channel-sym-absmax"})
    with pytest.raises(ValueError, match="Int8Linear.*supported:.*W8A8"):
        export(qmodel, report, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.model
def test_embedded_model_two_layers(embedded, tmp_path):
    """SmolLM2-135M (its float weights on a Q4_1 grid), SmoothQuant W8A8 per token on layers 0-1."""
    model, tokenizer = embedded
    calib = emb.windows(64, 2)
    qmodel, report = quantize_model(model, recipe("smoothquant", "token", "model.layers.[01].*"), calib=calib)
    export(qmodel, report, tmp_path, tokenizer)
    assert len(report.qtensors) == 14
    loaded = _load(tmp_path)
    ids = emb.windows(64, 1)
    got = compare_layers(loaded, qmodel, list(report.qtensors), ids)
    for name, qt in report.qtensors.items():
        assert torch.equal(loaded.get_submodule(name).weight, qt.dequantize()), name
    assert got["ratio"] <= 1.0, got["ratio"]
    check_logits(got["logits"], qmodel, model, ids, "token")
