"""The KV-cache study helpers (qlab.study.kv): measured cache bytes against qlab.study.memory's formula, the
grouping comparison, the fit calculator and the seeds' size claims.

References: the formula 2 x layers x KV heads x head_dim x context x bytes (+ scales) worked by hand, the bytes a
real cache holds after a real forward pass, and the decimal arithmetic of the claims.
"""
import pytest
import torch

from embedded import embedded, tiny_llama  # noqa: F401  (session fixture)
from qlab.methods.kv.cache import FP8, GEAR, KIVI, QuantizedKVCache
from qlab.study import kv
from qlab.study.memory import Arch

EXACT = [FP8(), FP8("tensor", k_scale=0.01, v_scale=0.01), KIVI(2, 32, 32), KIVI(4, 32, 128), KIVI(2, 32, 0),
         KIVI(2, 32, 32, keys="token")]


@pytest.mark.parametrize("method", EXACT, ids=str)
def test_measured_bytes_equal_the_formula_on_smollm2_shapes(method):
    """30 layers x 3 KV heads x 64, contexts that end mid-group and mid-chunk: measured == formula, exactly."""
    for context in (1, 31, 100, 517, 2048):
        assert kv.measured_bytes(method, "SmolLM2-135M", context, chunk=128) == kv.formula_bytes(
            method, "SmolLM2-135M", context), context


def test_formula_by_hand():
    """SmolLM2, 2048 tokens: float fp16 2 x 30 x 3 x 64 x 2048 x 2 B = 45 MiB; FP8 per token 1 B + 4 B per 64
    entries; KIVI-2 g32 r32 (fp32 stats): keys 2016 quantized (63 groups of 32), values 2016, 32 fp32 tokens each."""
    heads = 2 * 30 * 3  # (side, layer, KV head)
    assert kv.formula_bytes("fp16", "SmolLM2-135M", 2048) == heads * 64 * 2048 * 2 == 45 * 2**20
    assert kv.formula_bytes(FP8(), "SmolLM2-135M", 2048) == heads * 2048 * (64 + 4)
    per_head = (2016 * 64 // 4 + 63 * 64 * 8) + (2016 * 64 // 4 + 2016 * 2 * 8) + 2 * 32 * 64 * 4
    assert kv.formula_bytes(KIVI(2, 32, 32), "SmolLM2-135M", 2048) == 30 * 3 * per_head
    assert kv.formula_bytes(GEAR(), "SmolLM2-135M", 2048) is None
    with pytest.raises(ValueError, match="FP8 / KIVI / GEAR"):
        kv.formula_bytes("int3", "SmolLM2-135M", 10)
    with pytest.raises(ValueError, match="ints >= 1"):
        kv.measured_bytes(FP8(), "SmolLM2-135M", 0)


def test_a_real_cache_holds_the_formula_bytes():
    """The tiny Llama (2 layers, 2 KV heads x 16) after a real forward pass of 45 tokens in chunks of 16."""
    model = tiny_llama()
    arch = Arch(0, n_layers=2, n_kv_heads=2, head_dim=16)
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(0))
    for method in [FP8(), KIVI(2, 4, 8), KIVI(4, 8, 16, keys="token")]:
        cache = QuantizedKVCache(method, model.config)
        with torch.no_grad():
            for s in range(0, 45, 16):
                model(ids[:, s:s + 16], past_key_values=cache, use_cache=True)
        assert cache.nbytes() == kv.formula_bytes(method, arch, 45) == kv.measured_bytes(method, arch, 45, 16)


def test_memory_curve_and_plot():
    methods = {"fp32": None, "kivi2": KIVI(2, 32, 32), "gear": GEAR(2, 32, 32)}
    df = kv.memory_curve(methods, "SmolLM2-135M", [128, 512])
    at = df.set_index(["method", "context"])
    assert len(df) == 6 and at.loc[("fp32", 512), "measured"] == 2 * 30 * 3 * 64 * 512 * 4
    gear = df[df.method == "gear"]
    assert gear["formula"].isna().all() and (gear["measured"] > df[df.method == "kivi2"]["measured"].values).all()
    assert kv.plot_memory_curve(df).axes[0].get_xscale() == "log"


def test_grouping_error_favours_per_channel_keys_with_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(128, 64, generator=g)
    keys[:, 5] = 20 + torch.randn(128, generator=g)  # a channel with a large offset, as RoPE'd keys have
    err = kv.grouping_error(keys, 2, 32)
    assert err["per channel"] < 0.5 * err["per token"]
    assert kv.channel_outliers(keys) > 10


def test_what_fits_by_hand():
    """Llama-2-7B fp16: 2 GiB of KV per 4096 tokens (0.5 MiB per token); the largest batch at 4096 is where
    weights + KV + activations stop fitting 24 GiB."""
    out = kv.what_fits("Llama-2-7B", 4096, 1, "fp16", 24)
    assert out["kv_gib"] == 2.0 and out["fits"]
    from qlab.study.memory import deployment_bytes

    n = out["max_batch"]
    fits = lambda b: deployment_bytes("Llama-2-7B", None, "fp16", 4096, b)["total"] <= 24 * 2**30  # noqa: E731
    assert fits(n) and not fits(n + 1)
    c = out["max_context"]
    at = lambda t: deployment_bytes("Llama-2-7B", None, "fp16", t, 1)["total"] <= 24 * 2**30  # noqa: E731
    assert at(c) and not at(c + 1)
    assert kv.what_fits("Llama-2-70B", 4096, 1, "fp16", 16)["max_batch"] == 0  # 140 GB of weights alone


def test_size_claims():
    """Llama-2/3-70B (8 KV heads) at 131072 tokens: 2 x 80 x 8 x 128 x 131072 x 2 B = 42.9 GB; Llama-3-8B at 8192:
    2 x 32 x 8 x 128 x 8192 x 2 B = 1.07 GB, not 8."""
    df = kv.size_claims().set_index("model")
    assert df.loc["Llama-2-70B", "formula_GB"] == pytest.approx(42.95, abs=0.01)
    assert df.loc["Llama-3-8B", "formula_GB"] == pytest.approx(1.074, abs=0.001)
    assert not df["holds"].any()


@pytest.mark.model
def test_embedded_cache_bytes_equal_the_formula(embedded):
    """SmolLM2 itself, 300 WikiText tokens in chunks of 128: the real cache's bytes are the formula's."""
    from embedded import windows

    model, _ = embedded
    ids = windows(300, 1)
    for method in [FP8(), KIVI(2, 32, 32)]:
        cache = QuantizedKVCache(method, model.config)
        with torch.no_grad():
            for s in range(0, 300, 128):
                model(ids[:, s:s + 128], past_key_values=cache, use_cache=True)
        assert cache.nbytes() == kv.formula_bytes(method, "SmolLM2-135M", 300)
    k, v = kv.capture_kv(model, ids[:, :128], layer=10)
    assert k.shape == v.shape == (128, 192)


def test_plot_long_context_draws_every_method_but_float():
    import pandas as pd

    df = pd.DataFrame({"method": ["float", "fp8-token", "kivi2-r32", "gear2-Q", "hf-quanto2"], "context": 2048,
                       "bits_quantized": [32, 8.5, 4, 2.5, 3], "kl": [0, 0.002, 0.3, 0.5, 2.6]})
    ax = kv.plot_long_context(df, 2048).axes[0]
    drawn = [c for c in ax.collections if len(c.get_offsets())]
    assert len(drawn) == 4 and ax.get_yscale() == "log"
    assert sorted(t.get_text() for t in ax.texts) == ["Q", "fp8-token", "hf-quanto2", "kivi2-r32"]
