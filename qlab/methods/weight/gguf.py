"""llama.cpp's block formats as a method, and its mixes (Q4_K_M ...) as recipes for the model walker.

The method quantizes a weight to one GGUF type, byte for byte as llama.cpp (``qlab.gguf``), and returns
the ``GGUFTensor``. A mix is a choice of type per tensor; :func:`mix_recipe` turns it into a recipe of
exact layer names -> ``gguf`` entries, so ``qlab.models.walker.quantize_model`` applies it like any other.

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

import numpy as np
import torch
from torch import nn

from qlab.core.quant import quantize as core_quantize
from qlab.gguf.blocks import get_format, quantize
from qlab.gguf.mixes import choose_types, mix_summary
from qlab.methods.base import QuantResult

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


def parse_gguf_spec(spec) -> str:
    """A GGUF type name ('q4_k' -> 'Q4_K'; 'F16' is an fp16 cast); unknown types are a clear error."""
    qtype = str(spec).upper()
    if qtype != "F16":
        get_format(qtype)
    return qtype


def gguf_method(weights, X, spec, names=None, *, imatrix=None) -> QuantResult:
    """Each weight to the GGUF type ``spec`` ('Q4_K', 'Q8_0', ...; 'F16' is an fp16 cast), with llama.cpp's
    importance-weighted search when ``imatrix`` (mean x^2 per input column) is given."""
    qtype = str(spec).upper()
    if qtype == "F16":
        return QuantResult([core_quantize(W, "fp16") for W in weights])
    names = names or [None] * len(weights)
    return QuantResult([quantize(W, qtype, imatrix=imatrix, name=n) for W, n in zip(weights, names)])


def mix_recipe(model: nn.Module, mix: str, imatrix: dict | None = None) -> tuple[dict, list]:
    """(recipe, choices) for a llama.cpp mix: the recipe maps each module name (embedding, block Linears,
    lm_head) to ``{'method': 'gguf', 'spec': type}`` (plus its imatrix entry); ``choices`` lists each
    tensor's wanted and final type (after llama.cpp's row-length fallback), as ``choose_types`` does.
    A tied lm_head gets the embedding's entry, so the walker keeps the two tied."""
    names = gguf_names(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    cfg = model.config
    n_gqa = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    choices = choose_types(mix, [(g, tuple(params[h].shape)) for g, h in names.items()], n_gqa=n_gqa,
                           has_imatrix=imatrix is not None)
    recipe = {}
    for c in choices:
        module = names[c["name"]].removesuffix(".weight")
        if c["qtype"] == "F32":
            recipe[module] = None
            continue
        entry = {"method": "gguf", "spec": c["qtype"]}
        if imatrix is not None and c["name"] in imatrix:
            entry["imatrix"] = np.asarray(imatrix[c["name"]], dtype=np.float32)
        recipe[module] = entry
    if cfg.tie_word_embeddings and "model.embed_tokens" in recipe:
        recipe["lm_head"] = recipe["model.embed_tokens"]
    return recipe, choices


__all__ = ["gguf_names", "gguf_method", "mix_recipe", "mix_summary"]
