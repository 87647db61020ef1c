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


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_a_bound_below_the_rounding_edge_skips_only_a_clamp_that_changes_nothing(name, gen):
    """encode_nearest(x, bound=B) leaves the clamp out when nothing as large as B rounds off the grid (ints:
    below min(qmax, -qmin) + 1/2; FP8: below max + half a step, where torch's cast rounds to max itself).
    The probe goes right up to that edge, where a looser threshold would give wrapped or NaN codes."""
    grid = GRIDS[name]
    x = _probe(grid, gen)
    if hasattr(grid, "qmin"):
        edge = min(grid.qmax, -grid.qmin) + 0.5
    elif name in FP8:
        edge = grid.max + grid.max_step / 2
    else:
        edge = float(grid.levels.abs().max()) if grid.bits <= 8 else 65504.0
    below = torch.nextafter(torch.tensor(edge), torch.tensor(0.0))  # the largest float32 under the edge
    x = torch.cat([x.clamp(-below, below), torch.stack([below, -below])])
    expected = grid.encode(grid.round(x))
    B = float(x.abs().max())
    assert torch.equal(grid.encode_nearest(x.clone(), bound=B), expected)
    if grid.bits <= 8:
        assert torch.equal(grid.encode_nearest(x.clone(), torch.uint8, overwrite=True, bound=B), expected.to(torch.uint8))


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e5m2"])
def test_a_bound_past_the_rounding_edge_still_clamps(name):
    """At the edge (ints: 127.5 rounds to 128, which int8 wraps) and past it (E5M2: torch's cast gives inf;
    torch 2.13's E4M3 cast happens to saturate by itself, so E4M3 cannot show the clamp missing)."""
    grid = GRIDS[name]
    edge = min(grid.qmax, -grid.qmin) + 0.5 if name in ("int8", "int4") else grid.max + 3 * grid.max_step / 4
    x = torch.tensor([edge, -edge, 1.0])
    expected = grid.encode(grid.round(x), torch.uint8)
    assert torch.equal(grid.encode_nearest(x.clone(), torch.uint8, overwrite=True, bound=edge), expected)
    assert not torch.equal(grid.encode_nearest(x.clone(), torch.uint8, overwrite=True, bound=0.0), expected)  # the lie shows


@pytest.mark.parametrize("name", ["nf4", "ternary", "binary"])
def test_bin_tables_count_midpoints_like_searchsorted(name, gen, monkeypatch):
    """Small table grids find the nearest level by bin tables (searchsorted is ~10x slower on CPU), a piece
    of x at a time: the codes are searchsorted's over the midpoints, ties (x on a midpoint) going down, and
    the floats either side of every midpoint; pieces of 7 values change nothing."""
    from qlab.core.formats import table

    grid = GRIDS[name]
    mid = (grid.levels[1:] + grid.levels[:-1]) / 2
    x = torch.cat([_probe(grid, gen), mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    expected = torch.searchsorted(mid, x)
    assert table._bin_tables(grid.table) is not None
    assert torch.equal(grid.encode_nearest(x), expected)
    monkeypatch.setattr(table, "PIECE", 7)
    assert torch.equal(grid.encode_nearest(x, torch.uint8), expected.to(torch.uint8))


def test_crowded_tables_fall_back_to_searchsorted(gen):
    """dynamic8's 255 midpoints crowd near 0, two to a bin: no bin tables, searchsorted's codes."""
    from qlab.core.formats import table

    grid = GRIDS["dynamic8"]
    assert table._bin_tables(grid.table) is None
    x = _probe(grid, gen)
    assert torch.equal(grid.encode_nearest(x), torch.searchsorted((grid.levels[1:] + grid.levels[:-1]) / 2, x))
