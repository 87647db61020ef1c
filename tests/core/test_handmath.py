"""The worked example of seed article 003, section 5, recomputed by the library (notebook 01 shows it)."""
import pytest
import torch

from qlab.core.quant import quantize

w = torch.tensor([0.32, -1.54, 0.87, -0.21, 1.23, -0.76, 0.05, -1.91])


def test_symmetric_int8():
    qt = quantize(w, "int8-tensor-sym-absmax-sfp32")  # range [-127, 127], scale = absmax / 127
    assert qt.scales().item() == pytest.approx(1.91 / 127)
    assert round(qt.scales().item(), 6) == 0.015039
    assert qt.values().tolist() == [21, -102, 58, -14, 82, -51, 3, -127]
    err = (w - qt.dequantize()).abs()
    assert round(err.max().item(), 6) == 0.007008
    assert round(err.mean().item(), 6) == 0.003514
    assert qt.packed.numel() == 8  # 1 byte per value (plus one 4-byte scale)


def test_asymmetric_int4():
    qt = quantize(w, "int4-tensor-asym-minmax-sfp32")  # grid 0..15, zero point
    assert round(qt.scales().item(), 4) == 0.2093
    assert qt.zero_point.item() == 9
    assert qt.codes().tolist() == [11, 2, 13, 8, 15, 5, 9, 0]
    assert round((w - qt.dequantize()).abs().max().item(), 6) == 0.098667


def test_per_group_int4():
    qt = quantize(w, "int4-g4-asym-minmax-sfp32")
    assert [round(s, 3) for s in qt.scales().tolist()] == [0.161, 0.209]
    assert qt.zero_point.tolist() == [10, 9]
    assert round((w - qt.dequantize()).abs().max().item(), 4) == 0.0773
