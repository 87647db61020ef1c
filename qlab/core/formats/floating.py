"""Binary floating-point grids: fp16, bf16, FP8 (E4M3, E5M2) and FP4 (E2M1).

A value with sign s, exponent field E and mantissa field M is

    normal     (E > 0):  (-1)^s * (1 + M / 2^m) * 2^(E - bias)
    subnormal  (E = 0):  (-1)^s * (M / 2^m)     * 2^(1 - bias)

so inside one binade [2^e, 2^(e+1)) the grid is uniform with step 2^(e - m): the spacing grows with
the magnitude and the *relative* precision stays about 2^-m. What the top exponent means differs:

* ``ieee``: E all ones is inf (M = 0) or NaN (fp16, bf16, E5M2);
* ``fn``:   only E and M all ones is NaN, everything else is finite (E4M3 "fn": max 448, no inf);
* ``none``: every code is a finite number (E2M1 from the OCP MX spec: max 6).

Rounding is round-to-nearest, ties to even, and saturates at +-max (as FP8 quantization recipes do;
torch's own cast saturates for E4M3 and overflows to inf for E5M2).

>>> FloatGrid("fp8_e4m3", 4, 3, 7, 448.0).round(torch.tensor([0.3, 500.0]))
tensor([  0.3125, 448.0000])
"""
from dataclasses import dataclass
from functools import lru_cache
import math

from numba import njit
import numpy as np
import torch

try:
    from qlab.core import _cpu  # qlab/core/_cpu.c (e4m3_codes), absent when no C compiler built it
except ImportError:
    _cpu = None

# Grids torch has a dtype for: rounding and encoding are its cast (round to nearest even, bit for bit the
# arithmetic below: tests/core/formats/test_floating.py checks the two agree), 10-30x faster.
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp16": torch.float16,
                "bf16": torch.bfloat16}


@njit(cache=True, error_model="numpy")
def _e4m3_run(x, s, out):
    """``out[j]`` = the E4M3 code of the float32 x[j] / s, rounded to nearest even, saturating at +-448 (inf
    too), NaN to 0x7F (with its sign): the bits of torch's cast (c10's fp8e4m3fn_from_fp32_value, checked on all
    2^32 floats) of the clamped quotient. Branch-free on a contiguous run, so that it vectorises."""
    for j in range(x.shape[0]):
        v = x[j] / s
        w = np.int32(np.float32(v).view(np.int32))
        a = w & 0x7FFFFFFF  # |v|'s bits
        sub = np.int32(np.rint(abs(v) * np.float32(512)))  # below 2^-6: subnormal steps of 2^-9
        # normal: rebias the exponent (127 -> 7) and round the mantissa's 20 dropped bits, ties to even;
        # a carry into 0x7F (NaN) saturates, as everything from 480 on
        normal = min((a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20, 0x7E)
        big = 0x7F if a > 0x7F800000 else 0x7E  # NaN, or >= 480 and inf
        code = big if a >= 0x43F00000 else (sub if a < (121 << 23) else normal)
        out[j] = code | ((w >> 24) & 0x80)


@njit(cache=True, error_model="numpy")
def _e4m3_codes(G, scale, out):
    """``out[g, j]`` = the E4M3 code of G[g, j] / scale[g] (``_e4m3_run``), row by row (a loop over a row's
    slice vectorises; numba's parallel loops are not used: their OpenMP layer slows torch's own threads)."""
    for g in range(G.shape[0]):
        _e4m3_run(G[g], scale[g], out[g])


def e4m3_codes(G: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 codes (uint8) of G / scale[:, None] for float32 groups G [n_groups, len] on the CPU: what
    ``FloatGrid('fp8_e4m3').encode_nearest(G / scale[:, None])`` gives, in one pass and no float temporary
    (torch's divide, then its cast: ~3x the time at 576 x 1536); in C on torch's threads when qlab.core._cpu
    is built."""
    out = np.empty(tuple(G.shape), dtype=np.uint8)
    G_, scale_ = G.detach().contiguous().numpy(), scale.detach().float().contiguous().numpy()
    if _cpu is not None:  # the same loop in C, on torch's threads
        _cpu.e4m3_codes(G_, G_.shape[1], scale_, out, torch.get_num_threads())
    else:
        _e4m3_codes(G_, scale_, out)
    return torch.from_numpy(out)


@lru_cache(maxsize=None)
def _fp8_values(dtype: torch.dtype) -> torch.Tensor:
    """The float32 value of each of the 256 codes of an 8-bit torch dtype (by torch's own cast)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()


@dataclass(frozen=True)
class FloatGrid:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def specials(self) -> str:
        return {"fp8_e4m3": "fn", "fp4_e2m1": "none"}.get(self.name, "ieee")

    @property
    def max_abs(self) -> float:
        return self.max

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def max_step(self) -> float:
        """The spacing of the top binade, the one max sits in: 32 for E4M3 (448 = 1.75 * 2^8), 8192 for E5M2."""
        return 2.0 ** (math.frexp(self.max)[1] - 1 - self.man_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1.0 and the next representable value."""
        return 2.0 ** -self.man_bits

    def round(self, x: torch.Tensor) -> torch.Tensor:
        dtype = TORCH_DTYPES.get(self.name)
        if dtype is not None and self.bits == 8:
            return self.decode(self.encode_nearest(x))
        if dtype is not None:  # saturate first: torch's cast gives NaN (E4M3) or inf (E5M2) beyond the max
            return torch.clamp(x.float(), -self.max, self.max).to(dtype).float()
        return self.round_arithmetic(x)

    def encode_nearest(self, x: torch.Tensor, dtype: torch.dtype = torch.int64, overwrite: bool = False,
                       bound: float | None = None) -> torch.Tensor:
        """The code of the nearest value (ties to even, saturating): encode(round(x)), for FP8 straight from
        torch's cast. ``overwrite=True`` saturates in place in x (a float32 temporary the caller no longer needs).
        ``bound``: a B >= max|x| the caller knows; below max + half a step (464 for E4M3, 61440 for E5M2) the
        cast itself rounds to max, and the saturating clamp (a pass over x) is left out."""
        torch_dtype = TORCH_DTYPES.get(self.name)
        if torch_dtype is not None and self.bits == 8:
            if bound is None or not bound < self.max + self.max_step / 2:
                x = x.clamp_(-self.max, self.max) if overwrite and not x.requires_grad and x.dtype == torch.float32 \
                    else torch.clamp(x.float(), -self.max, self.max)
            return x.float().to(torch_dtype).view(torch.uint8).to(dtype)
        return self.encode(self.round(x), dtype)

    def round_arithmetic(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest value, ties to even, saturating: the format's arithmetic spelled out (any e, m)."""
        a = torch.clamp(x.abs().float(), max=self.max)
        _, exp = torch.frexp(a)  # a = mant * 2^exp with mant in [0.5, 1): floor(log2 a) = exp - 1
        e = torch.clamp(exp - 1, min=1 - self.bias)  # below the normal range the step stays fixed
        step = torch.ldexp(torch.ones_like(a), e - self.man_bits)
        r = torch.round(a / step) * step  # a/step is exact (power of two); torch.round ties to even
        return torch.copysign(torch.clamp(r, max=self.max), x.float())

    def encode(self, values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Codes of representable values, as ``dtype`` (uint8 holds them when bits <= 8)."""
        torch_dtype = TORCH_DTYPES.get(self.name)
        if torch_dtype is not None and self.bits == 8:  # the bit pattern is the code
            return values.float().to(torch_dtype).view(torch.uint8).to(dtype)
        return self.encode_arithmetic(values).to(dtype)

    def encode_arithmetic(self, values: torch.Tensor) -> torch.Tensor:
        """Sign, exponent and mantissa fields of representable values, assembled into the code."""
        v = values.float()
        a = v.abs()
        m = self.man_bits
        sign = torch.signbit(v).to(torch.int64)
        _, exp = torch.frexp(a)
        subnormal = a < self.min_normal
        E = torch.where(subnormal, torch.zeros_like(exp), exp - 1 + self.bias).to(torch.int64)
        M_sub = torch.ldexp(a, torch.full_like(exp, self.bias - 1 + m))
        M_norm = torch.ldexp(a, (self.bias + m - E).to(torch.int32)) - 2**m
        M = torch.where(subnormal, M_sub, M_norm).to(torch.int64)
        return (sign << (self.exp_bits + m)) | (E << m) | M

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        dtype = TORCH_DTYPES.get(self.name)
        if dtype is not None and self.bits == 8:  # a 256-entry table: torch's FP8 -> fp32 cast is ~20x slower
            index = codes.reshape(-1).to(torch.int32)
            return _fp8_values(dtype).index_select(0, index).reshape(codes.shape)
        return self.decode_arithmetic(codes)

    def decode_arithmetic(self, codes: torch.Tensor) -> torch.Tensor:
        """The value of each code from its sign, exponent and mantissa fields (NaN/inf by the format's rules)."""
        c = codes.to(torch.int64)
        m, e_all = self.man_bits, 2**self.exp_bits - 1
        sign = (c >> (self.exp_bits + m)) & 1
        E = (c >> m) & e_all
        M = c & (2**m - 1)
        significand = torch.where(E == 0, M, M + 2**m).to(torch.float32)
        exponent = torch.where(E == 0, 1, E) - self.bias - m
        value = torch.ldexp(significand, exponent.to(torch.int32))
        if self.specials == "ieee":
            value = torch.where(E == e_all, torch.where(M == 0, torch.inf, torch.nan), value)
        elif self.specials == "fn":
            value = torch.where((E == e_all) & (M == 2**m - 1), torch.nan, value)
        return torch.where(sign == 1, -value, value)

    @property
    def levels(self) -> torch.Tensor:
        """Every finite value of the grid, sorted (for 16-bit formats: 65k values)."""
        values = self.decode(torch.arange(2**self.bits))
        return torch.unique(values[torch.isfinite(values)])
