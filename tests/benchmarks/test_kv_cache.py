"""The long-context KV benchmark (qlab.benchmarks.kv_cache) on the tiny Llama, and its transformers peer rows on the
embedded model.

References from outside the benchmark: ``qlab.eval.metrics.perplexity`` (one full forward pass), the float cache
(a float window wider than the context must give its numbers exactly), and the storage counted by hand.
"""
import json

import pytest
import torch

from embedded import embedded, tiny_llama  # noqa: F401  (session fixture)
from qlab.benchmarks import kv_cache


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_tiny_run_scores_resumes_and_counts_bits(model, tmp_path, monkeypatch):
    from qlab.eval.metrics import perplexity

    windows = {64: torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))}
    calibration = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    labels = ["float", "fp8-token", "fp8-tensor", "kivi2-r32", "ktoken2-r32", "gear2-Q+L+S"]
    df = kv_cache.run(model, windows, labels, tmp_path, chunk=16, calibration=calibration, progress=False)
    row = df.set_index("method")
    assert list(row.index) == labels and (row["windows"] == 2).all()
    assert row.loc["float", "ppl"] == pytest.approx(perplexity(model, windows[64], progress=False), rel=1e-5)
    assert row.loc["float", "kl"] == 0 and row.loc["float", "top1"] == 1 and row.loc["float", "bits_held"] == 32
    # GEAR's float window of R = 64 covers the whole 64-token context: nothing is quantized, the float numbers
    assert row.loc["gear2-Q+L+S", "ppl"] == row.loc["float", "ppl"] and abs(row.loc["gear2-Q+L+S", "kl"]) < 1e-6
    for label in ("fp8-token", "kivi2-r32", "ktoken2-r32"):
        assert row.loc[label, "kl"] > 1e-8 and row.loc[label, "ppl"] != row.loc["float", "ppl"], label
    # FP8 per token, head dim 16: 16 one-byte codes + one fp32 scale per token and head = 10 bits per entry
    assert row.loc["fp8-token", "bits_held"] == row.loc["fp8-token", "bits_quantized"] == 10
    # KIVI-2, G = R = 32, after 64 tokens: 32 tokens quantized, 32 in fp32. Keys: 2 bits + fp32 scale and minimum
    # per channel per 32 tokens (2 bits); values: 2 bits + one (scale, minimum) per token of 16 channels (4 bits)
    assert row.loc["kivi2-r32", "bits_quantized"] == 5 and row.loc["kivi2-r32", "bits_held"] == (5 + 32) / 2
    assert abs(row.loc["kivi2-r32", "kl"]) < abs(row.loc["ktoken2-r32", "kl"]) * 10  # same order: both really run

    stored = json.loads((tmp_path / "ctx64" / "kivi2-r32" / "w1.json").read_text())
    assert stored["chunk"] == 16 and stored["n"] == 63 and stored["window"] == 1

    def refuse(*a, **k):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(kv_cache, "score_window", refuse)
    again = kv_cache.run(model, windows, labels, tmp_path, chunk=16, calibration=calibration, progress=False)
    assert again.drop(columns="window_nll").equals(df.drop(columns="window_nll"))
    monkeypatch.undo()
    (tmp_path / "ctx64" / "kivi2-r32" / "w1.json").unlink()  # a killed run: only the missing window is redone
    calls = []
    real = kv_cache.score_window
    monkeypatch.setattr(kv_cache, "score_window", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = kv_cache.run(model, windows, labels, tmp_path, chunk=16, calibration=calibration, progress=False)
    assert len(calls) == 2  # the float reference of window 1 and the missing row
    assert resumed.set_index("method").loc["kivi2-r32", "ppl"] == pytest.approx(row.loc["kivi2-r32", "ppl"], rel=1e-6)



def test_scores_taken_in_chunks_equal_the_whole_window_formulas(model):
    # 100 positions: chunks of metrics.CHUNK = 32 and a short last one give the whole-tensor numbers bit for bit
    import torch.nn.functional as F
    from qlab.methods.kv.cache import chunked_logits

    window = torch.randint(0, 256, (101,), generator=torch.Generator().manual_seed(2))
    ref = kv_cache.score_window(model, window, kv_cache.make_cache("float", model, None), 16, None)
    got = kv_cache.score_window(model, window, kv_cache.make_cache("kivi2-r32", model, None), 16, ref)
    lp = F.log_softmax(chunked_logits(model, window[None], kv_cache.make_cache("float", model, None), 16)[0, :-1], -1)
    lq = F.log_softmax(chunked_logits(model, window[None], kv_cache.make_cache("kivi2-r32", model, None), 16)[0, :-1], -1)
    assert torch.equal(ref["logprobs"], lp) and got["n"] == 100
    assert got["nll_sum"] == float(-lq.gather(-1, window[1:, None]).sum())
    assert got["kl_sum"] == float((lp.exp() * (lp - lq)).sum(-1).sum()) > 0
    assert got["top1_sum"] == int((lq.argmax(-1) == lp.argmax(-1)).sum())

def test_bad_inputs(model, tmp_path):
    w = {64: torch.randint(0, 256, (1, 64))}
    with pytest.raises(ValueError, match="unknown method"):
        kv_cache.run(model, w, ["kivi3"], tmp_path)
    with pytest.raises(ValueError, match="needs calibration ids"):
        kv_cache.run(model, w, ["fp8-tensor"], tmp_path)
    with pytest.raises(ValueError, match=r"token ids \[n, 32\]"):
        kv_cache.run(model, {32: torch.randint(0, 256, (1, 64))}, ["float"], tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 256"):
        kv_cache.run(model, {512: torch.randint(0, 256, (1, 512))}, ["float"], tmp_path)


@pytest.mark.model
def test_transformers_peer_rows_on_the_embedded_model(embedded, tmp_path):
    """transformers' quantized cache (quanto 2/4 bit, per-token keys; fp8 per tensor) on one 256-token window
    through the same chunked protocol: it runs (this builds optimum-quanto's C++ extension the first time,
    ~95 s), its error grows as bits fall, and its bytes are what its layout stores."""
    from embedded import windows

    model, tokenizer = embedded
    w = {256: windows(256, 1)}
    df = kv_cache.run(model, w, ["float", "hf-quanto4", "hf-quanto2", "hf-fp8", "kivi2-r128"], tmp_path, chunk=128,
                      progress=False).set_index("method")
    assert 0 < df.loc["hf-fp8", "kl"] < df.loc["hf-quanto4", "kl"] < df.loc["hf-quanto2", "kl"]
    assert df.loc["hf-quanto2", "ppl"] > df.loc["float", "ppl"]
    # fp8 per tensor: one byte per entry + one fp32 scale per layer and side
    assert df.loc["hf-fp8", "bits_quantized"] == pytest.approx(8 * (1 + 4 / (256 * 3 * 64)), rel=1e-9)
    # quanto int2, groups of 64 channels per token: 2 bits + a scale and a shift per 64 entries
    assert 2 < df.loc["hf-quanto2", "bits_quantized"] < 4
