"""llama.cpp's quantization mixes ("Q4_K_M" ...): which block format each tensor gets.

A mix names a default format plus rules (``llama_tensor_get_type`` in llama.cpp's
``src/llama-quant.cpp``) that give some tensors more bits, for a Llama-architecture model with one
expert. The rules used here:

* ``attn_v``    Q2_K -> Q3_K (Q4_K if n_head/n_kv_head >= 4); Q3_K_M -> Q5_K for the first two
                layers, else Q4_K; Q3_K_L -> Q5_K; Q4_K_S -> Q5_K for the first 4 layers;
                Q4_K_M, Q5_K_M -> Q6_K on the "more bits" layers.
* ``ffn_down``  Q2_K -> Q3_K; Q3_K_M -> Q5_K below n/16, else Q4_K; Q3_K_L -> Q5_K;
                Q4_K_M, Q5_K_M -> Q6_K on the "more bits" layers; Q4_K_S -> Q5_K below n/8;
                Q4_0/Q5_0 with an imatrix -> Q4_1/Q5_1 below n/8.
* ``attn_output`` Q2_K -> Q3_K; Q3_K_M -> Q4_K; Q3_K_L -> Q5_K.
* ``output`` (and ``token_embd`` when the embeddings are tied): Q6_K, or Q8_0 when the row length
  is not a multiple of the mix's block size.

"More bits" layers: the first n/8, the last n/8, and every third one in between.

Then the **fallback**: a k-quant needs rows of a multiple of 256 values. A tensor whose rows are
not gets Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (F16 if even 32 fails).
The embedded SmolLM2-135M has 576-wide rows everywhere except ``ffn_down`` (1536 wide), so in
every k-quant mix only the 30 ``ffn_down`` matrices can be k-quants.

Norms, biases and other 1-D tensors are never quantized (they stay F32).
"""
from __future__ import annotations

import re

from qlab.gguf.blocks import get_format

DEFAULT_TYPE = {
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
}
MIXES = tuple(DEFAULT_TYPE)

FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers (the general.file_type key of a .gguf)
FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
             "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: first n/8, last n/8, every 3rd between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(name: str) -> str:
    """The tensor's role, from its GGUF name (``blk.3.attn_v.weight`` -> ``attn_v``)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in name:
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def is_quantizable(name: str, shape) -> bool:
    """llama.cpp quantizes only 2-D+ tensors whose name ends in 'weight' and is not a norm."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _attn_v(mix, i, n, n_gqa):
    if mix == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if mix == "Q3_K_M":
        return "Q5_K" if i < 2 else "Q4_K"
    if mix == "Q3_K_L":
        return "Q5_K"
    if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if mix == "Q4_K_S" and i < 4:
        return "Q5_K"
    return None


def _ffn_down(mix, i, n, has_imatrix):
    if mix == "Q2_K":
        return "Q3_K"
    if mix == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if mix == "Q3_K_L":
        return "Q5_K"
    if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if mix == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    if mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        return {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[mix]
    return None


def _attn_output(mix, i, n, _):
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix)


RULES = {"attn_v": _attn_v, "ffn_down": _ffn_down, "attn_output": _attn_output}


def fallback(qtype: str, ncols: int) -> str:
    """The type llama.cpp uses when rows of ``ncols`` values do not fit ``qtype``'s blocks."""
    if ncols % get_format(qtype).block_size == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    return new if ncols % get_format(new).block_size == 0 else "F16"


def llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's processing order: by layer number (non-layer tensors first), then by name.

    (Its per-category counters -- "the i-th attn_v" -- follow this order, not the file's, where
    blk.10 comes right after blk.1.)
    """
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def choose_types(mix: str, tensors, n_gqa: int = 1, has_imatrix: bool = False) -> list[dict]:
    """Per-tensor format for a mix, in llama.cpp's order (:func:`llama_order`) and with its counters.

    ``tensors``: (name, shape) pairs, shapes in torch order ([rows, row length]).
    Returns one dict per tensor: name, shape, category, ``wanted`` (after the mix rules),
    ``qtype`` (after the row-length fallback; 'F32' for tensors that are not quantized),
    ``fallback`` (True when the two differ).
    """
    if mix not in DEFAULT_TYPE:
        raise ValueError(f"unknown mix {mix!r}; known: {list(MIXES)}")
    tensors = sorted(((n, tuple(s)) for n, s in tensors), key=lambda t: llama_order(t[0]))
    names = [n for n, _ in tensors]
    tied = "output.weight" not in names
    n_wv = sum(category(n) == "attn_v" for n in names)
    layers = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    n_layer = max(layers) + 1 if layers else 0
    counters = {"attn_v": 0, "ffn_down": 0, "attn_output": 0}
    default = DEFAULT_TYPE[mix]
    out = []
    for name, shape in tensors:
        cat = category(name)
        if not is_quantizable(name, shape):
            out.append(dict(name=name, shape=shape, category=cat, wanted="F32", qtype="F32", fallback=False))
            continue
        ncols = shape[-1]
        qtype = default
        if cat == "output" or (tied and cat == "token_embd"):
            if ncols % get_format(default).block_size != 0:
                qtype = "Q8_0"
            elif default != "Q8_0":
                qtype = "Q6_K"
        elif cat in RULES:
            n = n_wv if cat == "attn_v" else n_layer
            extra = n_gqa if cat == "attn_v" else has_imatrix
            qtype = RULES[cat](mix, counters[cat], n, extra) or default
            counters[cat] += 1
        final = fallback(qtype, ncols)
        out.append(dict(name=name, shape=shape, category=cat, wanted=qtype, qtype=final, fallback=final != qtype))
    return out


def mix_summary(choices: list[dict]) -> dict:
    """Weights per final type and the mix's average bits per weight over quantized tensors."""
    import numpy as np

    count, bits = {}, 0.0
    for c in choices:
        if c["qtype"] == "F32":
            continue
        n = int(np.prod(c["shape"]))
        count[c["qtype"]] = count.get(c["qtype"], 0) + n
        bpw = 16.0 if c["qtype"] == "F16" else get_format(c["qtype"]).bits_per_weight
        bits += n * bpw
    total = sum(count.values())
    return dict(params=total, bits_per_weight=bits / max(total, 1),
                share={k: v / total for k, v in sorted(count.items())})
