"""Teaching helpers: a Q4_K super-block decoded by hand, byte budgets, the scale search traced.

Everything here is deliberately explicit (bit operations spelled out one field at a time);
the vectorised production code is in ``kquants.py`` and must agree with it exactly.
"""
from __future__ import annotations

import numpy as np

from qlab.gguf.search import F32, seqsum, nearest_int

# Byte budget of one block: (field, bytes, what it holds). Sums to the format's type_size.
LAYOUT = {
    "Q4_0": [("d", 2, "fp16 scale"), ("qs", 16, "32 × 4-bit codes")],
    "Q4_1": [("d", 2, "fp16 scale"), ("m", 2, "fp16 min"), ("qs", 16, "32 × 4-bit codes")],
    "Q5_0": [("d", 2, "fp16 scale"), ("qh", 4, "32 × 5th bit"), ("qs", 16, "32 × low 4 bits")],
    "Q5_1": [("d", 2, "fp16 scale"), ("m", 2, "fp16 min"), ("qh", 4, "32 × 5th bit"), ("qs", 16, "32 × low 4 bits")],
    "Q8_0": [("d", 2, "fp16 scale"), ("qs", 32, "32 × int8")],
    "Q2_K": [("scales", 16, "16 × (4-bit scale, 4-bit min)"), ("qs", 64, "256 × 2-bit"),
             ("d", 2, "fp16 super-scale"), ("dmin", 2, "fp16 super-min")],
    "Q3_K": [("hmask", 32, "256 × 3rd bit"), ("qs", 64, "256 × low 2 bits"), ("scales", 12, "16 × 6-bit scale"),
             ("d", 2, "fp16 super-scale")],
    "Q4_K": [("d", 2, "fp16 super-scale"), ("dmin", 2, "fp16 super-min"),
             ("scales", 12, "8 × 6-bit scale + 8 × 6-bit min"), ("qs", 128, "256 × 4-bit")],
    "Q5_K": [("d", 2, "fp16 super-scale"), ("dmin", 2, "fp16 super-min"),
             ("scales", 12, "8 × 6-bit scale + 8 × 6-bit min"), ("qh", 32, "256 × 5th bit"),
             ("qs", 128, "256 × low 4 bits")],
    "Q6_K": [("ql", 128, "256 × low 4 bits"), ("qh", 64, "256 × high 2 bits"), ("scales", 16, "16 × int8 scale"),
             ("d", 2, "fp16 super-scale")],
}


def bits_breakdown(name: str) -> list[dict]:
    """Bits per weight contributed by each field of a block (the rows sum to the format's bpw)."""
    from qlab.gguf.blocks import get_format

    n = get_format(name).block_size
    return [dict(field=f, bytes=b, holds=h, bits_per_weight=8 * b / n) for f, b, h in LAYOUT[name]]


def decode_q4_k_by_hand(block: bytes) -> dict:
    """Decode one 144-byte Q4_K super-block with plain Python, field by field.

    Returns d, dmin, the 8 (scale, min) integer pairs, the 256 codes and the 256 values
    ``d·scale_j·q - dmin·min_j``.
    """
    assert len(block) == 144
    d = float(np.frombuffer(block[0:2], np.float16)[0])
    dmin = float(np.frombuffer(block[2:4], np.float16)[0])
    s = block[4:16]
    scales, mins = [], []
    for j in range(8):
        if j < 4:                                   # sub-blocks 0-3: low 6 bits of bytes 0-3 and 4-7
            sc, mn = s[j] & 63, s[j + 4] & 63
        else:                                       # 4-7: 4 bits from bytes 8-11, top 2 bits borrowed
            sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4)
            mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
        scales.append(sc)
        mins.append(mn)
    qs = block[16:144]
    codes = [0] * 256
    for chunk in range(4):                          # 4 chunks of 64 values, 32 bytes each
        for l in range(32):
            byte = qs[32 * chunk + l]
            codes[64 * chunk + l] = byte & 0x0F           # low nibble: first 32 of the chunk
            codes[64 * chunk + 32 + l] = byte >> 4        # high nibble: next 32
    values = [np.float32(np.float32(d) * np.float32(scales[i // 32])) * np.float32(codes[i])
              - np.float32(np.float32(dmin) * np.float32(mins[i // 32])) for i in range(256)]
    return dict(d=d, dmin=dmin, scales=scales, mins=mins, codes=np.array(codes),
                values=np.array(values, dtype=np.float32))


def qkx_candidates(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> dict:
    """Trace llama.cpp's (scale, min) search for ONE block ``x [n]`` with weights ``w [n]``.

    Returns the min-max start and, for each candidate inverse scale, its least-squares
    (scale, min) and weighted squared error -- what ``make_qkx_quants`` picks the best of.
    """
    x, w = x.astype(F32)[None], w.astype(F32)[None]
    vmin, vmax = min(float(x.min()), 0.0), float(x.max())
    span = F32(vmax - vmin)
    xm = x - F32(vmin)
    sum_w, sum_x = seqsum(w), seqsum(w * x)
    rows = []
    L0 = np.clip(nearest_int((F32(nmax) / span) * xm), 0, nmax)
    s0 = F32(span / F32(nmax))
    start_err = float(seqsum(w * (s0 * L0 + F32(vmin) - x) ** 2)[0])
    best, cur_min = start_err, F32(vmin)
    for k in range(nstep + 1):
        span, xm = F32(vmax) - cur_min, x - cur_min         # a kept candidate moves the grid's origin
        iscale = (F32(rmin) + F32(rdelta) * F32(k) + F32(nmax)) / span
        L = np.clip(nearest_int(iscale * xm), 0, nmax)
        wl = w * L
        sl, sl2, sxl = seqsum(wl), seqsum(wl * L), seqsum(wl * x)
        D = sum_w * sl2 - sl * sl
        s = (sum_w * sxl - sum_x * sl) / D
        m = (sl2 * sum_x - sl * sxl) / D
        if m[0] > 0:
            s, m = sxl / sl2, np.zeros_like(m)
        err = float(seqsum(w * (s[:, None] * L + m[:, None] - x) ** 2)[0])
        kept = bool(D[0] > 0 and err < best)
        if kept:
            best, cur_min = err, F32(m[0])
        rows.append(dict(k=k, iscale=float(iscale), scale=float(s[0]), min=float(-m[0]), error=err, kept=kept))
    return dict(start=dict(scale=float(s0), min=-vmin, error=start_err), candidates=rows)
