"""The legacy GGUF formats: blocks of 32 with one fp16 scale (and for _1 one fp16 min).

    Q4_0  x = d·(q - 8),    q in 0..15   18 bytes / 32  = 4.5 bpw
    Q4_1  x = d·q + m,      q in 0..15   20 bytes / 32  = 5.0 bpw
    Q5_0  x = d·(q - 16),   q in 0..31   22 bytes / 32  = 5.5 bpw
    Q5_1  x = d·q + m,      q in 0..31   24 bytes / 32  = 6.0 bpw
    Q8_0  x = d·q,          q in -127..127  34 bytes / 32 = 8.5 bpw

The symmetric types put the block's signed extreme on the most negative level (d = max/-8 for
Q4_0), so the sign of d follows the outlier and its magnitude uses the extra negative code.
Nibbles are split by halves: byte j holds element j (low nibble) and element j+16 (high nibble);
the Q5 fifth bits live in a 32-bit little-endian word, bit k for element k.

With an importance matrix llama.cpp switches Q4_0/Q5_0 to ``make_qx_quants`` and Q4_1/Q5_1 to
``make_qkx3_quants`` (weights qw·sqrt(σ²_row + x²)); Q8_0 ignores it.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from qlab.gguf.blocks import BlockFormat, register, f16_bytes, read_f16
from qlab.gguf.search import F32, signed_extreme, make_qx_quants, make_qkx_quants


def _trunc(x):
    """C's float -> integer conversion (toward zero)."""
    return np.trunc(x).astype(np.int32)


def _roundf(x):
    """C's ``roundf``: half away from zero, computed without the x+0.5 rounding trap."""
    t = np.trunc(x)
    return (t + np.trunc(F32(2) * (x - t))).astype(np.int32)


def _inv(d):
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _importance(x, qw, sigma2):
    return (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


def _pack_nibbles(q):
    """[B, 32] codes 0..15 -> [B, 16] bytes: low nibble element j, high nibble element j+16."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _unpack_nibbles(qs):
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _pack_high_bits(q):
    """Bit 4 of the 32 codes -> 4 bytes of a little-endian uint32 (bit k = element k)."""
    word = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(word.sum(axis=1, dtype=np.uint32)).view(np.uint8).reshape(-1, 4)


def _unpack_high_bits(qh):
    word = np.ascontiguousarray(qh).view("<u4")[:, :1]
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


class _Symmetric(BlockFormat):
    """Q4_0 / Q5_0: x = d·(q - offset), d = signed extreme / -offset."""

    bits: int

    @property
    def offset(self):
        return 1 << (self.bits - 1)

    def codes(self, x, qw, sigma2):
        if qw is not None:
            d, L = make_qx_quants(x, self.offset, _importance(x, qw, sigma2))
            return d, L.astype(np.int32)
        d = signed_extreme(x) / F32(-self.offset)
        q = _trunc(x * _inv(d)[:, None] + F32(self.offset + 0.5))
        return d, np.minimum(q, 2 * self.offset - 1)

    def dequantize_blocks(self, data):
        d = read_f16(data, 0)
        q = self.stored_codes(data)
        return ((q - self.offset).astype(F32) * d[:, None]).astype(F32)


@register
class Q4_0(_Symmetric):
    name, bits, ggml_type = "Q4_0", 4, T.Q4_0
    f16_offsets = (0,)

    def quantize_blocks(self, x, qw, sigma2):
        d, q = self.codes(x, qw, sigma2)
        return np.concatenate([f16_bytes(d), _pack_nibbles(q)], axis=1)

    def stored_codes(self, data):
        return _unpack_nibbles(data[:, 2:])


@register
class Q5_0(_Symmetric):
    name, bits, ggml_type = "Q5_0", 5, T.Q5_0
    f16_offsets = (0,)

    def quantize_blocks(self, x, qw, sigma2):
        d, q = self.codes(x, qw, sigma2)
        return np.concatenate([f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q & 0xF)], axis=1)

    def stored_codes(self, data):
        return _unpack_nibbles(data[:, 6:]) | (_unpack_high_bits(data[:, 2:6]) << 4)


class _Affine(BlockFormat):
    """Q4_1 / Q5_1: x = d·q + m, d = (max - min)/(2^bits - 1), m = min."""

    bits: int

    def codes(self, x, qw, sigma2):
        qmax = (1 << self.bits) - 1
        if qw is not None:
            d, neg_min, L = make_qkx_quants(x, qmax, _importance(x, qw, sigma2), -0.9, 0.05, 36, False)
            return d, -neg_min, L.astype(np.int32)
        lo, hi = x.min(axis=1), x.max(axis=1)
        d = (hi - lo) / F32(qmax)
        q = _trunc((x - lo[:, None]) * _inv(d)[:, None] + F32(0.5))
        return d, lo, (np.minimum(q, qmax) if self.bits == 4 else q)

    def dequantize_blocks(self, data):
        d, m = read_f16(data, 0), read_f16(data, 2)
        q = self.stored_codes(data).astype(F32)
        return (q * d[:, None] + m[:, None]).astype(F32)


@register
class Q4_1(_Affine):
    name, bits, ggml_type = "Q4_1", 4, T.Q4_1
    f16_offsets = (0, 2)

    def quantize_blocks(self, x, qw, sigma2):
        d, m, q = self.codes(x, qw, sigma2)
        return np.concatenate([f16_bytes(d), f16_bytes(m), _pack_nibbles(q)], axis=1)

    def stored_codes(self, data):
        return _unpack_nibbles(data[:, 4:])


@register
class Q5_1(_Affine):
    name, bits, ggml_type = "Q5_1", 5, T.Q5_1
    f16_offsets = (0, 2)

    def quantize_blocks(self, x, qw, sigma2):
        d, m, q = self.codes(x, qw, sigma2)
        q = q & 0x1F  # the C stores (uint8_t) then masks nibble and bit 4
        return np.concatenate([f16_bytes(d), f16_bytes(m), _pack_high_bits(q), _pack_nibbles(q & 0xF)], axis=1)

    def stored_codes(self, data):
        return _unpack_nibbles(data[:, 8:]) | (_unpack_high_bits(data[:, 4:8]) << 4)


@register
class Q8_0(BlockFormat):
    """x = d·q, d = absmax/127, q = roundf(x/d) (half away from zero). 34 bytes / 32 = 8.5 bpw."""

    name, ggml_type = "Q8_0", T.Q8_0
    f16_offsets = (0,)

    def quantize_blocks(self, x, qw, sigma2):
        d = np.abs(x).max(axis=1) / F32(127)
        q = _roundf(x * _inv(d)[:, None]).astype(np.int8)
        return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)

    def dequantize_blocks(self, data):
        d = read_f16(data, 0)
        q = np.ascontiguousarray(data[:, 2:]).view(np.int8).astype(F32)
        return (q * d[:, None]).astype(F32)
