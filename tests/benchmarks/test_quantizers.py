"""The quantizer benchmark runs, and every peer it times produces the same bytes as qlab where formats agree
(plain torch's int8 / int4 g128 / FP8 cast always; llama.cpp's block formats when its peer is built)."""
import torch

from qlab.benchmarks.quantizers import measure


def test_benchmark_rows_agree_with_their_peers():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rows = measure(W, repeats=1, gguf_types=("Q4_0", "Q8_0", "Q4_K"))
    ops = {r["op"] for r in rows}
    assert {"int8 per channel: encode", "int4 g128 asym: encode", "FP8 E4M3 per tensor: encode", "Q4_K: encode"} <= ops
    for r in rows:
        assert r["qlab_ms"] > 0
        if r["same"] is not None:
            assert r["same"], r["op"]
    torch_rows = [r for r in rows if r["peer"] in ("torch", "torch cast") and r["op"].endswith("encode")]
    assert len(torch_rows) == 3 and all(r["same"] for r in torch_rows)
