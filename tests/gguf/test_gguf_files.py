""".gguf files: written by the gguf package, read back exactly; broken files give clear errors."""
import os

import numpy as np
import pytest
import torch
import gguf

from qlab import gguf as qg
from qlab.gguf.files import GGUFFile, GGUFFormatError, read_gguf, write_gguf, load_tensors, tensor_index


@pytest.fixture
def small_file(tmp_path, outlier_rows):
    """A file written by the gguf package itself (its own quantizer for Q8_0) plus qlab Q4_K bytes."""
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("qlab.note", "héllo")
    w.add_array("qlab.list", [1, 2, 3])
    w.add_tensor("a.weight", gguf.quants.quantize(outlier_rows, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", qg.quantize(outlier_rows, "Q4_K").data, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("norm.weight", np.arange(512, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def test_read_file_written_by_gguf_package(small_file, outlier_rows):
    f = read_gguf(small_file)
    assert f.arch == "llama" and f.metadata["qlab.note"][0] == "héllo" and f.metadata["qlab.list"][0] == [1, 2, 3]
    a, b = f.tensors["a.weight"], f.tensors["b.weight"]
    assert (a.qtype, a.shape, b.qtype, b.shape) == ("Q8_0", (24, 512), "Q4_K", (24, 512))
    ref = gguf.quants.dequantize(gguf.quants.quantize(outlier_rows, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(a.dequantize().numpy(), ref)
    assert torch.equal(f.tensors["norm.weight"], torch.arange(512, dtype=torch.float32))


def test_write_of_read_is_byte_identical(small_file, tmp_path):
    out = tmp_path / "copy.gguf"
    write_gguf(out, read_gguf(small_file))
    assert out.read_bytes() == small_file.read_bytes()


def test_embedded_model_round_trips_byte_for_byte(tmp_path, embedded_path):
    src = embedded_path
    out = tmp_path / "copy.gguf"
    write_gguf(out, read_gguf(src))
    with open(src, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_truncated_file_is_a_clear_error(small_file, tmp_path):
    data = small_file.read_bytes()
    for cut in (10, 60, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="truncated"):
            read_gguf(bad)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        tensor_index(bad)


def test_nan_scale_is_refused(small_file, tmp_path):
    _, _, offset, _ = tensor_index(small_file)["b.weight"]
    data = bytearray(small_file.read_bytes())
    data[offset + 144 * 3: offset + 144 * 3 + 2] = np.array([np.nan], np.float16).tobytes()   # block 3's d
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="non-finite"):
        load_tensors(bad)
    assert load_tensors(bad, validate=False)["b.weight"].qtype == "Q4_K"


def test_model_requantized_like_llama_quantize_and_loadable(tmp_path, peer_llama, embedded_path):
    """qlab's Q2_K mix of the whole model == llama_model_quantize's, tensor for tensor, byte for byte;
    and llama.cpp loads qlab's file and scores text with it."""
    res = peer_llama.compare_with_llama_quantize(embedded_path, "Q2_K", str(tmp_path))
    assert res["same_order"] and res["same_types"] and res["byte_identical"] == res["n_tensors"] == 272
    ours = res["qlab_path"]
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    got = peer_llama.llamacpp_perplexity(str(ours), text, n_gen=4)
    assert got["n_tokens"] > 10 and np.isfinite(got["nll"]) and got["ppl"] < 1000
