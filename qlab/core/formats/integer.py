"""Uniform integer grids.

A b-bit integer grid is the integers qmin..qmax:

* unsigned (used with a zero point, "asymmetric"): [0, 2^b - 1], e.g. uint4 = 0..15;
* signed, full range:  [-2^(b-1), 2^(b-1) - 1], e.g. int8 = -128..127;
* signed, restricted:  [-(2^(b-1) - 1), 2^(b-1) - 1], e.g. int8 = -127..127, symmetric around 0.

Codes are stored unsigned ("offset binary"): code = q - qmin, so int4's -8..7 is stored as 0..15.
"""
from dataclasses import dataclass

from numba import njit
import numpy as np
import torch

try:
    from qlab.core import _cpu  # qlab/core/_cpu.c (int_codes), absent when no C compiler built it
except ImportError:
    _cpu = None


@dataclass(frozen=True)
class IntGrid:
    bits: int
    signed: bool = True
    restricted: bool = False

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"integer grids have 1 to 8 bits, got bits={self.bits}")
        if self.restricted and (not self.signed or self.bits < 2):
            raise ValueError("the restricted range needs a signed grid of at least 2 bits")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.restricted else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def max_abs(self) -> float:
        # absmax scaling maps max|x| onto qmax (the positive end), as in scale = absmax / 127 for int8
        return float(self.qmax)

    @property
    def levels(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest integer (ties to even, like torch.round), clamped to [qmin, qmax]."""
        return torch.round(x).clamp_(self.qmin, self.qmax)  # in place on round's fresh tensor

    def encode_nearest(self, x: torch.Tensor, dtype: torch.dtype = torch.int64, overwrite: bool = False,
                       bound: float | None = None) -> torch.Tensor:
        """The code of the nearest grid value: encode(round(x)). ``overwrite=True`` rounds in place in x (a
        float temporary the caller no longer needs), saving a tensor of x's size; never when x needs a gradient.
        ``bound``: a B >= max|x| the caller knows; below min(qmax, -qmin) + 1/2 nothing rounds off the grid
        and the clamp (a pass over x) is left out."""
        q = torch.round(x, out=x) if overwrite and not x.requires_grad else torch.round(x)
        if bound is None or not bound < min(self.qmax, -self.qmin) + 0.5:
            q = q.clamp_(self.qmin, self.qmax)
        if dtype != torch.uint8:
            return q.sub_(self.qmin).to(dtype)
        # torch converts float -> int8 ~3x faster than float -> uint8. The int8 byte of q + shift (shift
        # moves uint8's 0..255 into -128..127), read as unsigned and plus (-shift - qmin) modulo 256 (uint8
        # arithmetic wraps), is the code q - qmin.
        shift = -128 if self.qmax > 127 else 0
        if shift:
            q = q.add_(shift)  # exact: small integers
        codes = q.to(torch.int8).view(torch.uint8)
        return codes.add_((-shift - self.qmin) % 256) if (shift + self.qmin) % 256 else codes

    def encode(self, values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Codes q - qmin of grid values q, as ``dtype`` (uint8 holds every code: grids have <= 8 bits)."""
        return (values - self.qmin).to(dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid values q = code + qmin as float32 (exact: small integers), in a fresh tensor."""
        if self.qmin == 0:
            return codes.to(torch.float32, copy=True)
        if codes.dtype == torch.uint8:  # code + qmin modulo 256 (uint8 wraps) is q's int8 byte: a byte pass, not a float one
            return (codes + self.qmin % 256).view(torch.int8).to(torch.float32)
        return codes.to(torch.float32, copy=True).add_(self.qmin)


@njit(cache=True, error_model="numpy")
def _int_codes(G, scale, zero_point, qmin, qmax, out):
    """``out[g, j]`` = clamp(round(G[g, j] / scale[g] + zero_point[g]), qmin, qmax) - qmin, in float32, rounded to
    nearest even: the bits of IntGrid.encode_nearest (torch's divide, add and round are the same float32
    operations). Row by row, as floating.py's _e4m3_codes."""
    for g in range(G.shape[0]):
        s, z = scale[g], zero_point[g]
        for j in range(G.shape[1]):
            v = np.rint(G[g, j] / s + z)
            out[g, j] = np.uint8(np.int32(min(max(v, qmin), qmax) - qmin))


def int_codes(G: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: IntGrid) -> torch.Tensor:
    """The codes (uint8) of G / scale[:, None] + zero_point[:, None] on ``grid``, for float32 groups G [n_groups,
    len] on the CPU: what ``grid.encode_nearest`` gives for that quotient, in one pass and no float temporary
    (torch's divide, add, round and cast: four passes); in C on torch's threads when qlab.core._cpu is built."""
    out = np.empty(tuple(G.shape), dtype=np.uint8)
    G_, scale_ = G.detach().contiguous().numpy(), scale.detach().float().contiguous().numpy()
    zp = None if zero_point is None else zero_point.detach().float().contiguous().numpy()
    qmin, qmax = np.float32(grid.qmin), np.float32(grid.qmax)
    if _cpu is not None:
        _cpu.int_codes(G_, G_.shape[1], scale_, zp, qmin, qmax, out, torch.get_num_threads())
    else:
        _int_codes(G_, scale_, np.zeros_like(scale_) if zp is None else zp, qmin, qmax, out)
    return torch.from_numpy(out)
