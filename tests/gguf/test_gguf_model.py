"""Applying mixes and collecting an imatrix on a tiny random Llama (k-quant friendly widths)."""
import numpy as np
import pytest
import torch

from qlab import gguf as qg
from qlab.methods.weight.gguf import apply_mix, gguf_names
from qlab.models.imatrix import collect_imatrix


def tiny_llama(hidden=256, layers=2, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def test_apply_mix_replaces_every_weight_by_its_round_trip():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = apply_mix(model, "Q4_K_M", progress=False)
    by_name = {c["name"]: c for c in info["choices"]}
    names = gguf_names(model)
    params = dict(model.named_parameters())
    nbytes = 0
    for g, h in names.items():
        q = qg.quantize(before[h], by_name[g]["qtype"])
        assert torch.equal(params[h], q.dequantize()), g
        nbytes += q.nbytes
    # use_more_bits(i, 2) is False for layer 0 and True for layer 1 (i >= 7·2//8)
    assert (by_name["blk.0.attn_v.weight"]["qtype"], by_name["blk.1.attn_v.weight"]["qtype"]) == ("Q4_K", "Q6_K")
    assert by_name["token_embd.weight"]["qtype"] == "Q6_K"        # tied, 256-wide rows: output rule gives Q6_K
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)   # still tied
    assert info["nbytes"] == nbytes


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
