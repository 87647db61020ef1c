"""The quantizer benchmark runs, and every peer it times produces the same bytes as qlab where formats agree
(plain torch's int8 / int4 g128 / FP8 encoders and decoders and the gguf package's block decoders always;
bitsandbytes' NF4 when the PTQ peer venv is there; llama.cpp's block encoders when its peer is built)."""
import torch

from qlab.benchmarks.quantizers import bitsandbytes_functional, measure


def test_benchmark_rows_agree_with_their_peers():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rows = measure(W, repeats=1, gguf_types=("Q4_0", "Q8_0", "Q4_K"))
    ops = {r["op"] for r in rows}
    assert {"int8 per channel: encode", "int4 g128 asym: encode", "FP8 E4M3 per tensor: encode", "NF4 b64: encode",
            "Q4_K: encode"} <= ops
    for r in rows:
        assert r["qlab_ms"] > 0
        if r["same"] is not None:
            assert r["same"], r["op"]
    torch_rows = [r for r in rows if r["peer"].startswith("torch")]
    assert len(torch_rows) == 6 and all(r["same"] for r in torch_rows)  # 3 formats x encode, decode
    gguf_decoders = [r for r in rows if r["peer"] == "gguf package dequantize"]
    assert len(gguf_decoders) == 3 and all(r["same"] for r in gguf_decoders)  # the gguf package, always there
    nf4 = [r for r in rows if r["op"].startswith("NF4")]
    assert all(r["same"] for r in nf4) if bitsandbytes_functional() else all(r["peer_ms"] is None for r in nf4)


def test_ops_keeps_only_the_rows_named():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    rows = measure(W, repeats=1, gguf_types=("Q4_0", "Q8_0"), ops=["FP8", "Q8_0: encode"])
    assert [r["op"] for r in rows] == ["FP8 E4M3 per tensor: encode", "FP8 E4M3 per tensor: decode", "Q8_0: encode"]
