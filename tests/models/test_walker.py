"""The recipe walker, fake-quant vs packed, size accounting by hand, Q4_1 re-quantization."""
import gguf
import numpy as np
import pytest
import torch

import embedded as emb
from embedded import embedded  # noqa: F401
from qlab.models import walker
from qlab.models.modules import QuantLinear
from qlab.study.gridalign import q4_1_fake_quant
from qlab.core.quant import fake_quant
from qlab.core.spec import QuantSpec


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_first_matching_pattern_wins(tiny):
    plan = walker.resolve(tiny, {"*.mlp.down_proj": "int8", "model.layers.1.*": "int4-g32-asym-minmax", "lm_head": None})
    assert plan["model.layers.0.mlp.down_proj"] == walker.Entry("rtn", QuantSpec.parse("int8"))
    assert plan["model.layers.1.mlp.down_proj"] == walker.Entry("rtn", QuantSpec.parse("int8"))  # first rule, not the second
    assert plan["model.layers.1.self_attn.q_proj"] == walker.Entry("rtn", QuantSpec.parse("int4-g32-asym-minmax"))
    assert plan["model.layers.0.self_attn.q_proj"] is None and plan["lm_head"] is None
    assert "model.embed_tokens" not in plan  # embeddings only when a pattern names them
    with pytest.raises(ValueError, match="matches no linear"):
        walker.resolve(tiny, {"*.qproj": "int8"})
    with pytest.raises(ValueError, match="recipe value"):
        walker.resolve(tiny, {"lm_head": 8})
    with pytest.raises(ValueError, match="mode"):
        walker.quantize_model(tiny, {}, mode="int8")


@torch.no_grad()
def test_fake_and_packed_give_identical_logits(tiny, ids):
    recipe = {"*.mlp.*": "int3-g32-asym-minmax", "model.layers.*": "nf4", "lm_head": "int8-channel-sym-absmax"}
    fake, rf = walker.quantize_model(tiny, recipe, mode="fake")
    packed, rp = walker.quantize_model(tiny, recipe, mode="packed")
    assert isinstance(packed.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(fake(ids).logits, packed(ids).logits)
    assert not torch.equal(fake(ids).logits, tiny(ids).logits)
    assert rf.layers.equals(rp.layers) and rf.total_bytes == rp.total_bytes
    # fake-quant weights are exactly the core's fake_quant; the input model is untouched
    w = tiny.model.layers[1].mlp.down_proj.weight
    assert torch.equal(fake.model.layers[1].mlp.down_proj.weight, fake_quant(w, "int3-g32-asym-minmax"))
    assert not isinstance(tiny.model.layers[0].mlp.up_proj, QuantLinear)


@torch.no_grad()
def test_quantized_tied_head_leaves_embedding_float(tiny):
    q, report = walker.quantize_model(tiny, {"lm_head": "int4-g32-sym-absmax"})
    assert torch.equal(q.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    assert not torch.equal(q.lm_head.weight, tiny.lm_head.weight)
    # the untied embedding is now counted separately, at 16 bits
    assert report.n_params == sum(p.numel() for p in tiny.parameters()) + 256 * 64


def test_size_accounting_by_hand():
    """int4 g128 asym on a [4, 256] layer: 512 B codes + 8 fp16 scales (16 B) + 8 4-bit zeros (4 B)."""
    lin = torch.nn.Sequential(torch.nn.Linear(256, 4, bias=False), torch.nn.Linear(4, 8, bias=True))
    _, r = walker.quantize_model(lin, {"0": "int4-g128-asym-minmax"})
    assert r.layers.bytes.tolist() == [532.0, 32 * 2]  # second layer float: 32 weights x 2 B
    assert r.quantized_bpw == 8 * 532 / 1024  # 4.15625
    assert r.other_bytes == 8 * 2  # the bias, fp16
    assert r.total_bytes == 532 + 64 + 16
    assert r.linear_bpw == pytest.approx(8 * (532 + 64) / (1024 + 32))


def test_q4_1_requantizer_is_bit_exact_with_gguf_py():
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1),
                                 gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(q4_1_fake_quant(w).numpy(), ref)
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_1_fake_quant(torch.randn(2, 40))


@pytest.mark.model
@torch.no_grad()
def test_on_the_embedded_model(embedded):
    """Q4_1 re-quantization reproduces the Q4_1 checkpoint exactly; int4 g32 with an integer zero point
    does not; fake and packed agree on the real model (two layers, to stay fast)."""
    model, _ = embedded
    w = model.model.layers[3].mlp.gate_proj.weight
    assert torch.equal(q4_1_fake_quant(w), w)
    rel = (fake_quant(w, "int4-g32-asym-minmax") - w).norm() / w.norm()
    assert 0.05 < rel < 0.12
    recipe = {"model.layers.0.self_attn.*": "int4-g64-sym-absmax", "model.layers.29.mlp.*": "int5-channel-asym-minmax"}
    fake, r = walker.quantize_model(model, recipe)
    packed, _ = walker.quantize_model(model, recipe, mode="packed")
    x = emb.windows(128, 2)[:1, :32]
    assert torch.equal(fake(x).logits, packed(x).logits)
    assert len(r.quantized) == 7


# ---- one walker for every method ---------------------------------------------------------------------

ALL_METHODS = {
    "rtn": "int4-g32-asym-minmax",
    "gptq": "gptq:int4-g32-asym-minmax",
    "awq": {"method": "awq", "spec": "int4-g32-asym-minmax", "n_grid": 5},
    "gguf": "gguf:Q4_0",
    "w8a8": "w8a8:int8-channel-sym-absmax",
    "smoothquant": {"method": "smoothquant", "spec": "int8-channel-sym-absmax", "alpha": 0.5, "act": "static"},
    "llm_int8": "llm_int8:int8-channel-sym-absmax",
    "quip": "quip:e8p",
    "aqlm": {"method": "aqlm", "spec": "1x8", "beam_size": 2, "rounds": 1, "adam_steps": 2, "kmeans_iters": 2},
}


def test_every_registered_method_is_in_the_table():
    from qlab.methods import METHODS

    assert set(METHODS) == set(ALL_METHODS)


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
@torch.no_grad()
def test_one_walker_serves_every_method_on_a_tiny_llama(tiny, ids, method):
    """Each method through quantize_model: every block Linear gets a QTensor, the report counts its bytes,
    the model runs, packed and fake modes agree, and the input model is untouched."""
    from qlab import QTensor

    before = {n: p.clone() for n, p in tiny.state_dict().items()}
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    fake, report = walker.quantize_model(tiny, walker.weight_only(ALL_METHODS[method]), calib)
    packed, _ = walker.quantize_model(tiny, walker.weight_only(ALL_METHODS[method]), calib, mode="packed")
    assert len(report.qtensors) == 14 and all(isinstance(q, QTensor) for q in report.qtensors.values())
    assert report.quantized.bytes.sum() == sum(q.nbytes for q in report.qtensors.values())
    y = fake(ids).logits
    assert torch.isfinite(y).all() and not torch.equal(y, tiny(ids).logits)
    assert torch.equal(y, packed(ids).logits)
    assert all(torch.equal(before[n], p) for n, p in tiny.state_dict().items())


@torch.no_grad()
def test_mixed_precision_recipe_gptq_blocks_8bit_ends(tiny, ids):
    """GPTQ 4-bit in the blocks, int8 embedding and lm_head (tied: quantized once, still tied)."""
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    recipe = {"model.embed_tokens": "int8-channel-sym-absmax", "lm_head": "int8-channel-sym-absmax",
              "model.layers.*": "gptq:int4-g32-asym-minmax"}
    q, report = walker.quantize_model(tiny, recipe, calib)
    table = report.layers.set_index("name")
    assert table.loc["model.embed_tokens", "spec"] == "int8-channel-sym-absmax"
    assert table.loc["lm_head", "spec"] == "tied to model.embed_tokens" and table.loc["lm_head", "n_weights"] == 0
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert torch.equal(q.model.embed_tokens.weight, fake_quant(tiny.model.embed_tokens.weight, "int8-channel-sym-absmax"))
    # int8 per row of [256, 64] with fp16 scales: 64 + 2 bytes per row
    assert table.loc["model.embed_tokens", "bytes"] == 256 * 66
    assert set(table.spec[table.index.str.startswith("model.layers")]) == {"gptq:int4-g32-asym-minmax"}
    assert report.n_params == sum(p.numel() for p in tiny.parameters())


def test_walker_errors_name_the_fix(tiny):
    with pytest.raises(ValueError, match="needs calibration windows"):
        walker.quantize_model(tiny, walker.weight_only("gptq:int4-g32-asym-minmax"))
    calib = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="outside them"):
        walker.quantize_model(tiny, {"lm_head": "gptq:int4-g32-asym-minmax"}, calib)
    with pytest.raises(ValueError, match="takes no option"):
        walker.quantize_model(tiny, walker.weight_only({"method": "gptq", "spec": "int4", "actorder": True}), calib)
    with pytest.raises(ValueError, match="unknown method"):
        walker.quantize_model(tiny, walker.weight_only("gtpq:int4"))
    with pytest.raises(ValueError, match="same entry"):
        walker.quantize_model(tiny, {"*.q_proj": "awq:int4-g32-asym-minmax", "*.k_proj": "awq:int3-g32-asym-minmax",
                                     "*.v_proj": "awq:int4-g32-asym-minmax"}, calib)


def test_gguf_mix_through_the_walker_keeps_the_tie():
    model = emb.tiny_llama(vocab=128, hidden=256, layers=2)
    info = walker.apply_mix(model, "Q4_K_M", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert info["nbytes"] == sum(q.nbytes for n, q in info["report"].qtensors.items() if n != "lm_head")


@pytest.mark.model
@torch.no_grad()
def test_one_walker_on_the_embedded_model(embedded):
    """Every method on the first two decoder layers of the real model (2 calibration windows of 64 tokens)."""
    model, _ = embedded
    calib = emb.windows(128, 2)[:, :64]
    x = emb.windows(128, 2)[:1, :32]
    ref = model(x).logits
    for method, value in ALL_METHODS.items():
        if method == "gguf":
            value = "q4_1"  # the checkpoint's own format: 576-wide rows take legacy blocks
        if method in ("quip", "aqlm"):
            continue  # 2 and 1 bits per weight: their own tests run them on real layers (about 3 s per layer here)
        q, report = walker.quantize_model(model, {"model.layers.0.*": value, "model.layers.1.*": value}, calib)
        assert len(report.qtensors) == 14, method
        logp, logq = ref.log_softmax(-1), q(x).logits.log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()  # per token
        assert 0 <= float(kl) < 0.1, (method, float(kl))
        if method == "gguf":  # Q4_1 re-quantization of the Q4_1 checkpoint is exact
            assert torch.equal(q(x).logits, ref)
