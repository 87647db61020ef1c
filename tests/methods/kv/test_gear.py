"""GEAR in the quantized KV cache: its three parts, the ablation, bytes held, generate.

References from outside the code under test: torch.linalg.svd (the best rank-r error, Eckart-Young), a
by-hand top-k on a small tensor, the core quantizer ``qlab.quantize`` with KIVI's spec (not the kernel the
cache runs), the KIVI store of tests/methods/kv/test_cache.py, and transformers' float ``DynamicCache``
with its keys and values swapped for GEAR's read-back.
"""
import pytest
import torch

from embedded import embedded, tiny_llama  # noqa: F401  (session fixture)
from qlab import dequantize, quantize
from qlab.methods.kv.cache import GEAR, KIVI, QuantizedKVCache, QuantizedKVLayer, cache_perplexity
from qlab.methods.kv.gear import gear_compress, outliers, power_iteration
from qlab.methods.kv.kivi import kivi_spec
from kv_steps import one_decode_step




@pytest.fixture(scope="module")
def model():
    return tiny_llama()


ABLATION = {"Q": (False, False), "Q+L": (False, True), "Q+S": (True, False), "Q+L+S": (True, True)}


def gear(bits=2, group_size=4, residual=8, parts="Q+L+S", **kw) -> GEAR:
    use_sparse, use_lowrank = ABLATION[parts]
    return GEAR(bits, group_size, residual, use_sparse=use_sparse, use_lowrank=use_lowrank, **kw)


def planted(which: str, seed: int = 0) -> torch.Tensor:
    """Keys or values [1, 2, 64, 32]: a rank-2 signal, small noise, and 1% outliers 10x the signal's size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 64, 2, generator=g) @ torch.randn(1, 2, 2, 32, generator=g)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    if which == "key":
        x[..., 5] += 3.0  # a key outlier channel with an offset, as keys have
    spots = torch.randperm(x.numel(), generator=g)[: x.numel() // 100]
    x.view(-1)[spots] = 30.0 * torch.sign(torch.randn(len(spots), generator=g))
    return x


# --- the parts, each against an outside reference --------------------------------------------------------------

def test_power_iteration_reaches_the_svd_optimum():
    """Enough iterations reach the top-r singular subspace: the error is within 1% of the SVD's optimum
    (sum of the discarded squared singular values); a rank-2 matrix is recovered exactly after one iteration."""
    R = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(0))
    A, B = power_iteration(R, rank=2, iters=30)
    s = torch.linalg.svdvals(R)
    optimum = (s[:, 2:] ** 2).sum(-1)
    error = ((R - A @ B) ** 2).sum((-2, -1))
    assert torch.all(error <= 1.01 * optimum) and torch.all(error >= optimum * (1 - 1e-5))
    torch.testing.assert_close(A.transpose(-1, -2) @ A, torch.eye(2).expand(3, 2, 2), rtol=0, atol=1e-5)

    one = power_iteration(R, rank=2, iters=1)
    assert torch.all(((R - one[0] @ one[1]) ** 2).sum((-2, -1)) <= 1.5 * optimum)  # a few iterations suffice

    g = torch.Generator().manual_seed(1)
    low = torch.randn(3, 40, 2, generator=g) @ torch.randn(3, 2, 16, generator=g)
    A, B = power_iteration(low, rank=2, iters=1)
    torch.testing.assert_close(A @ B, low, rtol=0, atol=1e-4)
    assert power_iteration(low[:, :1], rank=4)[0].shape == (3, 1, 1)  # rank capped at min(n, D)


def test_outliers_keep_exactly_the_top_magnitudes():
    """x = [[0.5, -4, 1], [3, -0.25, 2]], ratio 1/3 -> k = 2: -4 (position 1) and 3 (position 3)."""
    x = torch.tensor([[0.5, -4.0, 1.0], [3.0, -0.25, 2.0]])
    values, index = outliers(x, 1 / 3)
    assert index.tolist() == [1, 3] and values.tolist() == [-4.0, 3.0]
    assert values.dtype == torch.float16 and index.dtype == torch.int16
    assert outliers(x, 0.1)[0].numel() == 0  # floor(0.6) = 0 entries

    big = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(2))
    values, index = outliers(big, 0.02)
    assert index.shape == (2, 3, 40)  # floor(0.02 * 32 * 64) per head
    flat = big.reshape(2, 3, -1)
    kth = flat.abs().sort(-1, descending=True).values[..., 39:41]  # the 40th and 41st magnitudes
    kept = flat.gather(-1, index.long())
    assert torch.all(kept.abs().amin(-1) == kth[..., 0]) and torch.all(kth[..., 0] > kth[..., 1])
    assert torch.equal(values, kept.half())
    assert outliers(torch.randn(1, 1024, 64), 0.02)[1].dtype == torch.int32  # 65536 positions need int32

    with pytest.raises(ValueError, match="does not fit fp16"):
        outliers(torch.tensor([[1e6, 1.0]]), 0.5)


@pytest.mark.parametrize("which", ["key", "value"])
def test_block_reads_back_as_its_parts(which):
    """X_hat = S + dequant(Q(X - S)) + A @ B, with Q from the core quantizer and S, A, B as stored; L is the
    projection of the error R = X - S - Q onto A's columns (to fp16), and S at its positions is the top |X|."""
    x = planted(which)
    block = gear_compress(x, which, bits=2, group_size=8, outlier_ratio=0.02, rank=2, power_iters=3)
    S = torch.zeros(1, 2, 64 * 32).scatter(-1, block.s_index.long(), block.s_values.float()).reshape(x.shape)
    assert torch.equal(block.s_values.float(), x.reshape(1, 2, -1).gather(-1, block.s_index.long()).half().float())
    Q = dequantize(quantize((x - S).contiguous(), kivi_spec(which, 2, 8)))
    L = block.a.float() @ block.b.float()
    torch.testing.assert_close(block.dequantize(), S + Q + L, rtol=1e-6, atol=1e-6)
    R = x - S - Q
    A = block.a.float()
    torch.testing.assert_close(L, A @ A.transpose(-1, -2) @ R, rtol=0, atol=2e-2)  # fp16 factors
    assert block.s_values.shape == (1, 2, 40) and block.a.shape == (1, 2, 64, 2) and block.b.shape == (1, 2, 2, 32)


@pytest.mark.parametrize("which", ["key", "value"])
def test_ablation_order_on_planted_outliers_and_low_rank_error(which):
    """error(Q+L+S) <= error(Q+S), error(Q+L) <= error(Q), error(Q+S) < error(Q), in Frobenius norm."""
    x = planted(which, seed=3)
    error = {}
    for parts, (use_sparse, use_lowrank) in ABLATION.items():
        block = gear_compress(x, which, 2, 8, 0.02 if use_sparse else 0.0, 2 if use_lowrank else 0, power_iters=3)
        error[parts] = float((x - block.dequantize()).norm())
    assert error["Q+L+S"] <= error["Q+S"] and error["Q+L"] <= error["Q"] and error["Q+S"] < error["Q"], error
    assert error["Q+S"] < 0.5 * error["Q"], error  # 1% outliers 10x the signal stretch every 2-bit group they touch


# --- in the cache --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("off", ["ratio and rank 0", "flags off"])
def test_plain_gear_is_the_kivi_store_bit_for_bit(off):
    """With no S and no L, GEAR's read-back equals KIVI's bit for bit wherever both hold a token quantized or
    both in float: keys always (both flush whole blocks of G); values differ only in tokens KIVI has quantized
    (one at a time) while GEAR still holds them in float, waiting for a whole block."""
    method = GEAR(2, 4, 8, outlier_ratio=0.0, rank=0) if off == "ratio and rank 0" else gear(parts="Q")
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 3, 31, 16, generator=g) * 2
    k[..., 3] *= 20
    v = torch.randn(2, 3, 31, 16, generator=g)
    ours, kivi = QuantizedKVLayer(method, 3, 16), QuantizedKVLayer(KIVI(2, 4, 8), 3, 16)
    seen = 0
    for a, b in [(0, 1), (1, 2), (2, 7), (7, 8), (8, 13), (13, 16), (16, 17), (17, 29), (29, 30), (30, 31)]:
        n = sum(block.q.shape[-2] for block in ours.store.blocks["v"])  # GEAR's quantized values of the a stored
        assert n == max(a - 8, 0) - max(a - 8, 0) % 4  # whole blocks of G = 4 past the window of R = 8
        got_k, got_v = ours.update(k[..., a:b, :], v[..., a:b, :])  # the a stored tokens read back, then a:b exact
        want_k, want_v = kivi.update(k[..., a:b, :], v[..., a:b, :])
        assert torch.equal(got_k, want_k)
        assert torch.equal(got_v[..., :n, :], want_v[..., :n, :])
        assert torch.equal(got_v[..., n:, :], v[..., n:b, :])  # the rest in float
        if (a - 8) % 4 == 0:
            assert torch.equal(got_v, want_v)
            seen += 1
    assert seen >= 3


def roundtrip(method: GEAR, x: torch.Tensor, which: str) -> torch.Tensor:
    """What the cache should give back after a one-shot prefill of x [B, H, T, D]: the first whole blocks of G
    beyond the window as one GEAR block, the rest in float."""
    over = max(x.shape[-2] - method.residual, 0)
    n = over - over % method.group_size
    if n == 0:
        return x.clone()
    block = gear_compress(x[..., :n, :], which, method.bits, method.group_size,
                          method.outlier_ratio if method.use_sparse else 0.0, method.rank if method.use_lowrank else 0,
                          method.power_iters, method.seed)
    return torch.cat([block.dequantize(), x[..., n:, :]], dim=-2)


@pytest.mark.parametrize("parts", list(ABLATION))
def test_attention_sees_the_gear_past(model, parts):
    """One decode step through the cache = the same step through a float DynamicCache holding GEAR's read-back
    of the prompt; and it differs from the float cache (the error is really there)."""
    method = gear(2, 4, 4, parts)
    side = {"k": "key", "v": "value"}
    got, want, float_logits = one_decode_step(model, method, lambda x, s, i: roundtrip(method, x, side[s]), seed=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - float_logits).abs().max() > 20 * (got - want).abs().max().clamp(min=1e-7)


def bytes_by_hand(method: GEAR, blocks: list, t: int, kv_heads: int, head_dim: int) -> int:
    """One layer's bytes: for each side, each block of n tokens holds 2-bit codes, fp32 scale + min per group,
    k = floor(ratio n D) fp16 outliers with int16 positions, fp16 A [n, r] and B [r, D]; then fp32 float tokens."""
    total = 0
    for which in ("key", "value"):
        for n in blocks:
            codes = n * kv_heads * head_dim * method.bits // 8
            groups = (n // method.group_size) * head_dim if which == "key" else n * (head_dim // method.group_size)
            stats = groups * kv_heads * 2 * (2 if method.scale_dtype == "fp16" else 4)
            k = int(method.outlier_ratio * n * head_dim) if method.use_sparse else 0
            sparse = k * kv_heads * (2 + 2)
            r = method.rank if method.use_lowrank else 0
            lowrank = (n * r + r * head_dim) * kv_heads * 2
            total += codes + stats + sparse + lowrank
        total += (t - sum(blocks)) * kv_heads * head_dim * 4
    return total


def test_bytes_held_counted_by_hand():
    """SmolLM2's layout (3 KV heads x 64), G = 32, R = 32: a 100-token prefill flushes one block of 64 tokens
    (36 stay in float); 28 more, one at a time, flush one block of 32 (32 stay in float)."""
    method = GEAR(2, 32, 32, rank=2, outlier_ratio=0.02)
    layer = QuantizedKVLayer(method, kv_heads=3, head_dim=64)
    layer.update(torch.randn(1, 3, 100, 64), torch.randn(1, 3, 100, 64))
    assert [b.q.shape[-2] for b in layer.store.blocks["k"]] == [64]
    # keys: 64*3*64*2/8 codes + 2*64*3 (scale, min) fp32 + 81*3 outliers (fp16 + int16) + (64*2 + 2*64)*3 fp16
    key_block = 64 * 3 * 16 + 2 * 64 * 3 * 8 + 81 * 3 * 4 + (128 + 128) * 3 * 2
    value_block = 64 * 3 * 16 + 64 * 2 * 3 * 8 + 81 * 3 * 4 + (128 + 128) * 3 * 2
    assert layer.nbytes() == key_block + value_block + 2 * 36 * 3 * 64 * 4 == bytes_by_hand(method, [64], 100, 3, 64)
    for _ in range(28):
        layer.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
    assert [b.q.shape[-2] for b in layer.store.blocks["v"]] == [64, 32]
    assert layer.nbytes() == bytes_by_hand(method, [64, 32], 128, 3, 64)
    for parts in ABLATION:
        m = gear(2, 32, 32, parts)
        layer = QuantizedKVLayer(m, kv_heads=3, head_dim=64)
        layer.update(torch.randn(1, 3, 100, 64), torch.randn(1, 3, 100, 64))
        assert layer.nbytes() == bytes_by_hand(m, [64], 100, 3, 64), parts


def test_fp16_statistics_and_longer_blocks():
    """scale_dtype='fp16': the codes of the fp32 quantizer, its scales and minima rounded to fp16, and L fit to the
    error left after the rounded ones; block_size=12 (G = 4, R = 8): tokens fed one at a time leave the float
    window 12 at a time, and the bytes are the hand count's with 2-byte statistics."""
    x = planted("key", seed=5)
    wide = gear_compress(x, "key", 2, 8, 0.02, 0)
    half = gear_compress(x, "key", 2, 8, 0.02, 0, scale_dtype="fp16")
    assert torch.equal(half.q.packed, wide.q.packed) and half.q.scale.dtype == torch.float16
    assert torch.equal(half.q.scale, wide.q.scale.half()) and torch.equal(half.q.minimum, wide.q.minimum.half())
    S = torch.zeros(1, 2, 64 * 32).scatter(-1, half.s_index.long(), half.s_values.float()).reshape(x.shape)
    rounded = quantize((x - S).contiguous(), kivi_spec("key", 2, 8))
    rounded.scale, rounded.minimum = rounded.scale.half().float(), rounded.minimum.half().float()
    torch.testing.assert_close(half.dequantize(), S + dequantize(rounded), rtol=1e-6, atol=1e-6)
    with_l = gear_compress(x, "key", 2, 8, 0.02, 2, scale_dtype="fp16")
    R = x - S - dequantize(rounded)
    A = with_l.a.float()
    torch.testing.assert_close(with_l.a.float() @ with_l.b.float(), A @ A.transpose(-1, -2) @ R, rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="scale_dtype"):
        gear_compress(x, "key", scale_dtype="bf16")

    method = GEAR(2, 4, 8, block_size=12, scale_dtype="fp16")
    layer = QuantizedKVLayer(method, kv_heads=3, head_dim=16)
    g = torch.Generator().manual_seed(8)
    for t in range(1, 41):
        layer.update(torch.randn(1, 3, 1, 16, generator=g), torch.randn(1, 3, 1, 16, generator=g))
        held = sum(b.q.shape[-2] for b in layer.store.blocks["k"])
        assert held == (max(t - 8, 0) // 12) * 12, t  # a block of 12 as soon as 12 tokens are past the window
    assert [b.q.shape[-2] for b in layer.store.blocks["v"]] == [12, 12]
    assert layer.nbytes() == bytes_by_hand(method, [12, 12], 40, 3, 16)
    assert str(method) == "gear2-g4-r8-l2-s0.02-sfp16-b12"
    with pytest.raises(ValueError, match="block_size must be a positive multiple of group_size=4"):
        GEAR(2, 4, 8, block_size=6)


@pytest.mark.parametrize("parts", list(ABLATION))
def test_generate_runs_with_each_part(model, parts):
    """``generate`` with each ablation: max_new_tokens come out; at 4 bits it follows the float greedy run."""
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    float_out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    for bits in (2, 4):
        method = gear(bits, 4, 8, parts)
        assert method.parts == parts and ("-l2" in str(method)) == ("L" in parts)
        cache = QuantizedKVCache(method, model.config)
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=False)
        assert out.shape == (1, 28) and cache.get_seq_length() == 27
        # prefill 12 -> a block of 4 + 8 in float; then a block of 4 at 16, 20 and 24 tokens; 11 left in float
        assert cache.nbytes() == 2 * bytes_by_hand(method, [4, 4, 4, 4], 27, 2, 16)
        if bits == 4:
            assert torch.equal(out[:, :20], float_out[:, :20])


def test_kernel_backend_reads_back_what_torch_does():
    """GEAR's Q through the KIVI Triton kernel (interpreted on a CPU) gives the torch reference's read-back."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    got, want = (QuantizedKVLayer(GEAR(2, 4, 8, backend=b), 2, 16) for b in ("interpret", "torch"))
    got.update(k, v)
    want.update(k, v)
    for a, b in zip(got.update(k[..., :1, :], v[..., :1, :]), want.update(k[..., :1, :], v[..., :1, :])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got.nbytes() == want.nbytes()


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(ValueError, match="2- or 4-bit"):
        GEAR(bits=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        GEAR(group_size=32, residual=48)
    with pytest.raises(ValueError, match="outlier_ratio"):
        GEAR(outlier_ratio=1.0)
    with pytest.raises(ValueError, match="rank must be"):
        GEAR(rank=-1)
    with pytest.raises(ValueError, match="power_iters"):
        GEAR(power_iters=0)
    with pytest.raises(ValueError, match="iters must be"):
        power_iteration(torch.randn(4, 4), 2, iters=0)
    layer = QuantizedKVLayer(GEAR(2, 4, 0), kv_heads=2, head_dim=16)
    bad = torch.randn(1, 2, 8, 16)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.update(bad, torch.randn(1, 2, 8, 16))
    assert layer.nbytes() == 0
    other = tiny_llama(hidden=96)  # another head dim
    with pytest.raises(ValueError, match="do not fit this cache"):
        other(torch.randint(0, 256, (1, 5)), past_key_values=QuantizedKVCache(GEAR(2, 4, 0), model.config),
              use_cache=True)


# --- the embedded SmolLM2-135M (30 layers, 3 KV heads x 64) ---------------------------------------------------

@pytest.mark.model
def test_embedded_generate_and_perplexity(embedded):
    """72 prompt tokens + 8 greedy tokens with GEAR-2 (G = 32, R = 32): the bytes are the hand count's; and on one
    128-token window prefilled in chunks of 32, GEAR-2's full recipe moves perplexity less than its Q alone."""
    from embedded import windows

    model, _ = embedded
    prompt = windows(128, 1)[:, :72]
    method = GEAR(2, 32, 32)
    cache = QuantizedKVCache(method, model.config)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 80) and cache.get_seq_length() == 79
    assert cache.nbytes() == 30 * bytes_by_hand(method, [32], 79, 3, 64)  # 72 -> 32 quantized + 40 in float

    w = windows(128, 1)
    full = cache_perplexity(model, w, None, 32)["ppl"]
    q_only = cache_perplexity(model, w, gear(2, 32, 32, "Q"), 32)["ppl"]
    recipe = cache_perplexity(model, w, method, 32)["ppl"]
    assert q_only > full * 1.01 and abs(recipe - full) < abs(q_only - full)
