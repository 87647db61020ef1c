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


# ---- the model cache: complete or rebuilt, one builder at a time, checked on load (issue 16, items 7, 11, 15) ----

def _tiny_pair():
    """A tiny Llama and a word-level tokenizer that save and reload offline, standing in for the GGUF load."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from embedded import tiny_llama

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("quantization maps floats to a grid".split())}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tiny_llama(vocab=256, hidden=64, layers=2), PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """QLAB_CACHE in tmp_path, and the 20-40 s GGUF load replaced by a tiny model (slow enough to overlap)."""
    import time

    monkeypatch.setenv("QLAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def load(path):
        calls.append(path)
        time.sleep(0.5)
        return _tiny_pair()
    monkeypatch.setattr(models.loading, "_load_from_gguf", load)
    return calls


def _cache_listing(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))


def test_cache_is_built_once_then_reused(fake_gguf, tmp_path):
    model, tok = models.load_model()
    assert len(fake_gguf) == 1 and _cache_listing(tmp_path) == [models.EMBEDDED]
    again, tok2 = models.load_model()
    assert len(fake_gguf) == 1  # from the cache
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert tok2("a grid")["input_ids"] == tok("a grid")["input_ids"] == [5, 6]


def test_a_cache_folder_without_config_is_rebuilt_not_renamed_over(fake_gguf, tmp_path):
    """Before: the GGUF loaded, then the rename onto the non-empty folder failed, leaving a .tmp folder,
    and every later load failed the same way."""
    folder = tmp_path / "cache" / models.EMBEDDED
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / "cache" / f"{models.EMBEDDED}.tmp").mkdir()  # left by a build that was killed
    with pytest.warns(UserWarning, match=f"model cache {folder} is incomplete.*rebuilding it"):
        models.load_model()
    assert len(fake_gguf) == 1 and _cache_listing(tmp_path) == [models.EMBEDDED]
    assert (folder / "config.json").exists()
    models.load_model()
    assert len(fake_gguf) == 1


def test_a_failed_build_leaves_nothing_behind(fake_gguf, tmp_path, monkeypatch):
    real_save = models.loading._save_cache

    def disk_full(model, tokenizer, folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(models.loading, "_save_cache", disk_full)
    with pytest.raises(OSError, match="No space left"):
        models.load_model()
    assert _cache_listing(tmp_path) == []  # no 500 MB .tmp folder left
    monkeypatch.setattr(models.loading, "_save_cache", real_save)
    models.load_model()  # and the lock was released
    assert _cache_listing(tmp_path) == [models.EMBEDDED]


def test_two_loads_at_once_build_the_cache_once(fake_gguf, tmp_path):
    """Before: both loaded the GGUF, one died on the rename and left its temporary folder."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: models.load_model(), range(2)))
    assert len(fake_gguf) == 1 and _cache_listing(tmp_path) == [models.EMBEDDED]
    a, b = (r[0].state_dict() for r in results)
    assert all(torch.equal(a[n], b[n]) for n in a)


def _poison(path, tensor):
    """Overwrite the first float32 of ``tensor`` in a safetensors file with NaN bytes."""
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start, _ = json.loads(f.read(n))[tensor]["data_offsets"]
        f.seek(8 + n + start)
        f.write(b"\xff\xff\xc0\x7f")  # float32 NaN


def test_nan_bytes_in_the_cache_are_named(fake_gguf, tmp_path):
    """Before: the model loaded, and evaluation gave perplexity nan and top-1 0.0 without an error."""
    models.load_model()
    folder = tmp_path / "cache" / models.EMBEDDED
    _poison(folder / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match=f"'model.layers.1.mlp.down_proj.weight' holds 1 NaN or inf value.*"
                                         f"delete the folder {folder}"):
        models.load_model()


def test_an_unreadable_cache_says_to_delete_it(fake_gguf, tmp_path):
    models.load_model()
    folder = tmp_path / "cache" / models.EMBEDDED
    (folder / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=f"cached model in {folder} cannot be read.*delete the folder {folder}"):
        models.load_model()


def test_a_nan_weight_in_a_local_checkpoint_is_named(tmp_path):
    model, tok = _tiny_pair()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"{tmp_path / 'm'}.*'model.layers.0.self_attn.q_proj.weight' holds 1 NaN or inf"):
        models.load_model(str(tmp_path / "m"))


def _no_network(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("load_model went to transformers (and possibly the network)")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("name, error, message", [
    # was: huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    ("/nonexistent", FileNotFoundError, "no model folder /nonexistent: it does not exist, and it is not a Hugging Face id"),
    ("./models/mine", FileNotFoundError, "no model folder ./models/mine"),
    # was: 25 s of retries for a network that is not there
    ("smollm2-135m-instruc", ValueError, "unknown model 'smollm2-135m-instruc': did you mean the embedded model "
                                         "'smollm2-135m-instruct'"),
    ("SmolLM2-135M-Instruct", ValueError, "did you mean the embedded model 'smollm2-135m-instruct'"),
    (None, ValueError, "name must be 'smollm2-135m-instruct', a Hugging Face id or a local folder, got None"),
])
def test_bad_model_names_fail_fast_without_the_network(monkeypatch, name, error, message):
    import re
    import time

    _no_network(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(error, match=re.escape(message)):
        models.load_model(name)
    assert time.perf_counter() - t0 < 1


def test_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=f"folder {tmp_path} has no config.json"):
        models.load_model(str(tmp_path))
