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
