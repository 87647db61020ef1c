"""The memory calculator against the articles' arithmetic and closed-form KV-cache sizes."""
import pytest
from transformers import LlamaConfig

from qlab.study import memory


def test_weights_table_reproduces_the_usual_numbers():
    t = memory.weights_table()
    assert t.loc["7B"].tolist() == [28.0, 14.0, 7.0, 3.5, 112.0]  # 7B x 4/2/1/0.5 B, training 16 B
    assert t.loc["70B", "fp16"] == 140.0 and t.loc["70B", "int4"] == 35.0
    assert t.loc["13B", "fp32"] == 52.0


def test_weight_bytes_by_bits_and_errors():
    assert memory.weight_bytes(1e9, 4.125) == 1e9 * 4.125 / 8  # int4 g128 with fp16 scales
    with pytest.raises(ValueError, match="unknown format"):
        memory.weight_bytes(1e9, "int3")


def test_kv_cache_closed_form():
    # Llama-2-7B, 4096 tokens, fp16: 2 x 32 x 32 x 128 x 4096 x 2 B = 2^31 B = 2 GiB
    assert memory.kv_cache_bytes(memory.LLAMA2["7B"], 4096) == 2**31
    # Llama-2-70B (GQA, 8 KV heads), 128K tokens, fp16: 42.9 GB -- not the 80 GB an article claims
    assert memory.kv_cache_bytes(memory.LLAMA2["70B"], 131072) / 1e9 == pytest.approx(42.95, abs=0.01)
    # FP8 cache halves it; batch multiplies it
    assert memory.kv_cache_bytes(memory.LLAMA2["7B"], 4096, batch=4, bytes_per_value=1) == 2**32
    with pytest.raises(ValueError):
        memory.kv_cache_bytes(memory.LLAMA2["7B"], 10, batch=0)


def test_arch_from_config_of_the_embedded_model():
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)
    arch = memory.Arch.from_config(cfg, n_params=134_515_008)
    assert (arch.n_layers, arch.n_kv_heads, arch.head_dim) == (30, 3, 64)
    # 2 x 30 x 3 x 64 x 8192 x 2 B
    assert memory.kv_cache_bytes(arch, 8192) == 188_743_680
    assert memory.training_bytes(arch.n_params) == 16 * 134_515_008


def test_negative_sizes_are_refused():
    from qlab.study.memory import weight_bytes

    with pytest.raises(ValueError, match="bits per weight must be a positive"):
        weight_bytes(7e9, -4)
    with pytest.raises(ValueError, match="non-negative count"):
        weight_bytes(-1, 4)
    with pytest.raises(ValueError, match="non-negative count"):
        weight_bytes(float("nan"), 4)
    assert weight_bytes(7e9, 4) == 3.5e9


# ---------------------------------------------------------------- GEAR, presets, mixes, the articles' figures

import math  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from embedded import tiny_llama  # noqa: E402
from qlab.methods.kv.cache import GEAR, QuantizedKVCache  # noqa: E402
from qlab.study.memory import GiB, KVFormat  # noqa: E402


@pytest.mark.parametrize("method,fmt", [
    (GEAR(2, 8, residual=8, outlier_ratio=0.05, rank=2), KVFormat(2, "gear", 8, 8, outlier_ratio=0.05, rank=2)),
    (GEAR(4, 16, residual=0, outlier_ratio=0.02, rank=0), KVFormat(4, "gear", 16, 0, outlier_ratio=0.02)),
    (GEAR(2, 8, residual=16, use_sparse=False), KVFormat(2, "gear", 8, 16, rank=2)),
], ids=str)
def test_gear_bytes_equal_what_the_cache_holds(method, fmt):
    """One prefill of 37 tokens (batch 2) into qlab's GEAR cache: the formula counts every tensor it keeps
    (codes, fp32 scales and minima, fp16 outliers with int16 positions, fp16 factors, the fp32 float window)."""
    model = tiny_llama()  # 2 layers, 2 KV heads of 16, float32
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    cache = QuantizedKVCache(method, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    arch = memory.Arch.from_config(model.config)
    assert fmt.nbytes(arch, 37, batch=2, float_bytes=4) == cache.nbytes()


def test_gear_bytes_by_hand():
    # Llama-2-7B at 4096 tokens, GEAR-2 as qlab's defaults: G = 32, R = 32 fp16 tokens, 2% outliers, rank 2
    n = (4096 - 32) // 32 * 32  # 4064 tokens leave the window as one block
    k = int(0.02 * n * 128)  # 10,403 outliers per head and side, fp16 value + int32 position (n x 128 > 32768)
    extra = k * (2 + 4) + (n + 128) * 2 * 2  # + A [n, 2] and B [2, 128] in fp16
    codes = n * 128 * 2 // 8
    keys = codes + n // 32 * 128 * 2 * 4  # fp32 scale + minimum per channel and 32 tokens
    values = codes + n * (128 // 32) * 2 * 4  # ... per token and 32 channels
    rest = (4096 - n) * 128 * 2
    assert memory.kv_format("gear2").nbytes(memory.LLAMA2["7B"], 4096) == 32 * 32 * (keys + values + 2 * (extra + rest))
    with pytest.raises(ValueError, match="outlier_ratio"):
        KVFormat(2, "gear", outlier_ratio=1.5)


@pytest.mark.parametrize("name", ["LLaMA-1-33B", "LLaMA-1-65B"])
def test_llama1_presets_count_what_transformers_builds(name):
    a = memory.PRESETS[name]
    cfg = LlamaConfig(hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert a.count_params() == sum(p.numel() for p in model.parameters())
    assert abs(a.count_params() / a.n_params - 1) < 0.01  # within 1% of the nominal size it is quoted at


def test_q4_k_m_mix_of_llama2_7b_by_hand():
    """llama.cpp's Q4_K_M on 32 layers: Q6_K on attn_v and ffn_down of the "more bits" layers (the first and
    last 4, and every third one between: 16 of 32) and on the output; Q4_K everywhere else (144 and 210 bytes
    per 256 weights); norms fp16 here."""
    recipe = memory.gguf_mix_recipe("Llama-2-7B", "Q4_K_M")
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert len(more) == 16 and all(recipe[f"model.layers.{i}.self_attn.v_proj"] == "Q6_K" for i in more)
    q6 = 16 * 4096**2 + 16 * 4096 * 11008 + 32000 * 4096
    q4 = 32 * (3 * 4096**2 + 2 * 4096 * 11008) + 16 * 4096**2 + 16 * 4096 * 11008 + 32000 * 4096
    b = memory.deployment_bytes("Llama-2-7B", recipe, context=0, activations="none")
    assert b["total"] == q4 * 144 / 256 + q6 * 210 / 256 + 65 * 4096 * 2
    assert round(b["total"] / GiB, 2) == 3.80
    assert memory.calculate("Llama-2-7B", "mix:Q4_K_M", context=0) == memory.deployment_bytes(
        "Llama-2-7B", recipe, context=0)


def test_gguf_names():
    assert memory.gguf_name("model.layers.3.self_attn.v_proj") == "blk.3.attn_v.weight"
    assert memory.gguf_name("lm_head") == "output.weight"
    with pytest.raises(ValueError, match="not a Llama linear"):
        memory.gguf_name("model.norm")


def test_seed_figures_by_hand():
    f = memory.seed_figures()
    assert f.loc["s003-kv-llama3-8b-8k", "ours"] == 2 * 32 * 8 * 128 * 8192 * 2 / 1e9
    assert f.loc["s000-70b-fp16", "ours"] == 68_976_648_192 * 2 / 1e9
    assert f.loc["s000-g128-overhead", "ours"] == 100 * 16 / (4 * 128)
    assert f.loc["s003-g32-overhead", "ours"] == 100 * 16 / (4 * 32)
    linear = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert f.loc["s000-g128-scales-7b", "ours"] == linear / 128 * 2 / 1e6
    assert f.loc["s003-7b-training", "ours"] == 16 * 6_738_415_616 / 1e9
    assert (f.ratio == f.ours / f.article).all()


def test_decision_table():
    d = memory.decision_table()
    assert list(d.kl) == sorted(d.kl)
    int4 = d.loc[["AWQ int4 g128", "GPTQ int4 g128", "RTN int4 g128"]]
    assert int4.tokens_per_s.nunique() == 1 and int4.big_gib.nunique() == 1  # the method adds no bytes
    b = memory.deployment_bytes("Llama-2-7B", "int4-g128-asym-minmax", context=4096, activations="none")
    assert d.loc["RTN int4 g128", "tokens_per_s"] == 1008e9 / b["total"]  # RTX 4090: 1008 GB/s
    fp16 = memory.deployment_bytes("Llama-2-7B", None, context=4096, activations="none")
    assert d.loc["RTN int4 g128", "speedup"] == pytest.approx(fp16["total"] / b["total"])
    assert d.loc["QuIP# E8P 2-bit", "big_gib"] < d.loc["RTN int3 g128", "big_gib"]
    with pytest.raises(ValueError, match="unknown device"):
        memory.decode_tokens_per_s("Llama-2-7B", device="B300")


def test_calculate_and_plots_accept_every_menu_choice():
    import matplotlib

    matplotlib.use("Agg")
    for label, weights in memory.WEIGHT_CHOICES.items():
        b = memory.calculate("Llama-2-70B", weights, "kivi2", 8192, 2)
        assert b["total"] > b["kv_cache"] > 0, label
    fig = memory.plot_breakdown(memory.calculate("Llama-2-7B", None, mode="training", optimizer="adam8bit"), 80)
    assert "does NOT fit" in fig.axes[0].get_title()
    assert math.isclose(sum(memory.calculate("Llama-2-7B", None, mode="training")[k] for k in
                            ("weight_codes", "embeddings", "norms", "gradients", "master_weights", "optimizer")),
                        16 * 6_738_415_616)


def test_decision_table_from_a_sweep_table():
    """A sweep's rows (qlab.eval.sweep columns) go in as measured bits per weight on the big model's linears."""
    import pandas as pd

    sweep = pd.DataFrame([dict(label="QuIP# E8P", method="quip", ppl=87.88, kl_mean=1.158, top1=0.498,
                               quantized_bpw=2.0029387297453702),
                          dict(label="RTN int2 g128", method="rtn", ppl=3.46e6, kl_mean=11.71, top1=0.005,
                               quantized_bpw=2.15234375)])
    d = memory.decision_table(memory.measured_from_sweep(sweep))
    linear = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    rest = (2 * 32000 * 4096 + 65 * 4096) * 2  # embeddings, head and norms stay fp16
    assert d.loc["RTN int2 g128", "big_gib"] == (linear * 2.15234375 / 8 + rest) / GiB  # int2 g128 asym: 2 + 18/128
    assert list(d.index) == ["QuIP# E8P", "RTN int2 g128"]
    with pytest.raises(ValueError, match="not a sweep table"):
        memory.measured_from_sweep(sweep.drop(columns="kl_mean"))
