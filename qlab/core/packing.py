"""Packing b-bit codes into bytes, as a little-endian bit stream.

Codes are laid out in row-major order of the tensor; code i occupies bits [b*i, b*(i+1)) of the
stream, and byte k holds stream bits [8k, 8k+8) with the lowest bit first. For 4 bits this is the
familiar "two codes per byte, the first in the low nibble":

>>> pack(torch.tensor([1, 2, 15]), bits=4)
tensor([ 33,  15], dtype=torch.uint8)

(33 = 0x21: code 1 in the low nibble, code 2 in the high one; 15 then pads with a zero nibble.)
Widths that do not divide 8 (3, 5, 6, 7 bits) straddle byte boundaries: eight codes fill exactly
``bits`` bytes, which is how the packing below works for every width at once.
"""
import math

from numba import njit
import numpy as np
import torch


def packed_nbytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


@njit(cache=True, error_model="numpy")
def _pack_nibbles(c, out):
    """Byte j = code 2j | code 2j+1 << 4 (uint8 codes below 16); an odd count leaves the last high nibble 0."""
    n = c.shape[0]
    for j in range(n // 2):
        out[j] = c[2 * j] | (c[2 * j + 1] << 4)
    if n % 2:
        out[n // 2] = c[n - 1]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n * bits / 8) bytes."""
    if not (1 <= bits <= 8 or bits == 16):
        raise ValueError(f"can pack 1 to 8 or 16 bits per code, got {bits}")
    c = codes.reshape(-1)
    if c.numel() and not (bits == 8 and c.dtype == torch.uint8):  # every uint8 is an 8-bit code
        lo, hi = torch.aminmax(c)
        if int(lo) < 0 or int(hi) >= 2**bits:  # as Python ints: 2**8 does not fit a uint8 tensor
            raise ValueError(f"codes must lie in [0, {2**bits}) to be packed in {bits} bits")
    n = c.numel()
    if bits == 8:
        return c.to(torch.uint8)
    if bits == 4 and c.device.type == "cpu":  # one compiled pass (strided torch ops on the pairs: ~25x slower)
        out = np.empty(packed_nbytes(n, 4), dtype=np.uint8)
        _pack_nibbles(c.to(torch.uint8).contiguous().numpy(), out)
        return torch.from_numpy(out)
    if bits in (1, 2, 4):  # whole codes per byte: the same stream, in byte arithmetic (no 64-bit words)
        per_byte = 8 // bits
        c = c.to(torch.uint8)
        if n % per_byte:
            c = torch.nn.functional.pad(c, (0, (-n) % per_byte))
        c = c.reshape(-1, per_byte)
        out = c[:, 0].clone()
        for k in range(1, per_byte):  # code k of each byte at bits [k·bits, (k+1)·bits)
            out |= c[:, k] << (bits * k)
        return out
    c = c.to(torch.int64)
    if bits == 16:  # two bytes per code, low byte first
        return torch.stack([c & 0xFF, c >> 8], dim=1).reshape(-1).to(torch.uint8)
    c = torch.nn.functional.pad(c, (0, (-n) % 8)).reshape(-1, 8)  # 8 codes -> exactly `bits` bytes
    word = (c << (bits * torch.arange(8))).sum(dim=1)  # <= 56 bits, fits in int64
    out = (word[:, None] >> (8 * torch.arange(bits))) & 0xFF
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes as int64 (or ``dtype``: uint8 holds codes of <= 8 bits
    in an eighth of the memory)."""
    p = packed.reshape(-1)
    if p.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{p.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if dtype == torch.uint8 and bits > 8:
        raise ValueError(f"{bits}-bit codes do not fit in uint8; unpack them as int64")
    if bits == 8:
        return p.to(dtype)
    if bits in (1, 2, 4):  # whole codes per byte: byte arithmetic, one conversion at the end
        shifts = bits * torch.arange(8 // bits, dtype=torch.uint8)
        return ((p.to(torch.uint8)[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n].to(dtype)
    if bits == 16:
        p = p.to(torch.int64).reshape(-1, 2)
        return p[:, 0] | (p[:, 1] << 8)
    p = torch.nn.functional.pad(p.to(torch.int64), (0, (-p.numel()) % bits)).reshape(-1, bits)
    word = (p << (8 * torch.arange(bits))).sum(dim=1)
    codes = (word[:, None] >> (bits * torch.arange(8))) & (2**bits - 1)
    return codes.reshape(-1)[:n].to(dtype)
