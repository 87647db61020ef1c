"""The scale (and min) searches behind llama.cpp's k-quants, as compiled loops over the blocks.

llama.cpp (``ggml/src/ggml-quants.c``) picks the scale of each small block with one of five
searches. Each is written here as the C loop over one block (numba ``@njit``, compiled once and
cached on disk), driven over every block of the tensor: every argument is a float32 array ``[B, n]``
(B blocks of n values). make_qx_quants, make_q3_quants and make_qkx_quants run 16 blocks side by side
(``LANES``), each in its own C order.

Why compiled loops rather than whole-array numpy: the searches walk (an accepted candidate changes
the next one's grid, the coordinate descent moves one level at a time), and bytes equal to llama.cpp's
need its float32 sums in its order (left to right), so the vectorised numpy version this replaced made
~12 passes over the data per candidate scale and was 7-10x slower than the C; the loop makes one.

Byte-exactness with the C code needs its float32 arithmetic in the same order, so:

* every product and sum stays float32 (each constant is an ``np.float32``; an int level is
  converted to float32 before it meets a float, as C's ``w*l`` does);
* sums are accumulated left to right, like the C ``for`` loops (numba does not reorder float sums);
* ``nearest_int`` is round-half-to-even (``np.rint``), the magic-number trick in ggml.

The searches (x = values of one block, w = importance weights, L = integer levels):

``make_qx_quants``   symmetric, x ≈ s·(L - nmax): start at s = max/(-nmax) (the signed
                     extreme maps onto -nmax), then try 18 nearby scales ``-(nmax + 0.1·k)/max``
                     and keep the least-squares s = Σw·x·l / Σw·l² with the best Σw·x·l·s.
``make_q3_quants``   symmetric, then coordinate descent: move one level at a time if it raises
                     (Σw·x·l)² / Σw·l², the weighted-least-squares figure of merit.
``make_qkx_quants``  asymmetric, x ≈ s·L - m: start from min-max, then try ``nstep+1`` scales
                     ``(nmax + rmin + rdelta·k)/(max - min)``; for each, solve the 2×2 weighted
                     least squares for (s, m) and keep the lowest weighted error (|·| or ²).
                     Once a candidate is kept, its min replaces the block min in the following
                     candidates' grids (the search walks, it does not only compare).
                     llama.cpp's ``make_qkx2_quants`` and ``make_qkx3_quants`` are both this
                     function (qkx3 only defaults w to x² when no weights are given).
``make_qp_quants``   positive values on 0..nmax (used to quantize the sub-block scales themselves
                     in the imatrix path): 8 nearby scales, then the same coordinate descent.
"""
from __future__ import annotations

import numpy as np
from numba import njit

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Sum ``[..., n] -> [...]`` left to right in float32, as a C loop ``acc += t[i]`` does.

    ``np.sum`` adds pairwise, which rounds differently; this is the C loop, compiled.
    """
    t = np.ascontiguousarray(terms, dtype=F32)
    out = np.empty(t.shape[:-1], F32)
    _seqsum_rows(t.reshape(-1, t.shape[-1]), out.reshape(-1))
    return out


@njit(cache=True, error_model="numpy")
def _seqsum_rows(t, out):
    for b in range(t.shape[0]):
        acc = t[b, 0]
        for i in range(1, t.shape[1]):
            acc += t[b, i]
        out[b] = acc


def nearest_int(x: np.ndarray) -> np.ndarray:
    """Round half to even, returned as float32 (ggml's ``nearest_int``: (x + 1.5·2²³) bit trick).

    >>> nearest_int(np.array([0.5, 1.5, -2.5], dtype=np.float32))
    array([ 0.,  2., -2.], dtype=float32)
    """
    return np.rint(x).astype(F32, copy=False)


def signed_extreme(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, keeping its sign (first one on ties)."""
    idx = np.argmax(np.abs(x), axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _blocks(x, weights=None):
    """x (and weights, x² by default) as C-contiguous float32 ``[B, n]``."""
    x = np.ascontiguousarray(x, dtype=F32)
    w = x * x if weights is None else np.ascontiguousarray(np.broadcast_to(weights, x.shape), dtype=F32)
    return x, w


# ---------------------------------------------------------------- compiled per-block loops
# Scalars are float32 throughout: F32(k) for every constant, F32(l) for every integer level.

@njit(cache=True, error_model="numpy", inline="always")
def _rint(v):
    return F32(np.rint(v))


@njit(cache=True, error_model="numpy", inline="always")
def _signed_max(xb):
    """(max |x|, the value with that magnitude), first on ties: the C's ``if (ax > amax)`` loop."""
    amax, vmax = F32(0), F32(0)
    for i in range(xb.shape[0]):
        ax = abs(xb[i])
        if ax > amax:
            amax, vmax = ax, xb[i]
    return amax, vmax


# The searches run LANES blocks side by side: the tile of blocks is transposed to xt[i, t] (value i of
# block t), and every loop over a block's values becomes "for i: for t in lanes". Each lane keeps its own
# block's C order (sums left to right over i), so the bytes do not change; the lanes only let one vector
# instruction advance 16 blocks' sums instead of waiting on one block's chain of dependent float adds.
LANES = 16


@njit(cache=True, error_model="numpy")
def _load_tile(x, w, b0, xt, wt):
    """Blocks b0 .. b0+LANES-1 of x and w, transposed into xt, wt (lanes past the end are zeros);
    returns how many are real."""
    m = min(LANES, x.shape[0] - b0)
    for t in range(LANES):
        for i in range(x.shape[1]):
            xt[i, t] = x[b0 + t, i] if t < m else F32(0)
            wt[i, t] = w[b0 + t, i] if t < m else F32(0)
    return m


@njit(cache=True, error_model="numpy")
def _qx_loop(x, w, nmax, rmse, scale, L):
    """make_qx_quants on LANES blocks at a time, position-major (as _qkx_loop)."""
    n, fmax, lo, hi = x.shape[1], F32(nmax), F32(-nmax), F32(nmax - 1)
    xt, wt, Lt = np.zeros((n, LANES), F32), np.zeros((n, LANES), F32), np.zeros((n, LANES), F32)
    vmax, iscale, s, best = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32)
    slx, sl2, zero = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, np.bool_)
    for b0 in range(0, x.shape[0], LANES):
        m = _load_tile(x, w, b0, xt, wt)
        for t in range(LANES):
            amax, vmax[t] = _signed_max(xt[:, t])
            zero[t] = amax < GROUP_MAX_EPS                 # all zero: scale 0, levels 0
            iscale[t] = -fmax / vmax[t]
            slx[t], sl2[t] = F32(0), F32(0)
        for i in range(n):
            for t in range(LANES):
                l = min(max(_rint(iscale[t] * xt[i, t]), lo), hi)
                Lt[i, t] = l + fmax
                slx[t] += wt[i, t] * xt[i, t] * l
                sl2[t] += wt[i, t] * l * l
        for t in range(LANES):
            s[t] = (slx[t] / sl2[t] if sl2[t] != 0 else F32(0)) if rmse else F32(1) / iscale[t]
            best[t] = s[t] * slx[t]
        for k in range(-9, 10):
            if k == 0 or not rmse:
                continue
            for t in range(LANES):
                iscale[t] = -(fmax + F32(0.1) * F32(k)) / vmax[t]
                slx[t], sl2[t] = F32(0), F32(0)
            for i in range(n):
                for t in range(LANES):
                    l = min(max(_rint(iscale[t] * xt[i, t]), lo), hi)
                    slx[t] += wt[i, t] * xt[i, t] * l
                    sl2[t] += wt[i, t] * l * l
            for t in range(LANES):
                if sl2[t] > 0 and slx[t] * slx[t] > best[t] * sl2[t]:
                    for i in range(n):
                        Lt[i, t] = min(max(_rint(iscale[t] * xt[i, t]), lo), hi) + fmax
                    s[t] = slx[t] / sl2[t]
                    best[t] = s[t] * slx[t]
        for t in range(m):
            scale[b0 + t] = F32(0) if zero[t] else s[t]
            for i in range(n):
                L[b0 + t, i] = F32(0) if zero[t] else Lt[i, t]


@njit(cache=True, error_model="numpy")
def _descend(xb, wb, Lb, sumlx, suml2, lo, hi, pre_check):
    """Move single levels while that raises (Σw·x·l)²/Σw·l² (5 passes at most, as llama.cpp).

    ``pre_check``: make_qp_quants tests sl2 > 0 before trying a level, make_q3_quants after.
    Levels are clamped to [lo, hi]. Works in place on Lb; returns (sumlx, suml2).
    """
    for _ in range(5):
        changed = False
        for i in range(xb.shape[0]):
            wx = wb[i] * xb[i]
            slx = sumlx - wx * Lb[i]
            sl2 = suml2 - wb[i] * Lb[i] * Lb[i]
            if slx > 0 and (sl2 > 0 or not pre_check):
                new = min(max(_rint(xb[i] * sl2 / slx), lo), hi)
                if new != Lb[i]:
                    slx += wx * new
                    sl2 += wb[i] * new * new
                    if (pre_check or sl2 > 0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        Lb[i], sumlx, suml2, changed = new, slx, sl2, True
        if not changed:
            break
    return sumlx, suml2


@njit(cache=True, error_model="numpy")
def _q3_loop(x, w, nmax, scale, L):
    """make_q3_quants on LANES blocks at a time, position-major (as _qx_loop).

    The descent is _descend's (pre_check False) with its nested ifs as one mask, so that the lanes stay in
    vectors. It stops when a pass moves no level in any lane (5 passes at most): a lane that moved nothing in
    a pass moves nothing in the next ones (same levels, same sums: the same tries), so the extra passes it
    runs leave it as the C leaves it.
    """
    n, fmax, lo, hi = x.shape[1], F32(nmax), F32(-nmax), F32(nmax - 1)
    xt, wt, Lt = np.zeros((n, LANES), F32), np.zeros((n, LANES), F32), np.zeros((n, LANES), F32)
    iscale, sumlx, suml2 = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32)
    zero = np.zeros(LANES, np.bool_)
    for b0 in range(0, x.shape[0], LANES):
        m = _load_tile(x, w, b0, xt, wt)
        for t in range(LANES):
            amax, vmax = _signed_max(xt[:, t])
            zero[t] = amax < GROUP_MAX_EPS                 # all zero: scale 0, levels 0
            iscale[t] = F32(0) if zero[t] else -fmax / vmax
            sumlx[t], suml2[t] = F32(0), F32(0)
        for i in range(n):
            for t in range(LANES):
                l = min(max(_rint(iscale[t] * xt[i, t]), lo), hi)
                Lt[i, t] = l
                sumlx[t] += wt[i, t] * xt[i, t] * l
                suml2[t] += wt[i, t] * l * l
        for _ in range(5):
            changed = False
            for i in range(n):
                for t in range(LANES):
                    wx, l = wt[i, t] * xt[i, t], Lt[i, t]
                    slx = sumlx[t] - wx * l                # the sums without value i
                    sl2 = suml2[t] - wt[i, t] * l * l
                    new = min(max(_rint(xt[i, t] * sl2 / slx), lo), hi)
                    slx_new, sl2_new = slx + wx * new, sl2 + wt[i, t] * new * new
                    take = ((slx > 0) & (new != l) & (sl2_new > 0)
                            & (slx_new * slx_new * suml2[t] > sumlx[t] * sumlx[t] * sl2_new))
                    Lt[i, t] = new if take else l
                    sumlx[t] = slx_new if take else sumlx[t]
                    suml2[t] = sl2_new if take else suml2[t]
                    changed |= take
            if not changed:
                break
        for t in range(m):
            scale[b0 + t] = F32(0) if zero[t] or not suml2[t] > 0 else sumlx[t] / suml2[t]
            for i in range(n):
                L[b0 + t, i] = F32(0) if zero[t] else Lt[i, t] + fmax


@njit(cache=True, error_model="numpy")
def _qkx_loop(x, w, nmax, rmin, rdelta, nstep, use_mad, scale, the_min, L):
    """make_qkx2/qkx3_quants on LANES blocks at a time, position-major: ``xt[i, t]`` is value i of block t.

    Each lane t is one block's C loop, in its order (sums left to right over i); the lanes only let the
    compiler run 16 blocks' sums in one vector instead of waiting on one block's chain of float adds.
    """
    B, n, fmax = x.shape[0], x.shape[1], F32(nmax)
    xt, wt = np.zeros((n, LANES), F32), np.zeros((n, LANES), F32)
    Lt, Laux = np.zeros((n, LANES), F32), np.zeros((n, LANES), F32)
    vmin, vmax, sum_w, sum_x = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32)
    s, best, iscale, cur = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32)
    s_new, m_new = np.zeros(LANES, F32), np.zeros(LANES, F32)
    sum_l, sum_l2, sum_xl = np.zeros(LANES, F32), np.zeros(LANES, F32), np.zeros(LANES, F32)
    for b0 in range(0, B, LANES):
        m = _load_tile(x, w, b0, xt, wt)
        for t in range(LANES):
            vmin[t], vmax[t], sum_w[t] = xt[0, t], xt[0, t], wt[0, t]
            sum_x[t] = sum_w[t] * xt[0, t]
        for i in range(1, n):
            for t in range(LANES):
                vmin[t] = xt[i, t] if xt[i, t] < vmin[t] else vmin[t]
                vmax[t] = xt[i, t] if xt[i, t] > vmax[t] else vmax[t]
                sum_w[t] += wt[i, t]
                sum_x[t] += wt[i, t] * xt[i, t]
        for t in range(LANES):
            vmin[t] = F32(0) if vmin[t] > 0 else vmin[t]
            iscale[t] = fmax / (vmax[t] - vmin[t])
            s[t] = F32(1) / iscale[t]
            best[t] = F32(0)
        flat_min = vmin.copy()                   # max <= min: scale 0, levels 0, the_min = -min
        flat = vmax <= vmin
        for i in range(n):
            for t in range(LANES):
                l = min(max(_rint(iscale[t] * (xt[i, t] - vmin[t])), F32(0)), fmax)
                Lt[i, t] = l
                diff = s[t] * l + vmin[t] - xt[i, t]
                best[t] += wt[i, t] * (abs(diff) if use_mad else diff * diff)
        for k in range(nstep + 1 if nstep >= 1 else 0):
            for t in range(LANES):
                iscale[t] = (rmin + rdelta * F32(k) + fmax) / (vmax[t] - vmin[t])
                sum_l[t], sum_l2[t], sum_xl[t] = F32(0), F32(0), F32(0)
            for i in range(n):
                for t in range(LANES):
                    l = min(max(_rint(iscale[t] * (xt[i, t] - vmin[t])), F32(0)), fmax)
                    Laux[i, t] = l
                    wl = wt[i, t] * l
                    sum_l[t] += wl
                    sum_l2[t] += wl * l
                    sum_xl[t] += wl * xt[i, t]
            for t in range(LANES):
                D = sum_w[t] * sum_l2[t] - sum_l[t] * sum_l[t]
                s_new[t] = (sum_w[t] * sum_xl[t] - sum_x[t] * sum_l[t]) / D
                m_new[t] = (sum_l2[t] * sum_x[t] - sum_l[t] * sum_xl[t]) / D
                if m_new[t] > 0:
                    m_new[t], s_new[t] = F32(0), sum_xl[t] / sum_l2[t]
                cur[t] = F32(0) if D > 0 else F32(np.inf)   # D <= 0: the C skips the candidate
            for i in range(n):
                for t in range(LANES):
                    diff = s_new[t] * Laux[i, t] + m_new[t] - xt[i, t]
                    cur[t] += wt[i, t] * (abs(diff) if use_mad else diff * diff)
            for t in range(LANES):
                if cur[t] < best[t]:
                    best[t], s[t], vmin[t] = cur[t], s_new[t], m_new[t]
                    for i in range(n):
                        Lt[i, t] = Laux[i, t]
        for t in range(m):
            scale[b0 + t] = F32(0) if flat[t] else s[t]
            the_min[b0 + t] = -flat_min[t] if flat[t] else -vmin[t]
            for i in range(n):
                L[b0 + t, i] = F32(0) if flat[t] else Lt[i, t]


@njit(cache=True, error_model="numpy")
def _qp_loop(x, w, nmax, scale, L):
    n, fmax = x.shape[1], F32(nmax)
    for b in range(x.shape[0]):
        xb, wb, Lb = x[b], w[b], L[b]
        vmax = F32(0)
        for i in range(n):
            vmax = vmax if vmax > xb[i] else xb[i]   # the C's MAX(max, x[i])
        if vmax < GROUP_MAX_EPS:
            Lb[:] = 0
            scale[b] = 0
            continue
        iscale = fmax / vmax
        s = F32(1) / iscale
        best = F32(0)
        for i in range(n):
            diff = xb[i] - s * _rint(iscale * xb[i])
            best += wb[i] * diff * diff
        for k in range(-4, 5):
            if k == 0:
                continue
            isc = (F32(0.1) * F32(k) + fmax) / vmax
            sc = F32(1) / isc
            mse = F32(0)
            for i in range(n):
                diff = xb[i] - sc * min(fmax, _rint(isc * xb[i]))
                mse += wb[i] * diff * diff
            if mse < best:
                best, iscale = mse, isc
        sumlx, suml2 = F32(0), F32(0)
        for i in range(n):
            l = min(fmax, _rint(iscale * xb[i]))
            Lb[i] = l
            sumlx += wb[i] * xb[i] * l
            suml2 += wb[i] * l * l
        sumlx, suml2 = _descend(xb, wb, Lb, sumlx, suml2, F32(-np.inf), fmax, True)
        scale[b] = sumlx / suml2 if suml2 > 0 else F32(0)


# ---------------------------------------------------------------- the searches, over all blocks

def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None,
                   rmse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search; returns ``(scale [B], L [B, n])`` with L in 0..2·nmax-1.

    Dequantization is ``scale · (L - nmax)``. Weights default to x² (llama.cpp rmse_type 1).
    With ``rmse=False`` it is plain absmax rounding (rmse_type 0).
    """
    x, w = _blocks(x, weights)
    scale, L = np.empty(x.shape[0], F32), np.empty_like(x)
    _qx_loop(x, w, nmax, rmse, scale, L)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale by coordinate descent with weights x² (Q3_K reference path).

    Returns ``(scale [B], L [B, n])`` with L in 0..2·nmax-1; value = scale · (L - nmax).
    """
    x, w = _blocks(x)
    scale, L = np.empty(x.shape[0], F32), np.empty_like(x)
    _q3_loop(x, w, nmax, scale, L)
    return scale, L


def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float,
                    rdelta: float, nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search; returns ``(scale [B], the_min [B], L [B, n])``.

    Dequantization is ``scale · L - the_min`` with L in 0..nmax and the_min ≥ 0 (the block
    minimum is clamped to ≤ 0). For each candidate inverse scale the (s, m) pair solves
    min Σ w (s·l + m - x)² in closed form:  D = Σw·Σwl² - (Σwl)²,
    s = (Σw·Σwlx - Σwx·Σwl)/D,  m = (Σwl²·Σwx - Σwl·Σwlx)/D  (m forced to 0 if it came out > 0).
    """
    x, w = _blocks(x, weights)
    scale, the_min, L = np.empty(x.shape[0], F32), np.empty(x.shape[0], F32), np.empty_like(x)
    _qkx_loop(x, w, nmax, F32(rmin), F32(rdelta), nstep, use_mad, scale, the_min, L)
    return scale, the_min, L


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale for non-negative values on levels 0..nmax (value = scale · L); ``(scale [B], L)``.

    Used for the 6-bit (Q4_K/Q5_K) and 4-bit (Q2_K) sub-block scales and mins in the imatrix path.
    """
    x, w = _blocks(x, weights)
    scale, L = np.empty(x.shape[0], F32), np.empty_like(x)
    _qp_loop(x, w, nmax, scale, L)
    return scale, L
