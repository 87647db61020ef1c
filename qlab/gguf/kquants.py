"""The k-quants: super-blocks of 256 values whose sub-block scales are themselves quantized.

One super-block = 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 sub-blocks of 32 (Q4_K, Q5_K).
Each sub-block has a small integer scale (and min); one fp16 ``d`` (and ``dmin``) per super-block
turns those integers back into floats. Layouts (``block_qN_K`` in ggml-common.h):

    Q2_K  scales[16] (4-bit scale | 4-bit min), qs[64] (2-bit), d, dmin   84 B  -> 2.625 bpw
          x = d·sc·q - dmin·m
    Q3_K  hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 × 6-bit), d   110 B -> 3.4375 bpw
          x = d·(sc - 32)·(q - 4)
    Q4_K  d, dmin, scales[12] (8 × 6-bit scale + 8 × 6-bit min), qs[128] (4-bit)   144 B -> 4.5 bpw
          x = d·sc·q - dmin·m
    Q5_K  d, dmin, scales[12], qh[32] (5th bit), qs[128]   176 B -> 5.5 bpw
    Q6_K  ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d   210 B -> 6.5625 bpw
          x = d·sc·(q - 32)

Bits are interleaved for SIMD: in Q4_K byte l of chunk c (64 values) holds value 64c+l in its low
nibble and 64c+32+l in its high nibble; in Q2_K/Q3_K byte l of half h holds values
128h + 32j + l in bits 2j..2j+1 (j = 0..3).

Quantization follows llama.cpp: the reference path (``quantize_row_qN_K_ref``) when no importance
matrix is given, the ``_impl`` path (``make_qkx3_quants`` + ``make_qp_quants`` for the sub-block
scales) when one is.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from qlab.gguf.blocks import BlockFormat, register, f16_bytes, f16_field, f16_round, read_f16, QK_K
from qlab.gguf.search import (F32, GROUP_MAX_EPS, nearest_int, seqsum, signed_extreme,
                              make_qx_quants, make_q3_quants, make_qkx_quants, make_qp_quants)


def _u8(v):
    """C's conversion of an int to uint8_t (wraps modulo 256)."""
    return (v.astype(np.int64) & 0xFF)


def _requantize(x, d, dm, qmax, L, offset=0):
    """Final levels from the stored (fp16, integer) scales: clip(round((x + dm)/d)) per sub-block.

    x, L: [B, S, n]; d, dm: [B, S]. Sub-blocks whose d is 0 keep the search's levels, as the C does.
    """
    L = np.array(L, dtype=F32)  # a copy, changed in place
    _requantize_loop(np.ascontiguousarray(x, dtype=F32), np.ascontiguousarray(d, dtype=F32),
                     np.ascontiguousarray(dm, dtype=F32), F32(-offset), F32(qmax - offset), F32(offset), L)
    return L


@njit(cache=True, error_model="numpy")
def _requantize_loop(x, d, dm, lo, hi, offset, L):
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            if d[b, s] != 0:
                for i in range(x.shape[2]):
                    L[b, s, i] = min(max(np.rint((x[b, s, i] + dm[b, s]) / d[b, s]), lo), hi) + offset


# ---------------------------------------------------------------- bit packing

def _pack_2bit(L):
    """[B, 256] values 0..3 -> [B, 64]: byte 32h+l holds values 128h+32j+l at bits 2j (j=0..3)."""
    L = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _pack_4bit(L):
    """[B, 256] 0..15 -> [B, 128]: byte 32c+l holds value 64c+l (low) and 64c+32+l (high)."""
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _pack_bitplane(bits, n_planes):
    """[B, n_planes·32] single bits -> [B, 32]: byte l holds bit p of value 32p+l at position p."""
    b = bits.astype(np.uint8).reshape(-1, n_planes, 32)
    return (b << np.arange(n_planes, dtype=np.uint8).reshape(1, -1, 1)).sum(axis=1, dtype=np.uint8)


def _pack_scale_min_k4(ls, lm):
    """8 six-bit scales + 8 six-bit mins -> 12 bytes (llama.cpp's get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _superblock_sigma2(x, factor):
    """factor · Σx²/256 per super-block, summed left to right (the imatrix paths' σ²)."""
    return (F32(factor) * seqsum(x * x) / F32(QK_K)).astype(F32)


# ---------------------------------------------------------------- decoding loops (Q2_K, Q3_K)
# One pass per super-block, each output written once, with the float32 operations of ggml's
# dequantize_row_qN_K (and of the gguf package's numpy): Q2_K (d·sc)·q - dmin·m, Q3_K (d·(sc - 32))·q.
# Sub-block s (16 values) takes its 2-bit codes from bits 2j of bytes 32h + 16·half .. + 15 of qs,
# s = 8h + 2j + half (the layout above); a whole-tensor numpy decode spends more time on its
# temporaries (page faults of fresh memory) than on the arithmetic.

@njit(cache=True, error_model="numpy")
def _decode_q2_k(data, d, dmin, out):
    """``out [B, 256]`` float32 from Q2_K blocks ``data [B, 84]``; ``d``, ``dmin`` [B]: their fp16 fields as float32."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        for s in range(16):
            dl = d[b] * F32(blk[s] & 0xF)
            ml = dmin[b] * F32(blk[s] >> 4)
            qs, shift = blk[16 + 32 * (s // 8) + 16 * (s % 2):], 2 * ((s % 8) // 2)
            for i in range(16):
                ob[16 * s + i] = dl * F32((qs[i] >> shift) & 3) - ml


@njit(cache=True, error_model="numpy")
def _decode_q3_k(data, d, out):
    """``out [B, 256]`` float32 from Q3_K blocks ``data [B, 110]`` (``d`` [B]: the fp16 field as float32): the
    2-bit code q, minus 4 where bit 4h + j of hmask[16·half + i] is clear, times d·(sc - 32)."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        for s in range(16):
            low = (blk[96 + s % 8] >> (4 * (s // 8))) & 0xF   # the 6-bit scale: 4 low bits (a nibble),
            top = (blk[104 + s % 4] >> (2 * (s // 4))) & 3     # 2 high bits
            dl = d[b] * F32((low | (top << 4)) - 32)
            half, j = s % 2, (s % 8) // 2
            qs, hm, shift, plane = blk[32 + 32 * (s // 8) + 16 * half:], blk[16 * half:], 2 * j, 4 * (s // 8) + j
            for i in range(16):
                ob[16 * s + i] = dl * F32(((qs[i] >> shift) & 3) - 4 + 4 * ((hm[i] >> plane) & 1))


# ---------------------------------------------------------------- decoding loops (Q4_K, Q5_K, Q6_K)
# The same one pass per super-block: Q4_K/Q5_K (d·sc)·q - dmin·m per sub-block of 32 (sub-block s takes the
# nibbles 4·(s % 2) of bytes 32·(s // 2) .. + 31 of qs, Q5_K adds bit s of each qh byte as q's bit 4),
# Q6_K (d·sc)·(q - 32) per sub-block of 16.

@njit(cache=True, error_model="numpy", inline="always")
def _scale_min_k4(q, j):
    """Sub-block j's 6-bit scale and min from the 12 scale bytes ``q`` (ggml's get_scale_min_k4)."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@njit(cache=True, error_model="numpy")
def _decode_q4_k(data, d, dmin, out):
    """``out [B, 256]`` float32 from Q4_K blocks ``data [B, 144]`` (ggml's dequantize_row_q4_K)."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        for s in range(8):
            sc, m = _scale_min_k4(blk[4:16], s)
            dl, ml = d[b] * F32(sc), dmin[b] * F32(m)
            qs, shift = blk[16 + 32 * (s // 2):], 4 * (s % 2)
            for i in range(32):
                ob[32 * s + i] = dl * F32((qs[i] >> shift) & 0xF) - ml


@njit(cache=True, error_model="numpy")
def _decode_q5_k(data, d, dmin, out):
    """``out [B, 256]`` float32 from Q5_K blocks ``data [B, 176]`` (ggml's dequantize_row_q5_K)."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        qh = blk[16:48]
        for s in range(8):
            sc, m = _scale_min_k4(blk[4:16], s)
            dl, ml = d[b] * F32(sc), dmin[b] * F32(m)
            qs, shift = blk[48 + 32 * (s // 2):], 4 * (s % 2)
            for i in range(32):
                ob[32 * s + i] = dl * F32(((qs[i] >> shift) & 0xF) | (((qh[i] >> s) & 1) << 4)) - ml


@njit(cache=True, error_model="numpy")
def _decode_q6_k(data, d, out):
    """``out [B, 256]`` float32 from Q6_K blocks ``data [B, 210]`` (ggml's dequantize_row_q6_K): sub-block
    s = 8h + 2k + l // 16 holds values 128h + 32k + l, low 4 bits from nibble k // 2 of ql[64h + 32·(k % 2) + l],
    high 2 bits from bits 2k of qh[32h + l]; its scale is the int8 scales[s]."""
    for b in range(data.shape[0]):
        blk, ob = data[b], out[b]
        for s in range(16):
            h, k, l0 = s // 8, (s % 8) // 2, 16 * (s % 2)
            sc = np.int32(blk[192 + s]) - 256 * np.int32(blk[192 + s] >> 7)   # the byte as int8
            dl = d[b] * F32(sc)
            ql, qh = blk[64 * h + 32 * (k % 2) + l0:], blk[128 + 32 * h + l0:]
            lo_shift, hi_shift = 4 * (k // 2), 2 * k
            for i in range(16):
                q = ((ql[i] >> lo_shift) & 0xF) | (((qh[i] >> hi_shift) & 3) << 4)
                ob[16 * s + i] = dl * F32(np.int32(q) - 32)


# ---------------------------------------------------------------- Q2_K

@register
class Q2_K(BlockFormat):
    name, ggml_type = "Q2_K", T.Q2_K
    f16_offsets = (80, 82)

    def quantize_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 16, 16)
        if qw is None:
            scales, mins, L = make_qkx_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore"):
                ls = np.where((max_scale > 0)[:, None], _u8(nearest_int((F32(15) / max_scale)[:, None] * scales)), 0)
                lm = np.where((max_min > 0)[:, None], nearest_int((F32(15) / max_min)[:, None] * mins), 0)
            sc_byte = (ls | (lm.astype(np.int64) << 4)) & 0xFF
            d = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(F32)
            dmin = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(F32)
        else:
            s2 = _superblock_sigma2(x, 1)
            w = (qw * np.sqrt(s2[:, None] + x * x)).astype(F32).reshape(B * 16, 16)
            scales, mins, L = make_qkx_quants(xs, 3, w, -0.9, 0.05, 36, False)
            sw = seqsum(w).reshape(B, 16)
            d, Ls = make_qp_quants(scales.reshape(B, 16), 15, sw)
            dmin, Lm = make_qp_quants(mins.reshape(B, 16), 15, sw)
            sc_byte = (Ls.astype(np.int64) | (Lm.astype(np.int64) << 4)) & 0xFF
        dq, mq = f16_round(d), f16_round(dmin)
        sub_d = (dq[:, None] * (sc_byte & 0xF).astype(F32)).astype(F32)
        sub_m = (mq[:, None] * (sc_byte >> 4).astype(F32)).astype(F32)
        L = _requantize(x.reshape(B, 16, 16), sub_d, sub_m, 3, L.reshape(B, 16, 16))
        return np.concatenate([sc_byte.astype(np.uint8), _pack_2bit(L.reshape(B, QK_K)),
                               f16_bytes(d), f16_bytes(dmin)], axis=1)

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], QK_K), F32)
        _decode_q2_k(data, read_f16(data, 80), read_f16(data, 82), out)
        return out


# ---------------------------------------------------------------- Q3_K
@njit(cache=True, error_model="numpy")
def _q3_k_pack(x, dq, l6, L, out):
    """Levels from the stored scales, x / (dq·(l6 - 32)) rounded and clipped to -4..3 (sub-blocks whose
    scale is 0 keep the search's levels, as the C does), packed into ``out [B, 110]``: hmask (bit p of byte l:
    value 32p + l is above 3), qs (the low 2 bits, _pack_2bit's layout), scales (12 bytes, below).
    The fp16 d (bytes 108, 109) is left to the caller. ``dq``: d after its fp16 store, as float32."""
    q = np.empty(QK_K, np.int32)   # one super-block's levels 0..7 (int32: a float -> uint8 cast does not vectorise)
    for b in range(x.shape[0]):
        blk, xb, Lb = out[b], x[b], L[b]
        for j in range(16):
            sub_d = dq[b] * F32(l6[b, j] - F32(32))
            if sub_d != 0:
                for i in range(16 * j, 16 * j + 16):
                    q[i] = np.int32(min(max(np.rint(xb[i] / sub_d), F32(-4)), F32(3))) + 4
            else:
                for i in range(16 * j, 16 * j + 16):
                    q[i] = np.int32(Lb[i])
        for l in range(32):
            hm = 0
            for p in range(8):
                hm |= (q[32 * p + l] >> 2) << p          # hmask: bit p of byte l is q[32p + l] > 3
            blk[l] = hm
        for h in range(2):
            for l in range(32):
                byte = 0
                for j in range(4):
                    byte |= (q[128 * h + 32 * j + l] & 3) << (2 * j)   # qs: value 128h + 32j + l at bits 2j
                blk[32 + 32 * h + l] = byte
        # the 16 six-bit scales: low nibbles in bytes 0..7 (j, then j + 8 in the high nibble), the top 2 bits
        # of scale j at bits 2·(j // 4) of byte 8 + j % 4
        for j in range(8):
            blk[96 + j] = (np.uint8(l6[b, j]) & 0xF) | ((np.uint8(l6[b, j + 8]) & 0xF) << 4)
        for k in range(4):
            top = 0
            for g in range(4):
                top |= (np.uint8(l6[b, 4 * g + k]) >> 4) << (2 * g)
            blk[104 + k] = top


@register
class Q3_K(BlockFormat):
    name, ggml_type = "Q3_K", T.Q3_K
    f16_offsets = (108,)

    def quantize_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        x = np.ascontiguousarray(x, dtype=F32)
        xs = x.reshape(B * 16, 16)
        if qw is None:
            scales, L = make_q3_quants(xs, 4)
            scales = scales.reshape(B, 16)
            max_scale = signed_extreme(scales)
            with np.errstate(divide="ignore", invalid="ignore"):
                iscale = F32(-32) / max_scale
                l6 = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
                d = F32(1) / iscale
            l6 = np.where((max_scale != 0)[:, None], l6, F32(0))
            d = np.where(max_scale != 0, d, F32(0)).astype(F32)
        else:
            s2 = _superblock_sigma2(x, 2)
            w = (qw * np.sqrt(s2[:, None] + x * x)).astype(F32).reshape(B * 16, 16)
            scales, L = make_qx_quants(xs, 4, w)
            d, l6 = make_qx_quants(scales.reshape(B, 16), 32, seqsum(w).reshape(B, 16))
        out = np.empty((B, self.type_size), np.uint8)
        _q3_k_pack(x, f16_round(d), l6, L.reshape(B, QK_K), out)
        f16_field(out, 108)[:] = d
        return out

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], QK_K), F32)
        _decode_q3_k(data, read_f16(data, 108), out)
        return out


# ---------------------------------------------------------------- Q4_K and Q5_K

class _KAffine(BlockFormat):
    """Q4_K / Q5_K: 8 sub-blocks of 32, x = d·sc·q - dmin·m, sc and m on 6 bits."""

    f16_offsets = (0, 2)
    qmax: int
    ref_search: tuple  # (rmin, rdelta, nstep) of make_qkx2_quants in the reference path

    def levels(self, x, qw):
        """Search, quantize the sub-block scales to 6 bits, requantize. Returns d, dmin, ls, lm, L."""
        B = x.shape[0]
        xs = x.reshape(B * 8, 32)
        if qw is None:
            av_x = np.sqrt(seqsum(xs * xs) / F32(32))
            w = (av_x[:, None] + np.abs(xs)).astype(F32)
            scales, mins, L = make_qkx_quants(xs, self.qmax, w, *self.ref_search, False)
            scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(divide="ignore"):
                inv_s = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
                inv_m = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
            ls = np.minimum(_u8(nearest_int(inv_s[:, None] * scales)), 63)
            lm = np.minimum(_u8(nearest_int(inv_m[:, None] * mins)), 63)
            d, dmin = (max_scale / F32(63)).astype(F32), (max_min / F32(63)).astype(F32)
        else:
            s2 = _superblock_sigma2(x, 2)
            w = (qw * np.sqrt(s2[:, None] + x * x)).astype(F32).reshape(B * 8, 32)
            scales, mins, L = make_qkx_quants(xs, self.qmax, w, -0.9, 0.05, 36, False)
            sw = seqsum(w).reshape(B, 8)
            d, ls = make_qp_quants(scales.reshape(B, 8), 63, sw)
            dmin, lm = make_qp_quants(mins.reshape(B, 8), 63, sw)
            ls, lm = np.minimum(ls, 63).astype(np.int64), np.minimum(lm, 63).astype(np.int64)
        sub_d = (f16_round(d)[:, None] * ls.astype(F32)).astype(F32)
        sub_m = (f16_round(dmin)[:, None] * lm.astype(F32)).astype(F32)
        L = _requantize(x.reshape(B, 8, 32), sub_d, sub_m, self.qmax, L.reshape(B, 8, 32))
        return d, dmin, ls, lm, L.reshape(B, QK_K).astype(np.uint8)   # levels 0..31

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], QK_K), F32)   # numpy's allocation: huge pages for large outputs
        self.decode(data, read_f16(data, 0), read_f16(data, 2), out)
        return out


@register
class Q4_K(_KAffine):
    name, ggml_type, qmax, ref_search = "Q4_K", T.Q4_K, 15, (-1.0, 0.1, 20)
    decode = staticmethod(_decode_q4_k)

    def quantize_blocks(self, x, qw, sigma2):
        d, dmin, ls, lm, L = self.levels(x, qw)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), _pack_scale_min_k4(ls, lm), _pack_4bit(L)], axis=1)


@register
class Q5_K(_KAffine):
    name, ggml_type, qmax, ref_search = "Q5_K", T.Q5_K, 31, (-0.5, 0.1, 15)
    decode = staticmethod(_decode_q5_k)

    def quantize_blocks(self, x, qw, sigma2):
        d, dmin, ls, lm, L = self.levels(x, qw)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), _pack_scale_min_k4(ls, lm),
                               _pack_bitplane(L >> 4, 8), _pack_4bit(L & 0xF)], axis=1)


# ---------------------------------------------------------------- Q6_K

@register
class Q6_K(BlockFormat):
    name, ggml_type = "Q6_K", T.Q6_K
    f16_offsets = (208,)

    def quantize_blocks(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B * 16, 16)
        scales, L = make_qx_quants(xs, 32, None if qw is None else qw.reshape(B * 16, 16))
        scales = scales.reshape(B, 16)
        max_scale = signed_extreme(scales)
        empty = np.abs(max_scale) < GROUP_MAX_EPS
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-128) / max_scale
            d = np.where(empty, F32(0), F32(1) / iscale).astype(F32)
            sc = np.where(empty[:, None], 0, np.minimum(nearest_int(iscale[:, None] * scales), 127))
        sc = sc.astype(np.int64)
        sub_d = (f16_round(d)[:, None] * sc.astype(F32)).astype(F32)
        L = _requantize(x.reshape(B, 16, 16), sub_d, np.zeros_like(sub_d), 63, L.reshape(B, 16, 16), offset=32)
        L = np.where(empty[:, None, None], 0, L).reshape(B, 2, 4, 32).astype(np.uint8)   # [B, half, k, l]
        lo, hi = L & 0xF, L >> 4
        ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(B, 128)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(B, 64)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), f16_bytes(d)], axis=1)

    def dequantize_blocks(self, data):
        out = np.empty((data.shape[0], QK_K), F32)
        _decode_q6_k(data, read_f16(data, 208), out)
        return out
