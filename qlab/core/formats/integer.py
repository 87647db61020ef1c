"""Uniform integer grids.

A b-bit integer grid is the integers qmin..qmax:

* unsigned (used with a zero point, "asymmetric"): [0, 2^b - 1], e.g. uint4 = 0..15;
* signed, full range:  [-2^(b-1), 2^(b-1) - 1], e.g. int8 = -128..127;
* signed, restricted:  [-(2^(b-1) - 1), 2^(b-1) - 1], e.g. int8 = -127..127, symmetric around 0.

Codes are stored unsigned ("offset binary"): code = q - qmin, so int4's -8..7 is stored as 0..15.
"""
from dataclasses import dataclass

import torch


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

    def encode_nearest(self, x: torch.Tensor, dtype: torch.dtype = torch.int64, overwrite: bool = False) -> torch.Tensor:
        """The code of the nearest grid value: encode(round(x)). ``overwrite=True`` rounds in place in x (a
        float temporary the caller no longer needs), saving a tensor of x's size; never when x needs a gradient."""
        q = torch.round(x, out=x) if overwrite and not x.requires_grad else torch.round(x)
        return q.clamp_(self.qmin, self.qmax).sub_(self.qmin).to(dtype)

    def encode(self, values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Codes q - qmin of grid values q, as ``dtype`` (uint8 holds every code: grids have <= 8 bits)."""
        return (values - self.qmin).to(dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32, copy=True).add_(self.qmin)  # exact: codes and qmin are small integers
