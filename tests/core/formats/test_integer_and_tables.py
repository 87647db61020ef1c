import pytest
import torch

from qlab.core.formats import get_grid, IntGrid, nf4_levels

# bitsandbytes' NF4 code table (bitsandbytes/functional.py; QLoRA appendix E), float32
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_levels_are_bitsandbytes_table_bit_for_bit():
    assert list(nf4_levels()) == BNB_NF4


def test_nf4_nearest_level():
    grid = get_grid("nf4")
    x = torch.tensor([0.03, 0.05, -0.95, 0.999, 2.0])
    assert grid.round(x).tolist() == pytest.approx([0.0, 0.07958029955625534, -1.0, 1.0, 1.0])


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_ranges(bits):
    u, s = IntGrid(bits, signed=False), IntGrid(bits, signed=True)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if bits >= 2:
        r = IntGrid(bits, signed=True, restricted=True)
        assert (r.qmin, r.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    codes = torch.arange(2**bits)
    assert torch.equal(s.encode(s.decode(codes)), codes)


def test_int_round_ties_to_even_and_clamps():
    g = get_grid("int4")
    assert g.round(torch.tensor([0.5, 1.5, 2.5, -9.0, 7.6])).tolist() == [0.0, 2.0, 2.0, -8.0, 7.0]


def test_ternary_and_binary():
    assert get_grid("ternary").round(torch.tensor([-0.7, 0.2, 0.51])).tolist() == [-1.0, 0.0, 1.0]
    assert get_grid("binary").round(torch.tensor([-0.1, 0.3])).tolist() == [-1.0, 1.0]
    assert get_grid("ternary").bits == 2 and get_grid("binary").bits == 1


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9)])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="1 to 8 bits"):
        IntGrid(**bad)


def test_unknown_grid():
    with pytest.raises(ValueError, match="unknown number format"):
        get_grid("int17")


def test_dynamic8_code_structure():
    # bitsandbytes' signed dynamic map: 127 values of each sign in 7 decades, plus 0 and 1.0
    levels = get_grid("dynamic8").levels
    assert levels.numel() == 256 and levels.unique().numel() == 256
    assert levels.max() == 1.0 and levels.min() == pytest.approx(-0.99296875)
    positive = levels[levels > 0]
    assert positive.min() == pytest.approx(0.55e-6)  # (0.1 + 1) / 2 * 1e-6
    assert ((positive >= 1e-3) & (positive < 1e-2)).sum() == 2**4  # exponent i = 4: 16 values
    assert ((positive >= 1e-2) & (positive < 1e-1)).sum() == 2**5
