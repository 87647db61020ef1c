"""Grids given by an explicit table of levels: NF4, ternary {-1, 0, 1}, binary {-1, 1}.

NF4 (QLoRA, Dettmers et al. 2023, eq. 4 and appendix E): 16 levels placed at quantiles of a standard
normal, made asymmetric so that 0 is exactly representable: 8 levels from the upper half
(quantiles linspace(delta, 0.5, 9)[:-1] of the upper tail) and 7 from the lower half, plus 0,
then divided by the largest so that they span [-1, 1]. delta = 0.9677083 is the QLoRA offset,
chosen as the mean of the quantiles 1 - 1/(2*15) and 1 - 1/(2*16).
"""
from dataclasses import dataclass
from functools import lru_cache
import math

import torch

NF4_OFFSET = 0.9677083


def nf4_levels(offset: float = NF4_OFFSET) -> tuple:
    """The 16 NF4 levels, built from normal quantiles (torch.special.ndtri is the inverse normal CDF).

    The probabilities are a float32 linspace, the quantiles float64, the normalisation float32: the same
    arithmetic as bitsandbytes' ``create_normal_map``, so the levels agree with its table bit for bit.
    """
    ppf = lambda p: torch.special.ndtri(p.double())  # noqa: E731
    positive = ppf(torch.linspace(offset, 0.5, 9)[:-1])  # 8 levels > 0
    negative = -ppf(torch.linspace(offset, 0.5, 8)[:-1])  # 7 levels < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return tuple((levels / levels.max()).tolist())


def dynamic8_levels() -> tuple:
    """The signed 8-bit "dynamic tree" code (Dettmers 2016, "8-Bit Approximations for Parallelism in
    Deep Learning"), which bitsandbytes uses for blockwise 8-bit states and QLoRA for the second level of
    double quantization. For exponent i = 0..6 the decade [10^(i-7), 10^(i-6)) holds 2^i linearly spaced
    values (midpoints of linspace(0.1, 1, 2^i + 1), times 10^(i-6)), each with both signs; plus 0 and 1:
    127 + 127 + 2 = 256 levels. Computed in float32, as bitsandbytes' create_dynamic_map does.
    """
    levels = [0.0, 1.0]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        levels += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return tuple(sorted(levels))


PIECE = 1 << 20  # values encoded at a time by the bin tables


def _bin(x: torch.Tensor, lo: float, inv_width: float, n_bins: int) -> torch.Tensor:
    """The bin of each x, floor((x - lo) / width) in [0, n_bins), as int32: monotone in x."""
    return (x - lo).mul_(inv_width).clamp_(0, n_bins - 1).to(torch.int32)


@lru_cache(maxsize=None)
def _bin_tables(table: tuple, n_bins: int = 256):
    """Nearest-level lookup tables, for encode_nearest without searchsorted (~10x slower on CPU).

    [first level, last level] is cut into ``n_bins`` bins. If no bin holds two midpoints, the nearest level
    of x in bin i is (number of midpoints in the bins before i) + (x > the midpoint in bin i, +inf if none):
    exact whatever the bin arithmetic rounds, since the midpoints are binned by the same monotone function
    as x. Returns (lo, inv_width, below [n_bins] uint8, threshold [n_bins]), or None when two midpoints
    share a bin (dynamic8's 255 crowd near 0)."""
    levels = torch.tensor(table, dtype=torch.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2
    lo, inv_width = float(levels[0]), float(n_bins / (levels[-1] - levels[0]))
    bins = _bin(midpoints, lo, inv_width, n_bins)
    if bins.unique().numel() < bins.numel():
        return None
    below = (bins[None, :] < torch.arange(n_bins)[:, None]).sum(dim=1).to(torch.uint8)
    threshold = torch.full((n_bins,), float("inf")).index_put_((bins.long(),), midpoints)
    return lo, inv_width, below, threshold


@dataclass(frozen=True)
class TableGrid:
    name: str
    table: tuple  # sorted levels

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.table))))

    @property
    def levels(self) -> torch.Tensor:
        return torch.tensor(self.table, dtype=torch.float32)

    @property
    def max_abs(self) -> float:
        return max(abs(v) for v in self.table)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_nearest(x))

    def encode_nearest(self, x: torch.Tensor, dtype: torch.dtype = torch.int64, overwrite: bool = False,
                       bound: float | None = None) -> torch.Tensor:
        """Index of the nearest level of finite x: the number of midpoints below x (ties go down), by the bin
        tables (see _bin_tables) or searchsorted. ``overwrite``, ``bound``: unused (x is only read, nothing
        is clamped)."""
        x = x.float().contiguous()
        tables = _bin_tables(self.table)
        if tables is None:
            levels = self.levels
            return torch.searchsorted((levels[1:] + levels[:-1]) / 2, x).to(dtype)
        lo, inv_width, below, threshold = tables
        flat, codes = x.reshape(-1), torch.empty(x.numel(), dtype=torch.uint8)
        for k in range(0, flat.numel(), PIECE):  # pieces: the five temporaries stay small (cache, malloc's reuse)
            piece = flat[k:k + PIECE]
            i = _bin(piece, lo, inv_width, len(below))
            codes[k:k + PIECE] = below.index_select(0, i).add_(piece > threshold.index_select(0, i))
        return codes.reshape(x.shape).to(dtype)

    def encode(self, values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return self.encode_nearest(values).to(dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.levels[codes.to(torch.int64)]
