"""Loading the embedded SmolLM2-135M GGUF offline, checked against the file itself (gguf-py)."""
import gguf
import numpy as np
import pytest
import torch

from embedded import embedded  # noqa: F401  (session fixture)
from qlab import models


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(models.embedded_gguf_path())


def _meta(reader, key):
    return reader.fields[key].contents()


@pytest.mark.model
def test_summary_matches_gguf_metadata(embedded, reader):
    model, _ = embedded
    s = models.model_summary(model)
    assert s["n_layers"] == _meta(reader, "llama.block_count") == 30
    assert s["hidden_size"] == _meta(reader, "llama.embedding_length") == 576
    assert s["intermediate_size"] == _meta(reader, "llama.feed_forward_length")
    assert s["n_heads"] == _meta(reader, "llama.attention.head_count") == 9
    assert s["n_kv_heads"] == _meta(reader, "llama.attention.head_count_kv") == 3
    assert s["vocab_size"] == _meta(reader, "llama.vocab_size") == 49152
    # no output.weight tensor in the file: lm_head is tied to the token embedding
    assert s["tied_embeddings"] and "output.weight" not in {t.name for t in reader.tensors}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # every tensor of the file becomes exactly one parameter
    assert s["n_params"] == sum(int(t.n_elements) for t in reader.tensors) == 134_515_008
    assert s["n_linears"] == 210
    per_layer = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536  # q, o + k, v + gate, up, down
    assert s["n_linear_params"] == 30 * per_layer


@pytest.mark.model
def test_weights_equal_gguf_dequantization(embedded, reader):
    """The float weights are exactly gguf-py's dequantization of the Q4_1 / Q8_0 tensors."""
    model, _ = embedded
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, param in [("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
                             ("blk.29.attn_v.weight", model.model.layers[29].self_attn.v_proj.weight),
                             ("token_embd.weight", model.model.embed_tokens.weight)]:
        t = tensors[gguf_name]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(param.shape)
        assert np.array_equal(ref, param.detach().numpy()), gguf_name


@pytest.mark.model
def test_cache_reload_is_identical(embedded):
    """The second load comes from the safetensors cache and gives the same tensors."""
    model, tokenizer = embedded
    assert (models.cache_dir() / models.EMBEDDED / "model.safetensors").exists()
    again, tok2 = models.load_model()
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    text = "Quantization maps floats to a grid."
    assert tokenizer(text)["input_ids"] == tok2(text)["input_ids"]


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.loading, "EMBEDDED_PACKAGE", "no_such_package_qlab")
    with pytest.raises(ValueError, match="not installed"):
        models.embedded_gguf_path()


def test_summary_of_a_small_config():
    from embedded import tiny_llama

    s = models.model_summary(tiny_llama(vocab=256, hidden=64, layers=2))
    assert (s["n_layers"], s["hidden_size"], s["n_heads"], s["n_kv_heads"], s["head_dim"]) == (2, 64, 4, 2, 16)
    # per layer: q,o 64x64; k,v 64x32; gate,up,down 64x128
    assert s["n_linear_params"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert s["n_embedding_params"] == 256 * 64 and s["tied_embeddings"]
