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
from numba import njit

from qlab.gguf.blocks import BlockFormat, register, f16_field, read_f16
from qlab.gguf.search import F32, _signed_max, make_qx_quants, make_qkx_quants

I32 = np.int32


def _importance(x, qw, sigma2):
    return (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


# ---------------------------------------------------------------- fp16 fields written inside the loops

@njit(cache=True, error_model="numpy")
def f16_bits(v):
    """The IEEE half of float32 ``v`` as its 16 bits: round to nearest even, as numpy and ggml (F16C) do;
    beyond 65504 (from 65520 on) inf, NaN stays NaN (0x7E00)."""
    w = np.float32(v).view(np.uint32)
    sign = (w >> 16) & 0x8000
    a = w & 0x7FFFFFFF                       # |v|'s bits
    if a >= 0x7F800000:                      # inf or NaN
        return sign | (0x7C00 if a == 0x7F800000 else 0x7E00)
    if a >= 0x477FF000:                      # >= 65520: rounds past 65504
        return sign | 0x7C00
    if a >= 0x38800000:                      # >= 2^-14: a normal half, rebias the exponent (127 -> 15)
        h, rest, half = (a >> 13) - 0x1C000, a & 0x1FFF, 0x1000
    else:                                    # a subnormal half (or 0): the mantissa with its hidden bit,
        e = a >> 23                          # shifted onto the half's unit 2^-24
        if e < 102:                          # below 2^-25: rounds to 0
            return sign
        shift = 126 - e
        m = (a & 0x7FFFFF) | 0x800000
        h, rest, half = m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1)
    h += (rest > half) | ((rest == half) & (h & 1))  # ties to even, without a branch (a carry into the
    return sign | h                                   # exponent is right); a branch here costs ~4x


@njit(cache=True, error_model="numpy", inline="always")
def _put_f16(ob, at, v):
    """Store ``v`` as a little-endian half at byte ``at``; False when it is inf or NaN there."""
    h = f16_bits(v)
    ob[at], ob[at + 1] = h & 0xFF, h >> 8
    return (h & 0x7C00) != 0x7C00


# ---------------------------------------------------------------- compiled block loops (llama.cpp's *_ref)
# One pass per block, as the C: find the range, code each value, write the bytes. Q4_0/Q5_0/Q4_1/Q5_1 write
# their fp16 fields (d, m) themselves (f16_bits); Q8_0 returns float32 d, stored afterwards by np.float16
# (which rounds like ggml).

@njit(cache=True, error_model="numpy", inline="always")
def _put_pair(ob, qs_at, qh_at, j, q0, q1, qh):
    """Codes of elements j and j+16: their low nibbles into byte qs_at + j, their bit 4 into qh (Q5)."""
    ob[qs_at + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
    if qh_at >= 0:
        qh |= (((q0 >> 4) & 1) << j) | (((q1 >> 4) & 1) << (j + 16))
    return qh


@njit(cache=True, error_model="numpy")
def _put_qh(ob, qh_at, qh):
    """The Q5 fifth bits as a little-endian uint32 at qh_at (bit k = element k); nothing if qh_at < 0."""
    if qh_at >= 0:
        for k in range(4):
            ob[qh_at + k] = (qh >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy")
def _pack_codes(L, out, qs_at, qh_at):
    """The bytes of codes ``L [B, 32]`` found by a search (the imatrix path)."""
    for b in range(L.shape[0]):
        qh = 0
        for j in range(16):
            qh = _put_pair(out[b], qs_at, qh_at, j, L[b, j], L[b, j + 16], qh)
        _put_qh(out[b], qh_at, qh)


@njit(cache=True, error_model="numpy", inline="always")
def _put_codes(xb, ob, qs_at, qh_at, lo, id_, add, top):
    """Code the 32 values q = min(top, (int)((x - lo)·id + add)) into the block's nibbles at ``qs_at`` (and
    fifth bits at ``qh_at``; None: none, and numba compiles them away). True when a value was NaN."""
    qs, qh, nan = ob[qs_at:qs_at + 16], 0, False
    for j in range(16):   # int32 as the C's (int8_t) cast: int64 conversions keep this loop scalar (2x slower)
        v0, v1 = (xb[j] - lo) * id_ + add, (xb[j + 16] - lo) * id_ + add
        nan |= (v0 != v0) | (v1 != v1)
        q0, q1 = min(top, I32(v0)), min(top, I32(v1))
        qs[j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
        if qh_at is not None:
            qh |= (((q0 >> 4) & 1) << j) | (((q1 >> 4) & 1) << (j + 16))
    if qh_at is not None:
        _put_qh(ob, qh_at, qh)
    return nan


@njit(cache=True, error_model="numpy")
def _symmetric_ref(x, offset, out, qs_at, qh_at):
    """Q4_0 / Q5_0: d = signed extreme / -offset, q = min(2·offset - 1, (int)(x/d + offset + 0.5)); d stored
    as a half at byte 0. True when every x and every half is finite (an inf makes d inf; x - 0 is x, exactly)."""
    top, half = I32(2 * offset - 1), F32(offset) + F32(0.5)
    ok = True
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        _, vmax = _signed_max(xb)
        db = vmax / F32(-offset)
        id_ = F32(1) / db if db != 0 else F32(0)
        nan = _put_codes(xb, ob, qs_at, qh_at, F32(0), id_, half, top)
        ok &= _put_f16(ob, 0, db) & (not nan)
    return ok


@njit(cache=True, error_model="numpy")
def _affine_ref(x, qmax, out, qs_at, qh_at):
    """Q4_1 / Q5_1: d = (max - min)/qmax, q = (int)((x - min)/d + 0.5) (capped at 15 for Q4_1, as the C);
    d and m = min stored as halves at bytes 0 and 2. Returns True when every x and every half is finite:
    an inf lands in the range, so in d or m; a NaN makes its (x - min)/d + 0.5 NaN."""
    top = I32(15 if qmax == 15 else 255)
    ok = True
    for b in range(x.shape[0]):
        xb, ob = x[b], out[b]
        lo, hi = xb[0], xb[0]
        for j in range(1, 32):   # the C's comparisons: on a tie (0.0 vs -0.0) the first one stays
            lo = xb[j] if xb[j] < lo else lo
            hi = xb[j] if xb[j] > hi else hi
        db = (hi - lo) / F32(qmax)
        id_ = F32(1) / db if db != 0 else F32(0)
        nan = _put_codes(xb, ob, qs_at, qh_at, lo, id_, F32(0.5), top)
        ok &= _put_f16(ob, 0, db) & _put_f16(ob, 2, lo) & (not nan)
    return ok


@njit(cache=True, error_model="numpy")
def _q8_0_ref(x, d, out):
    """Q8_0: d = max|x|/127, q = roundf(x/d) (half away from zero), stored as int8 from byte 2."""
    for b in range(x.shape[0]):
        xb = x[b]
        amax = F32(0)
        for j in range(32):
            amax = max(amax, abs(xb[j]))
        db = amax / F32(127)
        idb = F32(1) / db if db != 0 else F32(0)
        for j in range(32):
            v = xb[j] * idb
            t = F32(int(v))                                  # roundf without the v + 0.5 rounding trap:
            out[b, 2 + j] = (int(t) + int(F32(2) * (v - t))) & 0xFF   # trunc(v) + trunc(2·frac(v))
        d[b] = db


# ---------------------------------------------------------------- decoding loops
# One pass per block, each output written once, with the float32 operations of ggml's dequantize_row_*
# (and of the gguf package's numpy): byte j holds element j (low nibble) and j + 16 (high one). d and m are
# the blocks' fp16 fields as float32 [B]; outputs allocated by numpy (huge pages for large arrays).

@njit(cache=True, error_model="numpy")
def _decode_q4_0(data, d, out):
    """Q4_0: x = (q - 8)·d (ggml's dequantize_row_q4_0)."""
    for b in range(data.shape[0]):
        qs, ob = data[b, 2:], out[b]
        for j in range(16):
            ob[j] = F32(np.int32(qs[j] & 0xF) - 8) * d[b]
            ob[j + 16] = F32(np.int32(qs[j] >> 4) - 8) * d[b]


@njit(cache=True, error_model="numpy")
def _decode_q5_0(data, d, out):
    """Q5_0: x = (q - 16)·d, q's bit 4 = bit k of the little-endian uint32 qh (ggml's dequantize_row_q5_0)."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        qh = np.int64(blk[2]) | (np.int64(blk[3]) << 8) | (np.int64(blk[4]) << 16) | (np.int64(blk[5]) << 24)
        qs = blk[6:]
        for j in range(16):
            ob[j] = F32(((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - 16) * d[b]
            ob[j + 16] = F32(((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16) * d[b]


@njit(cache=True, error_model="numpy")
def _decode_q4_1(data, d, m, out):
    """Q4_1: x = q·d + m, two float32 roundings (ggml's dequantize_row_q4_1)."""
    for b in range(data.shape[0]):
        qs, ob = data[b, 4:], out[b]
        for j in range(16):
            ob[j] = F32(qs[j] & 0xF) * d[b] + m[b]
            ob[j + 16] = F32(qs[j] >> 4) * d[b] + m[b]


@njit(cache=True, error_model="numpy")
def _decode_q5_1(data, d, m, out):
    """Q5_1: x = q·d + m, q's bit 4 = bit k of the little-endian uint32 qh (ggml's dequantize_row_q5_1)."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        qh = np.int64(blk[4]) | (np.int64(blk[5]) << 8) | (np.int64(blk[6]) << 16) | (np.int64(blk[7]) << 24)
        qs = blk[8:]
        for j in range(16):
            ob[j] = F32((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) * d[b] + m[b]
            ob[j + 16] = F32((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) * d[b] + m[b]


@njit(cache=True, error_model="numpy")
def _decode_q8_0(data, d, out):
    """Q8_0: x = q·d, q the int8 at byte 2 + j (``data`` viewed as int8; ggml's dequantize_row_q8_0)."""
    for b in range(data.shape[0]):
        qs, ob = data[b, 2:], out[b]
        for j in range(32):
            ob[j] = F32(qs[j]) * d[b]


class _Legacy(BlockFormat):
    """Blocks of 32 codes: nibbles at byte ``qs_at``, the Q5 fifth bits at ``qh_at`` (-1: none)."""

    bits: int
    qs_at: int
    qh_at: int = -1

    def _pack(self, L, out):
        _pack_codes(np.ascontiguousarray(L, dtype=np.int64), out, self.qs_at, self.qh_at)


class _Symmetric(_Legacy):
    """Q4_0 / Q5_0: x = d·(q - offset), d = signed extreme / -offset."""

    f16_offsets = (0,)

    @property
    def offset(self):
        return 1 << (self.bits - 1)

    def quantize_ref(self, blocks, out):
        return _symmetric_ref(blocks, self.offset, out, self.qs_at, None if self.qh_at < 0 else self.qh_at)

    def quantize_blocks(self, x, qw, sigma2):
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        if qw is None:
            self.quantize_ref(np.ascontiguousarray(x, dtype=F32), out)  # non-finite halves: refused by quantize_rows
            return out
        d, L = make_qx_quants(x, self.offset, _importance(x, qw, sigma2))
        self._pack(L, out)
        f16_field(out, 0)[:] = d
        return out

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], 32), F32)
        self.decode(data, read_f16(data, 0), out)
        return out


@register
class Q4_0(_Symmetric):
    name, bits, ggml_type, qs_at = "Q4_0", 4, T.Q4_0, 2
    decode = staticmethod(_decode_q4_0)


@register
class Q5_0(_Symmetric):
    name, bits, ggml_type, qs_at, qh_at = "Q5_0", 5, T.Q5_0, 6, 2
    decode = staticmethod(_decode_q5_0)


class _Affine(_Legacy):
    """Q4_1 / Q5_1: x = d·q + m, d = (max - min)/(2^bits - 1), m = min."""

    f16_offsets = (0, 2)

    def quantize_ref(self, blocks, out):
        return _affine_ref(blocks, (1 << self.bits) - 1, out, self.qs_at, None if self.qh_at < 0 else self.qh_at)

    def quantize_blocks(self, x, qw, sigma2):
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        if qw is None:
            self.quantize_ref(np.ascontiguousarray(x, dtype=F32), out)  # non-finite halves: refused by quantize_rows
            return out
        d, neg_min, L = make_qkx_quants(x, (1 << self.bits) - 1, _importance(x, qw, sigma2), -0.9, 0.05, 36, False)
        self._pack(L, out)  # Q5_1: the C stores (uint8_t) codes, then masks nibble and bit 4
        f16_field(out, 0)[:], f16_field(out, 2)[:] = d, -neg_min
        return out

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], 32), F32)
        self.decode(data, read_f16(data, 0), read_f16(data, 2), out)
        return out


@register
class Q4_1(_Affine):
    name, bits, ggml_type, qs_at = "Q4_1", 4, T.Q4_1, 4
    decode = staticmethod(_decode_q4_1)


@register
class Q5_1(_Affine):
    name, bits, ggml_type, qs_at, qh_at = "Q5_1", 5, T.Q5_1, 8, 4
    decode = staticmethod(_decode_q5_1)


@register
class Q8_0(BlockFormat):
    """x = d·q, d = absmax/127, q = roundf(x/d) (half away from zero). 34 bytes / 32 = 8.5 bpw."""

    name, ggml_type = "Q8_0", T.Q8_0
    f16_offsets = (0,)

    def quantize_blocks(self, x, qw, sigma2):
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        d = np.empty(x.shape[0], F32)
        _q8_0_ref(np.ascontiguousarray(x, dtype=F32), d, out)
        f16_field(out, 0)[:] = d
        return out

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], 32), F32)
        _decode_q8_0(np.ascontiguousarray(data).view(np.int8), read_f16(data, 0), out)
        return out
