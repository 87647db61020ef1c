"""Applying mixes and collecting an imatrix on a tiny random Llama (k-quant friendly widths)."""
import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
import numpy as np
import pytest
import torch

from qlab import gguf as qg
from qlab.methods.weight.gguf import gguf_names
from qlab.models.imatrix import collect_imatrix

try:  # a mix is now a recipe for the model walker; earlier, apply_mix sat beside the gguf method
    from qlab.models.walker import apply_mix
except ImportError:
    from qlab.methods.weight.gguf import apply_mix

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the gguf package quantizes these itself
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # ... and decodes these


def tiny_llama(hidden=256, layers=2, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def independent_round_trip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a weight must hold after its GGUF round trip, by the gguf package (llama.cpp's gguf-py):
    legacy types quantized and decoded by it alone; k-quants (which it cannot quantize) are qlab's bytes
    decoded by it."""
    x = w.detach().float().numpy()
    if qtype == "F16":
        return w.detach().half().float()
    t = GGMLQuantizationType[qtype]
    if qtype in LEGACY:
        data = gguf.quants.quantize(x, t)
    else:
        assert qtype in K_QUANTS, qtype
        data = qg.quantize(w.detach(), qtype).data
    return torch.from_numpy(gguf.quants.dequantize(data, t).reshape(x.shape).copy())


def gguf_nbytes(qtype: str, numel: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return numel // block_size * type_size


@pytest.mark.parametrize("mix, hidden, types", [
    ("Q4_K_M", 256, {"Q4_K", "Q6_K"}),
    ("Q2_K", 256, {"Q2_K", "Q3_K", "Q4_K", "Q6_K"}),  # attn_v Q4_K (n_head / n_kv_head = 4), ffn_down, attn_output Q3_K
    ("Q3_K_M", 256, {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),  # attn_v Q5_K (first two layers), ffn_down, attn_output Q4_K
    ("Q5_K_M", 256, {"Q5_K", "Q6_K"}),
    ("Q4_0", 256, {"Q4_0", "Q6_K"}),  # token_embd (tied: the output) is Q6_K in every mix but Q8_0
    ("Q4_1", 256, {"Q4_1", "Q6_K"}),
    ("Q5_0", 256, {"Q5_0", "Q6_K"}),
    ("Q5_1", 256, {"Q5_1", "Q6_K"}),
    ("Q8_0", 256, {"Q8_0"}),
    ("Q4_K_M", 96, {"Q5_0", "Q8_0"}),  # 96- and 192-wide rows: llama.cpp's fallbacks Q4_K -> Q5_0, Q6_K -> Q8_0
])
def test_apply_mix_holds_the_independent_round_trip(mix, hidden, types):
    model = tiny_llama(hidden)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = apply_mix(model, mix, imatrix=None, progress=False)
    by_name = {c["name"]: c for c in info["choices"]}
    names = gguf_names(model)
    assert set(by_name) == set(names) and {c["qtype"] for c in info["choices"]} == types
    params = dict(model.named_parameters())
    for g, h in names.items():
        assert torch.equal(params[h], independent_round_trip(before[h], by_name[g]["qtype"])), (g, by_name[g]["qtype"])
    for h, p in params.items():  # norms are never quantized
        if h not in names.values():
            assert torch.equal(p, before[h]), h
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied
    assert info["nbytes"] == sum(gguf_nbytes(by_name[g]["qtype"], before[h].numel()) for g, h in names.items())


def test_q4_k_m_choices_by_hand():
    model = tiny_llama()
    info = apply_mix(model, "Q4_K_M", progress=False)
    by_name = {c["name"]: c for c in info["choices"]}
    # use_more_bits(i, 2) is False for layer 0 and True for layer 1 (i >= 7·2//8)
    assert (by_name["blk.0.attn_v.weight"]["qtype"], by_name["blk.1.attn_v.weight"]["qtype"]) == ("Q4_K", "Q6_K")
    assert (by_name["blk.0.ffn_down.weight"]["qtype"], by_name["blk.1.ffn_down.weight"]["qtype"]) == ("Q4_K", "Q6_K")
    assert by_name["token_embd.weight"]["qtype"] == "Q6_K"        # tied, 256-wide rows: output rule gives Q6_K
    # 2 layers of q, o 256x256, k, v 64x256, gate, up 512x256, down 256x512, and the 128x256 embedding
    q6 = 64 * 256 + 256 * 512 + 128 * 256
    q4 = 2 * (2 * 256 * 256 + 2 * 64 * 256 + 3 * 512 * 256) - q6 + 128 * 256
    assert info["nbytes"] == q4 * 144 // 256 + q6 * 210 // 256 == 691584


def test_imatrix_is_mean_square_of_layer_inputs():
    model = tiny_llama()
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    im = collect_imatrix(model, windows, progress=False)
    assert set(im) == {g for g in gguf_names(model) if g.startswith("blk.")}
    assert np.array_equal(im["blk.0.attn_q.weight"], im["blk.0.attn_k.weight"])   # q, k, v share their input
    assert im["blk.1.ffn_down.weight"].shape == (512,) and (im["blk.1.ffn_down.weight"] >= 0).all()
    # by hand for the first layer's q projection: its input is the first RMSNorm of the embeddings
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 256)
    assert np.allclose(im["blk.0.attn_q.weight"], (x * x).mean(0).detach().numpy(), rtol=1e-5, atol=1e-7)
