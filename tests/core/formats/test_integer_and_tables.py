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


def test_int_codes_by_hand(cpu_loops):
    # uint4, scale 0.5, zero point 3: x / s + z = 3.5, 4.5, 5.5, -1, 20 -> ties to even 4, 4, 6, then clamped 0, 15
    from qlab.core.formats.integer import int_codes
    G = torch.tensor([[0.25, 0.75, 1.25, -2.0, 8.5]])
    assert int_codes(G, torch.tensor([0.5]), torch.tensor([3.0]), IntGrid(4, signed=False)).tolist() == [[4, 4, 6, 0, 15]]
    # int8 restricted [-127, 127], no zero point: codes are q + 127
    G = torch.tensor([[-300.0, -126.5, -0.5, 0.5, 1.5, 126.5]])
    assert int_codes(G, torch.tensor([1.0]), None, IntGrid(8, restricted=True)).tolist() == [[0, 1, 127, 127, 129, 253]]


@pytest.mark.parametrize("grid", [IntGrid(8, restricted=True), IntGrid(8), IntGrid(8, signed=False), IntGrid(4, signed=False),
                                  IntGrid(3), IntGrid(2, signed=False)], ids=str)
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_int_codes_are_torch_round_and_clamp_bit_for_bit(grid, zero_point, threads, gen, cpu_loops):
    """The encoder's one-pass integer loop against torch's divide, add, round (ties to even) and clamp, on
    3 rows of 50,001 (two threads split the values inside the second row), with exact ties in every row."""
    from qlab.core.formats.integer import int_codes
    G = torch.randn(3, 50_001, generator=gen) * 40
    G[:, :20] = torch.arange(-10, 10) + 0.5
    scale = torch.tensor([1.0, 0.37, 3.0])
    zp = torch.tensor([float(grid.qmin), float(grid.qmax), float((grid.qmin + grid.qmax) // 2)]) if zero_point else None
    X = G / scale[:, None] + (0 if zp is None else zp[:, None])
    want = (torch.round(X).clamp(grid.qmin, grid.qmax) - grid.qmin).to(torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(int_codes(G, scale, zp, grid), want)
    finally:
        torch.set_num_threads(before)


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
