"""Apply a llama.cpp mix to a transformers Llama model (fake quantization, for perplexity sweeps).

The GGUF names of a Llama model map one to one onto the transformers names:

    token_embd            <-> model.embed_tokens          (also the lm_head when tied)
    blk.N.attn_q/k/v      <-> model.layers.N.self_attn.q_proj / k_proj / v_proj
    blk.N.attn_output     <-> model.layers.N.self_attn.o_proj
    blk.N.ffn_gate/up/down <-> model.layers.N.mlp.gate_proj / up_proj / down_proj
    output                <-> lm_head                     (absent when tied)

llama.cpp's converter permutes the rows of q and k (rotary layout); GGUF blocks never cross a
row, so quantizing the transformers weight row by row gives the same blocks in another row
order, and the same dequantized model.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.gguf.blocks import quantize
from qlab.gguf.mixes import choose_types, mix_summary

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, in llama.cpp's file order."""
    out = {"token_embd.weight": "model.embed_tokens.weight"}
    n_layer = model.config.num_hidden_layers
    for i in range(n_layer):
        for hf, gg in _LAYER.items():
            out[f"blk.{i}.{gg}.weight"] = f"model.layers.{i}.{hf}.weight"
    if not model.config.tie_word_embeddings:
        out["output.weight"] = "lm_head.weight"
    return out


@torch.no_grad()
def apply_mix(model: nn.Module, mix: str, imatrix: dict | None = None, progress: bool = True) -> dict:
    """Replace every weight of ``model`` (in place) by its GGUF round trip under ``mix``.

    Returns ``dict(choices=[...], summary=mix_summary(...), nbytes=...)``; ``choices`` lists each
    tensor's wanted and final type (after llama.cpp's row-length fallback).
    """
    names = gguf_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg = model.config
    n_gqa = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    choices = choose_types(mix, [(g, tuple(params[h].shape)) for g, h in names.items()], n_gqa=n_gqa,
                           has_imatrix=imatrix is not None)
    nbytes = 0
    for c in tqdm(choices, desc=f"mix {mix}", disable=not progress):
        p = params[names[c["name"]]]
        if c["qtype"] in ("F32", "F16"):
            p.data = p.data.to(torch.float16).to(p.dtype) if c["qtype"] == "F16" else p.data
            nbytes += p.numel() * (2 if c["qtype"] == "F16" else 4)
            continue
        im = None if imatrix is None else imatrix.get(c["name"])
        t = quantize(p.data, c["qtype"], imatrix=im)
        p.data = t.dequantize().to(p.dtype)   # a new tensor: the tied lm_head follows the embedding
        nbytes += t.nbytes
    return dict(choices=choices, summary=mix_summary(choices), nbytes=nbytes)
