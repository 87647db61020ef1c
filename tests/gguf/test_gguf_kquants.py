"""k-quants: decode bit-exact with the gguf package; encode byte-exact with llama.cpp (peer)."""
import numpy as np
import pytest
import gguf

from qlab import gguf as qg
from qlab.gguf import search

KQ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] + KQ


def random_blocks(fmt, n, seed=0):
    """Random bytes with every fp16 field set to a finite value (any bit pattern is a valid block)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, fmt.type_size), dtype=np.uint8)
    for off in fmt.f16_offsets:
        data[:, off:off + 2] = rng.uniform(-1, 1, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return data


@pytest.mark.parametrize("name", KQ)
def test_dequantize_bit_exact_on_random_bytes(name):
    fmt = qg.get_format(name)
    data = random_blocks(fmt, 64)
    ours = fmt.dequantize_blocks(data)
    ref = gguf.quants.dequantize(data, fmt.ggml_type).reshape(64, 256)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", KQ)
def test_dequantize_bit_exact_on_own_encoding(name, outlier_rows):
    fmt = qg.get_format(name)
    data = fmt.quantize_rows(outlier_rows)
    ref = gguf.quants.dequantize(data, fmt.ggml_type)
    assert np.array_equal(fmt.dequantize_rows(data, 512).view(np.uint32), ref.view(np.uint32))


def test_q4_k_super_block_by_hand():
    """d=0.5, dmin=0.25; sub-block 0: sc=2, m=4; sub-block 5: sc=3 (4-bit split), m=17 (6-bit split)."""
    blk = np.zeros((1, 144), np.uint8)
    blk[0, 0:2] = np.array([0.5], np.float16).view(np.uint8)
    blk[0, 2:4] = np.array([0.25], np.float16).view(np.uint8)
    sc = blk[0, 4:16]
    sc[0] = 2                        # scale of sub-block 0 (6 bits)
    sc[4] = 4                        # min of sub-block 0
    sc[9] = 3 | (1 << 4)             # sub-block 5: low 4 bits of scale 3, low 4 bits of min 17 (=0b010001)
    sc[5] |= (17 >> 4) << 6          # top 2 bits of min 5 live in byte 4+1
    blk[0, 16] = 7 | (9 << 4)        # value 0 -> q=7 (sub-block 0), value 32 -> q=9 (sub-block 1)
    blk[0, 16 + 64 + 1] = 5 << 4     # chunk 2, byte 1, high nibble: value 128+32+1 = 161 (sub-block 5)
    x = qg.get_format("Q4_K").dequantize_blocks(blk)[0]
    assert x[0] == 0.5 * 2 * 7 - 0.25 * 4
    assert x[32] == 0.0              # sub-block 1 has scale 0 and min 0
    assert x[161] == 0.5 * 3 * 5 - 0.25 * 17
    assert x[160] == -0.25 * 17      # q=0 in sub-block 5 gives -dmin·m
    assert np.array_equal(x, gguf.quants.dequantize(blk, gguf.GGMLQuantizationType.Q4_K).reshape(-1))


@pytest.mark.parametrize("name,bound", [("Q2_K", 0.40), ("Q3_K", 0.20), ("Q4_K", 0.11), ("Q5_K", 0.055),
                                        ("Q6_K", 0.03)])
def test_round_trip_error_on_gaussian(name, bound):
    """Relative RMS error of a Gaussian matrix stays near 2^-bits·const (quantization noise)."""
    x = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    fmt = qg.get_format(name)
    y = fmt.dequantize_rows(fmt.quantize_rows(x), 512)
    rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel < bound


def test_imatrix_lowers_weighted_error():
    """With importance weights, the weighted error on the important columns goes down (Q4_K)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    imp = np.ones(256, np.float32)
    imp[::8] = 100.0
    fmt = qg.get_format("Q4_K")
    plain = fmt.dequantize_rows(fmt.quantize_rows(x), 256)
    weighted = fmt.dequantize_rows(fmt.quantize_rows(x, imatrix=imp), 256)
    err = lambda y: float((imp * (y - x) ** 2).sum())  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


@pytest.mark.parametrize("name", ALL)
def test_quantize_byte_exact_with_llamacpp(name, outlier_rows, peer):
    ours = qg.get_format(name).quantize_rows(outlier_rows)
    assert np.array_equal(ours, peer.ggml_quantize(outlier_rows, name))


@pytest.mark.parametrize("name", ALL)
def test_quantize_byte_exact_with_llamacpp_imatrix(name, outlier_rows, peer):
    imat = np.random.default_rng(3).gamma(1.0, 1.0, 512).astype(np.float32)
    ours = qg.get_format(name).quantize_rows(outlier_rows, imatrix=imat)
    assert np.array_equal(ours, peer.ggml_quantize(outlier_rows, name, imatrix=imat))


@pytest.mark.parametrize("name", ALL)
def test_quantize_byte_exact_with_llamacpp_real_weights(name, real_weights, peer):
    for w in real_weights.values():
        if w.shape[1] % qg.get_format(name).block_size == 0:
            assert np.array_equal(qg.get_format(name).quantize_rows(w), peer.ggml_quantize(w, name))


def test_hand_decoder_agrees_with_vectorised(outlier_rows):
    from qlab.gguf.anatomy import decode_q4_k_by_hand
    fmt = qg.get_format("Q4_K")
    data = fmt.quantize_rows(outlier_rows[:4])                     # 8 super-blocks
    blocks = data.reshape(-1, 144)
    vec = fmt.dequantize_blocks(blocks)
    for b in range(blocks.shape[0]):
        assert np.array_equal(decode_q4_k_by_hand(blocks[b].tobytes())["values"], vec[b])


def test_byte_budget_sums_to_block_size():
    from qlab.gguf.anatomy import bits_breakdown, LAYOUT
    for name in qg.FORMATS:
        rows = bits_breakdown(name)
        assert sum(r["bytes"] for r in rows) == qg.get_format(name).type_size
        assert sum(r["bits_per_weight"] for r in rows) == pytest.approx(qg.get_format(name).bits_per_weight)


@pytest.mark.parametrize("name", KQ)
def test_compiled_decoders_bit_exact_with_any_finite_fp16_fields(name, any_finite_halves_blocks):
    """Every k-quant decodes in a compiled loop (_decode_q2_k .. _decode_q6_k): bit-exact with the gguf package
    for every finite half in d (and dmin), ±0, subnormals and ±65504 included, and every byte elsewhere."""
    fmt = qg.get_format(name)
    data = any_finite_halves_blocks(fmt)
    ours = fmt.dequantize_blocks(data)
    ref = gguf.quants.dequantize(data, fmt.ggml_type).reshape(4096, 256)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
