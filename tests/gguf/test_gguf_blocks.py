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
