"""The fp16 field helpers of qlab.gguf.blocks, checked against numpy's float16 on every half."""
import numpy as np

from qlab.gguf.blocks import f16_bytes, f16_field, finite_f16, read_f16


def test_finite_f16_agrees_with_isfinite_on_every_half():
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    assert np.array_equal(finite_f16(every), np.isfinite(every))


def test_f16_field_writes_and_reads_like_f16_bytes():
    """Writing float32 into the view rounds like astype(float16) (ties to even, overflow to inf)."""
    d = np.array([0.1, -2.5e-8, 65504.0, 65520.0, 1 + 2**-11, 1 + 3 * 2**-11, -0.0], np.float32)
    blocks = np.zeros((len(d), 6), np.uint8)
    with np.errstate(over="ignore"):  # 65520 rounds to inf, on purpose
        f16_field(blocks, 2)[:] = d
        expected = f16_bytes(d), d.astype(np.float16).astype(np.float32)
    assert np.array_equal(blocks[:, 2:4], expected[0])
    assert not blocks[:, :2].any() and not blocks[:, 4:].any()
    assert np.array_equal(read_f16(blocks, 2), expected[1])


def _f16_bits_of(x):
    from numba import njit

    from qlab.gguf.legacy import f16_bits

    @njit
    def convert(x, out):
        for i in range(x.shape[0]):
            out[i] = f16_bits(x[i])

    out = np.empty(x.shape[0], np.uint16)
    convert(x, out)
    return out


def test_f16_bits_rounds_like_numpy_float16():
    """The compiled fp16 store of the legacy loops: every exponent and sign, with mantissas at each
    rounding edge (ties, one below, one above, for every shift a subnormal half uses), plus random bits."""
    edges = {0, 0x7FFFFF}
    for k in range(24):
        edges |= {(1 << k) - 1, 1 << k, (1 << k) + 1, (3 << k) & 0x7FFFFF, ((1 << k) | 0x2000) & 0x7FFFFF}
    mantissas = np.array(sorted(edges), np.uint32) & np.uint32(0x7FFFFF)
    exponents = np.arange(255, dtype=np.uint32) << 23            # 255: inf and NaN, checked apart
    bits = (exponents[:, None] | mantissas[None, :]).reshape(-1)
    bits = np.concatenate([bits, bits | np.uint32(0x80000000),
                           np.random.default_rng(0).integers(0, 0x7F800000, 1 << 20, dtype=np.uint32)])
    x = bits.view(np.float32)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(_f16_bits_of(x), expected)
    special = np.array([np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 2.0**-25, 2.0**-24 * 1.5], np.float32)
    assert [hex(h) for h in _f16_bits_of(special)] == ["0x7c00", "0xfc00", "0x7e00", "0x7bff", "0x7bff", "0x7c00",
                                                      "0x0", "0x2"]
