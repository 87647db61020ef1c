"""The quantized KV cache on transformers' tiny Llama: what attention reads back, bytes held, generate, perplexity.

References from outside the cache: the core quantizer ``qlab.quantize`` with KIVI's spec (itself checked
bit for bit against the kernel in tests/kernels/test_kivi.py), a by-hand FP8 cast, transformers' own
``DynamicCache`` with its keys swapped for the de-quantized ones, and ``qlab.eval.metrics.perplexity``.
"""
import pytest
import torch
from transformers import DynamicCache

from embedded import embedded, tiny_llama  # noqa: F401  (session fixture)
from qlab import dequantize, quantize
from qlab.methods.kv.cache import (FP8, KIVI, QuantizedKVCache, QuantizedKVLayer, cache_perplexity, calibrate_fp8,
                                  chunked_logits)
from qlab.methods.kv.kivi import kivi_spec
from kv_steps import one_decode_step




@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def n_quantized(method, t: int, side: str) -> int:
    """How many of t stored tokens are quantized (the rest are the float residual), by the docstring's rule."""
    if isinstance(method, FP8):
        return t
    over = max(t - method.residual, 0)
    if side == "k" and method.keys == "channel":
        return over - over % method.group_size  # whole groups of G tokens
    return over


def roundtrip(method, x: torch.Tensor, side: str, layer_idx: int = 0) -> torch.Tensor:
    """What the cache should give back for stored tokens x [B, H, T, D] of one layer, computed without the cache."""
    if isinstance(method, FP8):
        if method.granularity == "token":
            scale = x.abs().amax(-1, keepdim=True) / 448  # E4M3's largest normal
        else:
            scale = method.k_scale if side == "k" else method.v_scale
            scale = torch.tensor(scale[layer_idx] if isinstance(scale, tuple) else scale)
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale  # saturating, like vLLM
    n = n_quantized(method, x.shape[-2], side)
    if n == 0:
        return x.clone()
    which = "key" if side == "k" and method.keys == "channel" else "value"
    old = dequantize(quantize(x[..., :n, :].contiguous(), kivi_spec(which, method.bits, method.group_size)))
    return torch.cat([old, x[..., n:, :]], dim=-2)


# the keys and values of the tiny model reach ~0.5: v_scale 0.001 saturates some (0.5 / 0.001 > 448)
def bytes_by_hand(method, t: int, kv_heads: int, head_dim: int) -> int:
    """One layer's bytes for t stored tokens (fp32 residual, scales and minima), from the docstring's rules."""
    if isinstance(method, FP8):
        scales = t * kv_heads * 4 if method.granularity == "token" else 4  # per token and head, or one
        return 2 * (t * kv_heads * head_dim + scales)
    total = 0
    for side in ("k", "v"):
        n = n_quantized(method, t, side)
        codes = n * kv_heads * head_dim * method.bits // 8
        if side == "k" and method.keys == "channel":
            stats = -(-n // method.group_size) * head_dim * kv_heads * 2 * 4  # scale + min per channel per G tokens
        else:
            stats = n * kv_heads * -(-head_dim // method.group_size) * 2 * 4  # per token per G channels
        total += codes + stats + (t - n) * kv_heads * head_dim * 4
    return total


METHODS = [FP8(), FP8("tensor", k_scale=0.01, v_scale=0.001),
           FP8("tensor", k_scale=(0.01, 0.02), v_scale=(0.004, 0.002)),  # one per layer
           KIVI(2, 4, 0), KIVI(2, 4, 8), KIVI(4, 4, 8),
           KIVI(2, 4, 8, keys="token")]


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_stored_tokens_read_back_as_the_reference_quantizer(method):
    """Tokens fed one at a time and in chunks (crossing group and window edges) read back as the reference."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 29, 16, generator=g) * 2
    k[..., 3] *= 20  # an outlier channel
    v = torch.randn(2, 3, 29, 16, generator=g)
    layer = QuantizedKVLayer(method, kv_heads=3, head_dim=16)
    for a, b in [(0, 1), (1, 2), (2, 7), (7, 8), (8, 13), (13, 29)]:
        layer.update(k[..., a:b, :], v[..., a:b, :])
    q = torch.randn(2, 3, 1, 16, generator=g)
    got_k, got_v = layer.update(q, q)  # the past, de-quantized, then this call's exact token
    assert torch.equal(got_k[..., -1:, :], q) and torch.equal(got_v[..., -1:, :], q)
    torch.testing.assert_close(got_k[..., :-1, :], roundtrip(method, k, "k"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_v[..., :-1, :], roundtrip(method, v, "v"), rtol=1e-6, atol=1e-6)
    assert layer.get_seq_length() == 30


def test_keys_leave_the_window_a_group_at_a_time():
    """G = 4, R = 8: of T stored keys, 4 * floor((T - 8) / 4) are quantized; of the values, T - 8."""
    layer = QuantizedKVLayer(KIVI(2, 4, 8), kv_heads=1, head_dim=8)
    seen = []
    for _ in range(17):
        layer.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        qk, qv = layer.store.quantized["k"], layer.store.quantized["v"]
        seen.append((qk.shape[-2] if qk else 0, qv.shape[-2] if qv else 0))
    assert [s[0] for s in seen] == [0] * 11 + [4] * 4 + [8] * 2  # T = 12 -> 4 keys, T = 16 -> 8 keys
    assert [s[1] for s in seen] == [0] * 8 + list(range(1, 10))


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_attention_sees_the_dequantized_past(model, method):
    """One decode step through the cache = the same step through a float DynamicCache whose keys and values
    were replaced by their round trip; and it differs from the float cache (the error is really there)."""
    got, want, float_logits = one_decode_step(model, method, lambda x, side, i: roundtrip(method, x, side, i), seed=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - float_logits).abs().max() > 20 * (got - want).abs().max().clamp(min=1e-7)


def test_a_window_wider_than_the_context_is_the_float_cache_exactly(model):
    """KIVI with R larger than the context quantizes nothing: logits and greedy output equal DynamicCache's."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    method = KIVI(2, 4, residual=128)
    got = chunked_logits(model, ids, QuantizedKVCache(method, model.config), chunk_size=7)
    want = chunked_logits(model, ids, DynamicCache(), chunk_size=7)
    assert torch.equal(got, want)
    cache = QuantizedKVCache(method, model.config)
    out = model.generate(ids[:1, :10], past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1, :10], max_new_tokens=12, do_sample=False))
    # all held in float: 2 sides x 2 layers x 2 kv heads x 21 tokens x 16 dims x 4 bytes
    assert cache.nbytes() == 2 * 2 * 2 * 21 * 16 * 4


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_generate_runs_with_each_method(model, method):
    """``generate`` with the cache: max_new_tokens come out; FP8 and 4-bit KIVI agree with the float greedy run."""
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    float_out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    cache = QuantizedKVCache(method, model.config)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=False)
    assert out.shape == (1, 28) and cache.get_seq_length() == 27
    if isinstance(method, FP8) or method.bits == 4:
        assert torch.equal(out[:, :20], float_out[:, :20])


def test_kernel_backend_reads_back_what_torch_does(model):
    """The cache routed through the KIVI Triton kernel (interpreted on a CPU) gives the torch reference's logits."""
    pytest.importorskip("triton")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    got = chunked_logits(model, ids, QuantizedKVCache(KIVI(2, 4, 8, backend="interpret"), model.config), 5)
    want = chunked_logits(model, ids, QuantizedKVCache(KIVI(2, 4, 8, backend="torch"), model.config), 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [FP8(backend="interpret"), FP8("tensor", k_scale=0.002, v_scale=0.001,
                                                                  backend="interpret")], ids=str)
def test_fp8_kernel_backend_reads_back_what_torch_does(model, method):
    """The FP8 cache through the FP8 Triton kernels (quantize and decode, interpreted on a CPU): the same codes,
    scales and logits as the torch reference, bit for bit."""
    pytest.importorskip("triton")
    from dataclasses import replace

    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(8))
    kernel, ref = (QuantizedKVCache(m, model.config) for m in (method, replace(method, backend="torch")))
    got, want = chunked_logits(model, ids, kernel, 4), chunked_logits(model, ids, ref, 4)
    assert torch.equal(got, want)
    for a, b in zip(kernel.layers, ref.layers):
        assert torch.equal(a.store.codes["k"].view(torch.uint8), b.store.codes["k"].view(torch.uint8))
        assert torch.equal(a.store.scales["v"], b.store.scales["v"])


def test_bytes_held_counted_by_hand():
    """SmolLM2's layout (3 KV heads x 64), 517 tokens, KIVI-2, G = 32, R = 0: 512 keys quantized + 5 in float."""
    layer = QuantizedKVLayer(KIVI(2, 32, 0), kv_heads=3, head_dim=64)
    layer.update(torch.randn(1, 3, 517, 64), torch.randn(1, 3, 517, 64))
    key_codes = 512 * 3 * 64 * 2 // 8  # 2-bit codes
    key_stats = (512 // 32) * 64 * 3 * 2 * 4  # an fp32 scale and minimum per channel per 32 tokens
    key_residual = 5 * 3 * 64 * 4  # fp32
    value_codes = 517 * 3 * 64 * 2 // 8
    value_stats = 517 * 3 * (64 // 32) * 2 * 4  # per token per 32 channels
    quantized = key_codes + key_stats + value_codes + value_stats
    assert layer.nbytes() == quantized + key_residual
    assert layer.nbytes() <= 1.2 * quantized  # no hidden full-precision copy
    assert layer.nbytes() == bytes_by_hand(KIVI(2, 32, 0), 517, 3, 64)

    fp8 = QuantizedKVLayer(FP8(), kv_heads=3, head_dim=64)
    fp8.update(torch.randn(1, 3, 517, 64), torch.randn(1, 3, 517, 64))
    assert fp8.nbytes() == 2 * (517 * 3 * 64 * 1 + 517 * 3 * 4)  # E4M3 codes + an fp32 scale per token and head


def test_model_cache_bytes_add_up(model):
    cache = QuantizedKVCache(FP8(), model.config)
    model(torch.randint(0, 256, (1, 30)), past_key_values=cache, use_cache=True)
    assert cache.nbytes() == 2 * 2 * (30 * 2 * 16 + 30 * 2 * 4)  # layers x sides x (codes + scales)
    for method in METHODS:  # after prefill 30, then 1 + 1 + 5 tokens
        cache = QuantizedKVCache(method, model.config)
        for n in (30, 1, 1, 5):
            model(torch.randint(0, 256, (1, n)), past_key_values=cache, use_cache=True)
        assert cache.nbytes() == 2 * bytes_by_hand(method, 37, 2, 16), method
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(7))
    first = chunked_logits(model, ids, cache, 4)  # continues the 37 tokens above
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    torch.testing.assert_close(chunked_logits(model, ids, cache, 4), chunked_logits(
        model, ids, QuantizedKVCache(cache.method, model.config), 4), rtol=0, atol=0)
    assert not torch.equal(first, chunked_logits(model, ids, QuantizedKVCache(cache.method, model.config), 4))


def test_calibrated_fp8_scales(model):
    """calibrate_fp8: per layer absmax / 448 of the float cache's keys and values on the calibration ids, so
    those keys and values fit E4M3 without saturating (their largest entry lands exactly on +-448)."""
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(6))
    method = calibrate_fp8(model, ids)
    exact = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=exact, use_cache=True)
    assert method.k_scale == tuple(float(layer.keys.abs().max()) / 448 for layer in exact.layers)
    assert method.v_scale == tuple(float(layer.values.abs().max()) / 448 for layer in exact.layers)
    cache = QuantizedKVCache(method, model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        codes = layer.store.codes["k"].float()
        assert codes.abs().max() == 448  # the calibration absmax maps onto the top of the grid
        keys = exact.layers[i].keys
        torch.testing.assert_close(codes * method.k_scale[i], keys, rtol=0.07, atol=0)  # 3 mantissa bits: <= 1/16
    with pytest.raises(ValueError, match="per-layer scales for a model of 2 layers"):
        QuantizedKVCache(FP8("tensor", k_scale=(1.0,) * 3, v_scale=1.0), model.config)


def test_perplexity_through_the_cache(model):
    """Through a float cache, any chunking gives the full-forward perplexity of qlab.eval; through KIVI-2 the
    error propagates when the window is prefilled in chunks, but not when it is one chunk (nothing is read back)."""
    from qlab.eval.metrics import perplexity

    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(5))
    full = perplexity(model, windows, progress=False)
    for chunk in (1, 16, 48):
        assert cache_perplexity(model, windows, None, chunk)["ppl"] == pytest.approx(full, rel=1e-5)
        assert cache_perplexity(model, windows, KIVI(2, 4, 64), chunk)["ppl"] == pytest.approx(full, rel=1e-5)
    assert cache_perplexity(model, windows, KIVI(2, 4, 0), 48)["ppl"] == pytest.approx(full, rel=1e-5)
    quantized = cache_perplexity(model, windows, KIVI(2, 4, 0), 8)
    assert quantized["nll"].shape == (2, 47)
    assert abs(quantized["ppl"] - full) > 1e-4 * full


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(ValueError, match="2- or 4-bit"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        KIVI(group_size=32, residual=48)
    with pytest.raises(ValueError, match="power of two"):
        KIVI(group_size=24, residual=48)
    with pytest.raises(ValueError, match="k_scale"):
        FP8("tensor")
    with pytest.raises(ValueError, match="only with granularity='tensor'"):
        FP8(k_scale=1.0)
    with pytest.raises(ValueError, match="a config"):
        QuantizedKVCache("kivi", model.config)

    layer = QuantizedKVLayer(KIVI(2, 4, 0), kv_heads=2, head_dim=16, max_length=32)
    bad = torch.randn(1, 2, 4, 16)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.update(bad, torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.update(torch.randn(1, 2, 4, 16), torch.full((1, 2, 4, 16), float("inf")))
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0  # nothing was stored
    with pytest.raises(ValueError, match="exceeds the model's maximum of 32"):
        layer.update(torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16))

    other = tiny_llama(hidden=96)  # 4 heads of 24, 2 KV heads: another head dim
    cache = QuantizedKVCache(FP8(), model.config)
    with pytest.raises(ValueError, match="do not fit this cache"):
        other(torch.randint(0, 256, (1, 5)), past_key_values=cache, use_cache=True)


# --- the embedded SmolLM2-135M (30 layers, 3 KV heads x 64) ---------------------------------------------------

EMBEDDED_METHODS = [FP8(), KIVI(4, 32, 32), KIVI(2, 32, 32, keys="token")]  # + FP8 per tensor, calibrated


@pytest.mark.model
def test_embedded_generate_and_bytes(embedded):
    """72 prompt tokens + 8 greedy tokens with each cache: the bytes held are the hand count's,
    FP8 and KIVI-4 follow the float cache's first tokens, and one decode step equals the by-hand attention."""
    from embedded import windows

    model, _ = embedded
    prompt = windows(128, 1)[:, :72]
    float_out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    layers, kv_heads, head_dim, t = 30, 3, 64, 79  # the last generated token is never fed back
    for method in EMBEDDED_METHODS + [calibrate_fp8(model, windows(128, 1)[:, 72:])]:
        cache = QuantizedKVCache(method, model.config)
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
        assert out.shape == (1, 80) and cache.get_seq_length() == t
        assert cache.nbytes() == layers * bytes_by_hand(method, t, kv_heads, head_dim), method
        if method in (FP8(), KIVI(4, 32, 32)):
            assert torch.equal(out[:, :77], float_out[:, :77]), method  # the first 5 new tokens

    method = KIVI(2, 32, 0)
    nxt = float_out[:, 72:73]
    with torch.no_grad():
        cache = QuantizedKVCache(method, model.config)
        model(prompt, past_key_values=cache, use_cache=True)
        got = model(nxt, past_key_values=cache, use_cache=True).logits
        by_hand = DynamicCache()
        model(prompt, past_key_values=by_hand, use_cache=True)
        for i, layer in enumerate(by_hand.layers):
            layer.keys, layer.values = roundtrip(method, layer.keys, "k", i), roundtrip(method, layer.values, "v", i)
        want = model(nxt, past_key_values=by_hand, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.model
def test_embedded_perplexity_through_the_cache(embedded):
    """One 128-token window prefilled in chunks of 32: the float cache gives qlab.eval's perplexity; FP8 per token
    moves it little; KIVI-2 without a float window raises it (the cache error propagates)."""
    from embedded import windows
    from qlab.eval.metrics import perplexity

    model, _ = embedded
    w = windows(128, 1)
    full = perplexity(model, w, progress=False)
    assert cache_perplexity(model, w, None, 32)["ppl"] == pytest.approx(full, rel=1e-4)
    fp8 = cache_perplexity(model, w, FP8(), 32)["ppl"]
    kivi2 = cache_perplexity(model, w, KIVI(2, 32, 0), 32)["ppl"]
    assert abs(fp8 / full - 1) < 0.02
    assert kivi2 > full * 1.01 and abs(kivi2 - full) > abs(fp8 - full)
