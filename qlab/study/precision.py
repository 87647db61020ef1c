"""Precision of number formats: machine epsilon, range, and the spacing between neighbouring values.

For a binary float with m mantissa bits and exponent bias B, a magnitude |x| in the binade
[2^e, 2^(e+1)) has neighbours 2^(e - m) apart, and below the smallest normal 2^(1 - B) the step stays
at the subnormal spacing 2^(1 - B - m):

    spacing(x) = 2^(max(floor(log2 |x|), 1 - B) - m)        eps = spacing(1) = 2^-m

so the *absolute* gap grows with |x| while the *relative* gap spacing(x) / |x| stays in (2^-(m+1), 2^-m].
A uniform integer grid with scale s (absmax scaling: s = max|x| / qmax) has the constant gap s, so its
relative gap falls as 1/|x|. NF4 and other table grids have one gap per pair of neighbouring levels.

>>> float(spacing(FP32, torch.tensor(1_000_000.0)))   # fp32 neighbours of one million
0.0625
"""
import math

import torch

from qlab.core.formats import FloatGrid, get_grid

# IEEE binary32, described like the core's other float grids (its 2^32 levels are never enumerated here).
FP32 = FloatGrid("fp32", exp_bits=8, man_bits=23, bias=127, max=3.4028234663852886e38)


def grid_by_name(name: str):
    """The core's grids plus 'fp32'."""
    return FP32 if name == "fp32" else get_grid(name)


def float_spacing(grid: FloatGrid, x: torch.Tensor) -> torch.Tensor:
    """Gap from |x| to the next larger representable magnitude (the ulp), closed form; NaN beyond max."""
    a = torch.as_tensor(x, dtype=torch.float64).abs()
    _, exp = torch.frexp(a)  # a = mant * 2^exp, mant in [0.5, 1): floor(log2 a) = exp - 1
    e = torch.where(a < grid.min_normal, 1 - grid.bias, exp - 1)  # frexp(0) gives exp 0: test a instead
    gap = torch.ldexp(torch.ones_like(a), (e - grid.man_bits).to(torch.int32))
    return torch.where(a < grid.max, gap, torch.full_like(a, math.nan))


def level_spacing(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gap between the two levels around |x| (l_k <= |x| < l_(k+1)); NaN outside [min, max) of the levels."""
    levels = torch.as_tensor(levels, dtype=torch.float64).unique()
    a = torch.as_tensor(x, dtype=torch.float64).abs()
    k = torch.searchsorted(levels, a, right=True) - 1  # index of the level at or below |x|
    inside = (k >= 0) & (k < len(levels) - 1)
    kc = k.clamp(0, len(levels) - 2)
    gap = levels[kc + 1] - levels[kc]
    return torch.where(inside, gap, torch.full_like(gap, math.nan))


def spacing(grid, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Spacing of ``grid`` (times ``scale``, e.g. the absmax scale of an int grid) at the magnitudes |x|."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if isinstance(grid, FloatGrid):
        return scale * float_spacing(grid, x / scale)
    return scale * level_spacing(grid.levels, x / scale)


def absmax_scale(grid, peak: float = 1.0) -> float:
    """The scale that maps a tensor with max|x| = peak onto the grid's largest level (absmax scaling)."""
    return peak / grid.max_abs


def format_properties(grid) -> dict:
    """One row of the format table: bits, eps, largest value, smallest normal and subnormal, digits.

    ``eps`` is the gap *above* 1.0 (floats only: 2^-m); ``gap_below_1`` is the gap just below 1.0, which every
    format has (floats 2^-(m+1)). Integer and table grids are given after absmax scaling to a largest level
    of 1, so their only gap at 1 is the one below it (int8 on its restricted range -127..127, as absmax
    uses it: 1/127; NF4: 1 - 0.7230); their smallest positive value stands in the min_subnormal column and
    ``decimal_digits`` is -log10 of the gap at 1 (eps for floats, gap_below_1 for the scaled grids).
    """
    row = {"format": grid.name, "bits": grid.bits}
    if isinstance(grid, FloatGrid):
        row.update(exponent_bits=grid.exp_bits, mantissa_bits=grid.man_bits, eps=grid.eps,
                   gap_below_1=grid.eps / 2, max=grid.max, min_normal=grid.min_normal,
                   min_subnormal=grid.min_subnormal, finite_values=_float_finite_count(grid))
    else:  # in absmax-scaled units: the largest level is 1
        levels = grid.levels.double() / grid.max_abs
        row.update(exponent_bits=None, mantissa_bits=None, eps=None, gap_below_1=float(1 - levels[-2]), max=1.0,
                   min_normal=None, min_subnormal=float(levels[levels > 0].min()), finite_values=len(levels))
    row["units"] = "native" if isinstance(grid, FloatGrid) else "absmax-scaled, max = 1"
    row["decimal_digits"] = -math.log10(row["eps"] if row["eps"] is not None else row["gap_below_1"])
    return row


def _float_finite_count(grid: FloatGrid) -> int:
    """Number of distinct finite values (+0 and -0 counted once), without enumerating 2^bits codes."""
    m, E = grid.man_bits, 2**grid.exp_bits
    codes_per_sign = E * 2**m
    if grid.specials == "ieee":
        codes_per_sign -= 2**m  # the all-ones exponent is inf / NaN
    elif grid.specials == "fn":
        codes_per_sign -= 1  # only S.1111.111 is NaN
    return 2 * codes_per_sign - 1


def format_table(names=("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8", "int4", "nf4")):
    """The format table as a list of dicts (``pandas.DataFrame(format_table())`` in a notebook). Integer
    formats appear on their restricted symmetric range (int8: -127..127, 255 values), the grid absmax uses."""
    rows = []
    for n in names:
        restricted = n.startswith("int")
        row = format_properties(get_grid(n, restricted=True) if restricted else grid_by_name(n))
        if restricted:
            q = 2 ** (int(n[3:]) - 1) - 1
            row["format"] = f"{n} (-{q}..{q})"
        rows.append(row)
    return rows


def spacing_curves(names, n_points: int = 4000, lo: float = 1e-9, hi: float = 1e6) -> dict:
    """label -> (magnitudes, gaps) for each format, on a log grid of ``n_points`` from ``lo`` to the format's
    largest value (or ``hi``). Floats in native units; integer and table grids after absmax scaling to a
    largest level of 1 (their label says so). Input for ``qlab.study.plots.plot_spacing``."""
    curves = {}
    for name in names:
        grid = grid_by_name(name)
        scale = 1.0 if isinstance(grid, FloatGrid) else absmax_scale(grid)
        top = grid.max_abs * scale
        x = torch.logspace(math.log10(lo), math.log10(min(hi, top)), n_points, dtype=torch.float64)
        label = name if isinstance(grid, FloatGrid) else f"{name} (absmax, max 1)"
        curves[label] = (x, spacing(grid, x, scale))
    return curves


__all__ = ["FP32", "grid_by_name", "float_spacing", "level_spacing", "spacing", "absmax_scale",
           "format_properties", "format_table", "spacing_curves"]
