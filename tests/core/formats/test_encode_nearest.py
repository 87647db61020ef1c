"""The one-step encoders quantize() uses: ``encode_nearest(x)`` is ``encode(round(x))`` on every grid, code
for code, in every code dtype; the FP8 decode table is torch's own cast of all 256 codes."""
import pytest
import torch

from qlab.core.formats import GRIDS
from qlab.core.formats.floating import _fp8_values

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _probe(grid, gen):
    """Values all over the grid: random ones, every level, the midpoints (ties) and beyond the ends."""
    levels = grid.levels if grid.bits <= 8 else torch.linspace(-70000.0, 70000.0, 257)
    mids = (levels[1:] + levels[:-1]) / 2
    span = float(levels.abs().max())
    rand = torch.randn(2000, generator=gen) * span / 2
    return torch.cat([rand, levels, mids, torch.tensor([-2 * span, 2 * span, 0.0, -0.0])])


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_encode_nearest_is_encode_of_round(name, gen):
    grid = GRIDS[name]
    x = _probe(grid, gen)
    expected = grid.encode(grid.round(x))
    assert expected.dtype == torch.int64
    assert torch.equal(grid.encode_nearest(x), expected)
    if grid.bits <= 8:
        assert torch.equal(grid.encode_nearest(x, torch.uint8), expected.to(torch.uint8))
        assert torch.equal(grid.encode(grid.round(x), torch.uint8).to(torch.int64), expected)


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_decode_table_is_torchs_cast(name):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = codes.view(FP8[name]).float()
    decoded = GRIDS[name].decode(codes.to(torch.int64))
    assert torch.equal(decoded.isnan(), expected.isnan())
    ok = ~expected.isnan()
    assert torch.equal(decoded[ok].view(torch.int32), expected[ok].view(torch.int32))  # -0.0 included


def test_fp8_decode_returns_a_copy_of_the_table():
    grid = GRIDS["fp8_e4m3"]
    before = _fp8_values(FP8["fp8_e4m3"]).clone()
    out = grid.decode(torch.tensor([56, 0]))
    out += 1
    assert torch.equal(_fp8_values(FP8["fp8_e4m3"]).view(torch.int32), before.view(torch.int32))
