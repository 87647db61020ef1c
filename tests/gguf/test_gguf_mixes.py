"""Mixes: llama.cpp's per-tensor choices for the embedded model's shapes, and its fallbacks."""
import pytest

from qlab.gguf import mixes
from qlab.gguf.mixes import choose_types, use_more_bits, fallback, mix_summary


def smollm2_tensors(n_layer=30):
    """Names and torch shapes of SmolLM2-135M's GGUF tensors, in its file order (tied embeddings)."""
    out = [("token_embd.weight", (49152, 576))]
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_norm.weight", (576,)), (f"blk.{i}.ffn_down.weight", (576, 1536)),
                (f"blk.{i}.ffn_gate.weight", (1536, 576)), (f"blk.{i}.ffn_up.weight", (1536, 576)),
                (f"blk.{i}.ffn_norm.weight", (576,)), (f"blk.{i}.attn_k.weight", (192, 576)),
                (f"blk.{i}.attn_output.weight", (576, 576)), (f"blk.{i}.attn_q.weight", (576, 576)),
                (f"blk.{i}.attn_v.weight", (192, 576))]
    return out + [("output_norm.weight", (576,))]


def test_use_more_bits_layers_for_30():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_fallback_table():
    assert [fallback(t, 576) for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert fallback("Q4_K", 1536) == "Q4_K"
    assert fallback("Q4_K", 100) == "F16"


def test_q4_k_m_on_smollm2_is_mostly_not_q4_k():
    ch = {c["name"]: c for c in choose_types("Q4_K_M", smollm2_tensors(), n_gqa=3)}
    kq = {n for n, c in ch.items() if c["qtype"].endswith("_K")}
    assert kq == {f"blk.{i}.ffn_down.weight" for i in range(30)}          # only the 1536-wide rows
    assert ch["blk.0.ffn_down.weight"]["qtype"] == "Q6_K"                  # a "more bits" layer
    assert ch["blk.3.ffn_down.weight"]["qtype"] == "Q4_K"
    assert ch["blk.0.attn_v.weight"]["wanted"] == "Q6_K" and ch["blk.0.attn_v.weight"]["qtype"] == "Q8_0"
    assert ch["blk.3.attn_v.weight"]["qtype"] == "Q5_0" and ch["blk.3.attn_v.weight"]["fallback"]
    assert ch["token_embd.weight"]["qtype"] == "Q8_0"                      # tied: output rule, 576 % 256
    assert ch["blk.0.attn_norm.weight"]["qtype"] == "F32"
    s = mix_summary(list(ch.values()))
    assert s["share"]["Q4_K"] == pytest.approx(16 * 576 * 1536 / s["params"])
    assert 6.0 < s["bits_per_weight"] < 6.3                               # "Q4_K_M" is ~6.2 bpw here


@pytest.mark.parametrize("mix,ffn_down,attn_v,attn_output", [
    ("Q2_K", "Q3_K", "Q4_0", "Q4_0"),     # wanted Q3_K for v and output, fall back to Q4_0
    ("Q3_K_L", "Q5_K", "Q5_1", "Q5_1"),
    ("Q6_K", "Q6_K", "Q8_0", "Q8_0"),
    ("Q8_0", "Q8_0", "Q8_0", "Q8_0"),
])
def test_mix_rules_for_middle_layer(mix, ffn_down, attn_v, attn_output):
    ch = {c["name"]: c["qtype"] for c in choose_types(mix, smollm2_tensors(), n_gqa=3)}
    assert (ch["blk.10.ffn_down.weight"], ch["blk.10.attn_v.weight"], ch["blk.10.attn_output.weight"]) == \
        (ffn_down, attn_v, attn_output)


def test_unknown_mix():
    with pytest.raises(ValueError, match="unknown mix"):
        choose_types("Q4_K_XL", smollm2_tensors(2))
    assert set(mixes.FILE_TYPE) == set(mixes.MIXES)
