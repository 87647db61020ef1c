"""One-pass decoders of packed 4-bit codes (and of 8-bit integer codes): each byte read once, its values
written already scaled.

``QuantizedTensor.dequantize`` of a 4-bit grid (NF4, FP4, int4) otherwise looks the values up (one pass
writing float32) and then scales them in place (a second pass over the same memory). When every scale
covers a run of ``L`` consecutive values of the flattened tensor (per block, per tensor, per row, or groups
along the last dim that divide it) and ``L`` is even, no group starts inside a byte, and one loop does it:

    x_hat[2j]   = (table[byte_j & 15] - zero_point) * scale        (or table[.] * scale + minimum)
    x_hat[2j+1] = (table[byte_j >> 4] - zero_point) * scale

with the same float32 operations, in the same order, as the two-pass path: the same bits.

Both loops run in C on torch's threads when the extension ``qlab.core._cpu`` is built (``pip install``
compiles it): there AVX-512's 16-lane permute looks 16 codes up at once, an instruction numba does not emit.
Without it, the numba loops below run on one thread, with the same bits.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from qlab.core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken

try:
    from qlab.core import _cpu  # qlab/core/_cpu.c, absent when no C compiler built it
except ImportError:
    _cpu = None


def run_length(gran, shape) -> int | None:
    """How many consecutive values of the flattened tensor share one scale (the last run may be shorter),
    or None when the groups are not such runs (groups along another axis, padded groups inside the tensor)."""
    n = math.prod(shape)
    if not shape or n == 0:
        return None
    if isinstance(gran, PerBlock):
        return gran.size
    if isinstance(gran, PerTensor):
        return n
    if isinstance(gran, PerToken):
        return shape[-1]
    if isinstance(gran, PerGroup) and gran.axis == -1 and shape[-1] % gran.size == 0:
        return gran.size
    if isinstance(gran, PerChannel) and gran.axis in (0, -len(shape)):
        return n // shape[0]
    return None


@njit(cache=True, error_model="numpy", inline="always")
def _scaled(v, s, zp, mn, zero_point, minimum):
    """One value, as the two-pass path computes it: q·scale + minimum, (q - zero_point)·scale or q·scale
    (``zero_point`` / ``minimum`` None: numba compiles the branch away)."""
    if minimum is not None:
        return v * s + mn
    if zero_point is not None:
        return (v - zp) * s
    return v * s


@njit(cache=True, error_model="numpy")
def _decode4(packed, table, L, scale, zero_point, minimum, out):
    """``out[k]`` for every k: code k is nibble k & 1 of byte k >> 1 (low first), its group k // L (L even)."""
    n = out.shape[0]
    for g in range(scale.shape[0]):
        s = scale[g]
        zp = zero_point[g] if zero_point is not None else np.float32(0)
        mn = minimum[g] if minimum is not None else np.float32(0)
        start, stop = g * L, min(n, (g + 1) * L)
        pb, ob = packed[start >> 1:stop >> 1], out[start:stop]  # this group's bytes and values (slices: ~30% faster)
        for j in range(pb.shape[0]):
            b = pb[j]
            ob[2 * j] = _scaled(table[b & 15], s, zp, mn, zero_point, minimum)
            ob[2 * j + 1] = _scaled(table[b >> 4], s, zp, mn, zero_point, minimum)
        if stop & 1:  # an odd count: the last byte holds one code, in its low nibble
            out[stop - 1] = _scaled(table[packed[stop >> 1] & 15], s, zp, mn, zero_point, minimum)


@njit(cache=True, error_model="numpy")
def _decode8(codes, table, L, scale, zero_point, minimum, out):
    """``out[k]`` for every k: grid value table[code_k], its group k // L."""
    n = out.shape[0]
    for g in range(scale.shape[0]):
        s = scale[g]
        zp = zero_point[g] if zero_point is not None else np.float32(0)
        mn = minimum[g] if minimum is not None else np.float32(0)
        start, stop = g * L, min(n, (g + 1) * L)
        cb, ob = codes[start:stop], out[start:stop]
        for j in range(cb.shape[0]):
            ob[j] = _scaled(table[cb[j]], s, zp, mn, zero_point, minimum)


def _empty(n: int) -> np.ndarray:
    """An uninitialised float32 output of n values starting on a 64-byte boundary (a cache line: unaligned
    512-bit stores each touch two lines; 0.23 against 0.14 ms for the real (576, 1536) layer).
    Below 4 MB from torch's allocator (64-byte aligned; it hands back recently freed memory, still in cache);
    from 4 MB on from numpy's, which asks the kernel for huge pages (madvise): at 4096 x 4096 (64 MB) first
    touching the fresh output costs ~10 ms instead of ~25 ms (512 faults, not 16k)."""
    if n * 4 < 4 << 20:
        return torch.empty(n).numpy()
    base = np.empty(n + 16, dtype=np.float32)
    start = (-base.ctypes.data % 64) // 4
    return base[start:start + n]


def _numpy(t):
    """t as a flat, contiguous float32 numpy array (a view when it is one already), or None."""
    if t is None:
        return None
    if t.dtype != torch.float32 or t.requires_grad:
        t = t.detach().float()
    return t.reshape(-1).numpy()  # (reshape copies a non-contiguous t)


def decode4(packed: torch.Tensor, n: int, table: torch.Tensor, L: int, scale: torch.Tensor,
            zero_point: torch.Tensor | None = None, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n`` values of 4-bit codes packed two per byte, flat float32: ``table`` holds the grid's 16
    values, every ``L`` (even) consecutive ones share an entry of ``scale`` (and ``zero_point`` or ``minimum``)."""
    if L % 2:
        raise ValueError(f"decode4 needs an even run length L (no group may start inside a byte), got {L}; "
                         f"use the two-pass path (values() then dequantize_groups)")
    out = _empty(n)
    p, t, s, zp, mn = packed.contiguous().numpy(), _numpy(table), _numpy(scale), _numpy(zero_point), _numpy(minimum)
    if _cpu is not None:
        _cpu.decode4(p, n, t, L, s, zp, mn, out, torch.get_num_threads())
    else:
        _decode4(p, t, L, s, zp, mn, out)
    return torch.from_numpy(out)


def decode8(codes: torch.Tensor, n: int, table: torch.Tensor, L: int, scale: torch.Tensor,
            zero_point: torch.Tensor | None = None, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n`` values of 8-bit codes (uint8, one per value), flat float32: ``table`` holds the grid's 256 values
    (an integer grid's code + qmin, an FP8 format's floats), scaled as decode4 scales: every ``L`` consecutive ones
    share an entry of ``scale`` (and ``zero_point`` or ``minimum``). One pass; torch's int8 -> float32 conversion
    alone takes longer (~0.3 ns a value, unvectorised), and its FP8 -> float32 cast ~20x longer."""
    out = _empty(n)
    c, t, s = codes.reshape(-1).contiguous().numpy(), _numpy(table), _numpy(scale)
    zp, mn = _numpy(zero_point), _numpy(minimum)
    if _cpu is not None:
        _cpu.decode8(c, n, t, L, s, zp, mn, out, torch.get_num_threads())
    else:
        _decode8(c, t, L, s, zp, mn, out)
    return torch.from_numpy(out)
