"""Legacy formats against the gguf package's reference quantizer and dequantizer, byte for byte."""
import numpy as np
import pytest
import gguf

from qlab import gguf as qg

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


@pytest.mark.parametrize("name", LEGACY)
def test_quantize_matches_gguf_package_on_outliers(name, outlier_rows):
    fmt = qg.get_format(name)
    ours = fmt.quantize_rows(outlier_rows)
    ref = gguf.quants.quantize(outlier_rows, fmt.ggml_type)
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", LEGACY)
def test_quantize_matches_gguf_package_on_real_weights(name, real_weights):
    fmt = qg.get_format(name)
    for w in real_weights.values():
        assert np.array_equal(fmt.quantize_rows(w), gguf.quants.quantize(w, fmt.ggml_type))


@pytest.mark.parametrize("name", LEGACY)
def test_dequantize_bit_exact(name, outlier_rows):
    fmt = qg.get_format(name)
    data = gguf.quants.quantize(outlier_rows, fmt.ggml_type)
    ours = fmt.dequantize_rows(data, outlier_rows.shape[1])
    ref = gguf.quants.dequantize(data, fmt.ggml_type)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_q4_0_hand_example():
    """One block by hand: the extreme -2 maps to code 0, so d = -2/-8 = 0.25 and x = 0.25·(q - 8)."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1], x[0, 16] = -2.0, 0.5, 1.0
    data = qg.get_format("Q4_0").quantize_rows(x)
    assert data[0, :2].view(np.float16)[0] == 0.25
    assert data[0, 2] == 0 | (12 << 4)        # element 0 -> q=0 (low nibble), element 16 -> q=8+4 (high)
    assert data[0, 3] == 10 | (8 << 4)        # element 1 -> 8 + 2, element 17 -> 8
    assert np.array_equal(qg.get_format("Q4_0").dequantize_rows(data, 32), x)


def test_bits_per_weight_table_matches_gguf_sizes():
    for row in qg.format_table():
        block, size = gguf.GGML_QUANT_SIZES[qg.get_format(row["name"]).ggml_type]
        assert (row["block_size"], row["type_size"]) == (block, size)
    bpw = {r["name"]: r["bits_per_weight"] for r in qg.format_table()}
    assert bpw == {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q2_K": 2.625,
                   "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


def test_bad_row_length_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 256"):
        qg.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unknown GGUF block format"):
        qg.get_format("Q7_K")


def test_tensor_api_matches_core_attribute_names(outlier_rows):
    import torch
    t = qg.quantize(torch.from_numpy(outlier_rows[:, :256]), "Q4_K")
    assert t.shape == (24, 256) and t.nbytes == 24 * 144 and t.bits_per_weight == 4.5
    assert t.dequantize().dtype == torch.float32 and t.dequantize().shape == (24, 256)


@pytest.mark.parametrize("name", LEGACY)
def test_compiled_decoders_bit_exact_with_any_finite_fp16_fields(name, any_finite_halves_blocks):
    """The compiled decode loops (_decode_q4_0 .. _decode_q8_0): bit-exact with the gguf package for every
    finite half in d (and m), ±0, subnormals and ±65504 included, and every byte elsewhere; also on a strided
    view of the blocks."""
    fmt = qg.get_format(name)
    data = any_finite_halves_blocks(fmt, 8192)
    ref = gguf.quants.dequantize(data, fmt.ggml_type).reshape(8192, 32)
    assert np.array_equal(fmt.dequantize_blocks(data).view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(fmt.dequantize_blocks(data[::2]).view(np.uint32), ref[::2].view(np.uint32))


@pytest.mark.parametrize("name", LEGACY)
def test_edge_blocks_match_gguf_package(name):
    """The compiled block loops on the blocks where C details show: all zeros (d = -0.0 for the _0 types),
    a constant block, ties between +max and -max (the first one wins), exact .5 steps, one huge outlier."""
    fmt = qg.get_format(name)
    rows = np.zeros((6, 64), np.float32)
    rows[1] = -3.0
    rows[2, :32] = np.tile([1.0, -1.0], 16)
    rows[2, 32:] = np.tile([-2.0, 2.0], 16)
    rows[3] = np.arange(64, dtype=np.float32) / 2 - 16        # many values on exact half steps
    rows[4] = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    rows[4, 5] = 1e4
    rows[5, 31] = 1e-30                                        # a subnormal-scale block beside a zero one
    assert np.array_equal(fmt.quantize_rows(rows), gguf.quants.quantize(rows, fmt.ggml_type))


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_one_pass_loop_reports_every_non_finite_value_or_half(name):
    """quantize_ref (no checks beforehand) says False for a NaN or inf at any position of a block, and for a
    half that overflows; quantize_rows then refuses the input with the general path's message."""
    fmt = qg.get_format(name)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    out = np.empty((4, fmt.type_size), np.uint8)
    assert fmt.quantize_ref(x, out)
    for j in range(32):
        for bad in (np.nan, np.inf, -np.inf, 3e6, -3e6):   # ±3e6: |d| > 65504 (or m < -65504)
            y = x.copy()
            y[2, j] = bad
            assert not fmt.quantize_ref(y, out), (j, bad)
    y = x.copy()
    y[2, 5] = 3e6
    with pytest.raises(ValueError, match=rf"{name}: input is too large for fp16 block scales \(row 2"):
        fmt.quantize_rows(y)


@pytest.mark.parametrize("name", ["Q4_1", "Q5_1"])
def test_signed_zero_minimum_and_fp16_edges_match_llamacpp(name, peer):
    """m keeps the sign of the block's first zero, as the C's strict comparisons do (the gguf package's np.min
    does not); d and m on fp16 ties, below the smallest half, and near 65504."""
    fmt = qg.get_format(name)
    rows = np.zeros((4, 64), np.float32)
    rows[0, :32:2] = -0.0                                                   # first zero -0.0: m = -0.0
    rows[0, 33::2] = -0.0                                                   # first zero +0.0: m = +0.0
    rows[0, 40] = 1.0
    rows[1, :32] = np.float32(1 + 2**-11)                                   # m on a tie between two halves
    rows[1, 31] = np.float32(1 + 2**-11) + np.float32((1 << fmt.bits) - 1) * np.float32(1 + 3 * 2**-11)
    rows[2, :32] = np.float32(2**-25)                                       # m rounds to 0 (tie to even)
    rows[2, 32:] = np.linspace(-3e-8, 3e-8, 32, dtype=np.float32)           # subnormal halves
    rows[3] = np.random.default_rng(2).standard_normal(64).astype(np.float32) * 15000
    ours = fmt.quantize_rows(rows)
    assert ours[0, 3] == 0x80 and ours[0, fmt.type_size + 3] == 0x00        # the two minima's sign bytes
    assert np.array_equal(ours, peer.ggml_quantize(rows, name))
