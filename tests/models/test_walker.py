"""The recipe walker, fake-quant vs packed, size accounting by hand, Q4_1 re-quantization."""
import gguf
import numpy as np
import pytest
import torch

import embedded as emb
from embedded import embedded  # noqa: F401
from qlab.models import walker
from qlab.study.gridalign import q4_1_fake_quant
from qlab.core.quant import QuantSpec, fake_quant


@pytest.fixture(scope="module")
def tiny():
    return emb.tiny_llama(vocab=256, hidden=64, layers=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_first_matching_pattern_wins(tiny):
    plan = walker.resolve(tiny, {"*.mlp.down_proj": "int8", "model.layers.1.*": "int4-g32-asym-minmax", "lm_head": None})
    assert plan["model.layers.0.mlp.down_proj"] == QuantSpec.parse("int8")
    assert plan["model.layers.1.mlp.down_proj"] == QuantSpec.parse("int8")  # first rule, not the second
    assert plan["model.layers.1.self_attn.q_proj"] == QuantSpec.parse("int4-g32-asym-minmax")
    assert plan["model.layers.0.self_attn.q_proj"] is None and plan["lm_head"] is None
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
    assert isinstance(packed.model.layers[0].mlp.up_proj, walker.QuantLinear)
    assert torch.equal(fake(ids).logits, packed(ids).logits)
    assert not torch.equal(fake(ids).logits, tiny(ids).logits)
    assert rf.layers.equals(rp.layers) and rf.total_bytes == rp.total_bytes
    # fake-quant weights are exactly the core's fake_quant; the input model is untouched
    w = tiny.model.layers[1].mlp.down_proj.weight
    assert torch.equal(fake.model.layers[1].mlp.down_proj.weight, fake_quant(w, "int3-g32-asym-minmax"))
    assert not isinstance(tiny.model.layers[0].mlp.up_proj, walker.QuantLinear)


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
