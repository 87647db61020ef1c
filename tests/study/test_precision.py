"""qlab.study.precision against torch's own float arithmetic (nextafter) and hand values."""
import math

import pytest
import torch

from qlab.core.formats import get_grid
from qlab.study.precision import (FP32, absmax_scale, float_spacing, format_properties, format_table, grid_by_name,
                                  spacing, spacing_curves)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_float_spacing_matches_nextafter(name):
    grid, dtype = grid_by_name(name), TORCH_DTYPES[name]
    g = torch.Generator().manual_seed(0)
    lo, hi = math.log2(grid.min_subnormal), math.log2(grid.max) - 1
    x = torch.exp2(lo + (hi - lo) * torch.rand(5000, generator=g, dtype=torch.float64)).to(dtype)
    ref = (torch.nextafter(x, torch.tensor(math.inf, dtype=dtype)) - x).double()
    assert torch.equal(spacing(grid, x.double()), ref)


def test_fp8_spacing_matches_its_level_table():
    for name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
        grid = get_grid(name)
        lv = grid.levels.double()
        pos = lv[lv >= 0][:-1]  # every non-negative level but the top one
        assert torch.equal(float_spacing(grid, pos), lv[lv >= 0].diff())


def test_hand_values():
    assert float(spacing(FP32, torch.tensor(1.0))) == 2.0**-23
    assert float(spacing(FP32, torch.tensor(1_000_000.0))) == 0.0625
    assert float(spacing(get_grid("fp16"), torch.tensor(1e-7))) == 2.0**-24  # subnormal floor
    assert math.isnan(float(spacing(get_grid("fp16"), torch.tensor(70000.0))))  # beyond max
    int8 = get_grid("int8", restricted=True)
    s = absmax_scale(int8, peak=2.54)
    assert s == pytest.approx(0.02)
    assert float(spacing(int8, torch.tensor(1.3), scale=s)) == pytest.approx(0.02)  # constant step
    nf4 = get_grid("nf4")
    assert float(spacing(nf4, torch.tensor(0.9))) == pytest.approx(1 - nf4.levels[-2].item())


def test_format_properties():
    e4m3 = format_properties(get_grid("fp8_e4m3"))
    assert (e4m3["eps"], e4m3["max"], e4m3["min_normal"], e4m3["min_subnormal"]) == (0.125, 448.0, 2.0**-6, 2.0**-9)
    assert e4m3["finite_values"] == 253  # 256 codes, 2 NaN, +0 = -0
    assert format_properties(get_grid("fp8_e5m2"))["finite_values"] == 2 * (31 * 4) - 1
    assert format_properties(get_grid("fp16"))["finite_values"] == len(get_grid("fp16").levels)
    int8 = format_properties(get_grid("int8", restricted=True))
    assert int8["eps"] is None and int8["gap_below_1"] == pytest.approx(1 / 127) and int8["finite_values"] == 255
    assert format_properties(get_grid("nf4"))["gap_below_1"] == pytest.approx(1 - 0.7229568362236023)
    assert format_properties(FP32)["eps"] == 2.0**-23 and format_properties(FP32)["gap_below_1"] == 2.0**-24


def test_format_table_uses_the_restricted_int_grids():
    rows = {r["format"]: r for r in format_table()}
    assert rows["int8 (-127..127)"]["finite_values"] == 255 and rows["int4 (-7..7)"]["finite_values"] == 15
    assert rows["int4 (-7..7)"]["gap_below_1"] == pytest.approx(1 / 7)
    assert rows["nf4"]["finite_values"] == 16 and rows["bf16"]["decimal_digits"] == pytest.approx(7 * math.log10(2))


def test_spacing_curves():
    curves = spacing_curves(["fp16", "int8"], n_points=5, lo=1e-8, hi=1e4)
    x, gap = curves["fp16"]
    assert x.tolist() == pytest.approx([1e-8, 1e-5, 1e-2, 10, 1e4])
    assert gap.tolist() == [2.0**-24, 2.0**-24, 2.0**-17, 2.0**-7, 2.0**3]  # subnormal floor, then ulp(x)
    x, gap = curves["int8 (absmax, max 1)"]
    assert x[-1] == 1 and gap[:-1].tolist() == pytest.approx([1 / 127] * 4) and math.isnan(gap[-1])
