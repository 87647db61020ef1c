"""The scale (and min) searches behind llama.cpp's k-quants, vectorised over blocks.

llama.cpp (``ggml/src/ggml-quants.c``) picks the scale of each small block with one of five
searches. They are re-expressed here so that **one call handles every block at once**: every
argument is a float32 array ``[B, n]`` (B blocks of n values) and every loop left is a loop over
the n positions of a block or over candidate scales, never over blocks.

Byte-exactness with the C code needs its float32 arithmetic in the same order, so:

* every product and sum stays float32 (numpy >= 2 keeps ``float32_array * python_float`` float32);
* sums are accumulated left to right (:func:`seqsum`), like the C ``for`` loops, never pairwise;
* ``nearest_int`` is round-half-to-even (:func:`nearest_int`), the magic-number trick in ggml.

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

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Sum ``[B, n] -> [B]`` left to right in float32, as a C loop ``acc += t[i]`` does.

    ``np.sum`` adds pairwise, which rounds differently; ``np.add.accumulate`` is sequential.
    """
    return np.add.accumulate(terms.astype(F32, copy=False), axis=-1)[..., -1]


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


def _safe_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (a / b).astype(F32, copy=False)


@np.errstate(all="ignore")
def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None,
                   rmse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search; returns ``(scale [B], L [B, n])`` with L in 0..2·nmax-1.

    Dequantization is ``scale · (L - nmax)``. Weights default to x² (llama.cpp rmse_type 1).
    With ``rmse=False`` it is plain absmax rounding (rmse_type 0).
    """
    x = x.astype(F32, copy=False)
    amax_val = signed_extreme(x)                                   # [B]
    zero = np.abs(amax_val) < GROUP_MAX_EPS
    iscale = _safe_div(F32(-nmax), amax_val)                       # [B]
    levels = lambda isc: np.clip(nearest_int(isc[:, None] * x), -nmax, nmax - 1)  # noqa: E731
    L = levels(iscale)
    if not rmse:
        return np.where(zero, F32(0), _safe_div(F32(1), iscale)), np.where(zero[:, None], 0, L + nmax)
    w = x * x if weights is None else weights.astype(F32, copy=False)
    wx = w * x
    sumlx, suml2 = seqsum(wx * L), seqsum(w * L * L)
    scale = np.where(suml2 != 0, _safe_div(sumlx, suml2), F32(0))
    best = scale * sumlx
    for k in [k for k in range(-9, 10) if k != 0]:
        isc = _safe_div(-(F32(nmax) + F32(0.1) * F32(k)), amax_val)
        Lk = levels(isc)
        slx, sl2 = seqsum(wx * Lk), seqsum(w * Lk * Lk)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[:, None], Lk, L)
        scale = np.where(better, _safe_div(slx, sl2), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], F32(0), L + nmax)


def _coordinate_descent(x, w, L, sumlx, suml2, lo, hi, need_sl2_positive_first):
    """Move single levels while that raises (Σw·x·l)²/Σw·l² (5 passes at most, as llama.cpp).

    Shared by :func:`make_q3_quants` (levels in [lo, hi] = [-nmax, nmax-1]) and
    :func:`make_qp_quants` (levels ≤ nmax). Operates in place on L; returns (sumlx, suml2).
    """
    wx = w * x
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, wxi, li = x[:, i], w[:, i], wx[:, i], L[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if need_sl2_positive_first else slx > 0
            new = nearest_int(_safe_div(xi * sl2, slx))
            new = np.minimum(new, F32(hi)) if lo is None else np.clip(new, lo, hi)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            accept = ok & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            if not need_sl2_positive_first:
                accept &= sl2_new > 0
            L[:, i] = np.where(accept, new, li)
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
    return sumlx, suml2


@np.errstate(all="ignore")
def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale by coordinate descent with weights x² (Q3_K reference path).

    Returns ``(scale [B], L [B, n])`` with L in 0..2·nmax-1; value = scale · (L - nmax).
    """
    x = x.astype(F32, copy=False)
    amax_val = signed_extreme(x)
    zero = np.abs(amax_val) < GROUP_MAX_EPS
    iscale = _safe_div(F32(-nmax), amax_val)
    L = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = seqsum(w * x * L), seqsum(w * L * L)
    sumlx, suml2 = _coordinate_descent(x, w, L, sumlx, suml2, -nmax, nmax - 1, False)
    scale = np.where(suml2 > 0, _safe_div(sumlx, suml2), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero[:, None], F32(0), L + nmax)


@np.errstate(all="ignore")
def make_qkx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float,
                    rdelta: float, nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (scale, min) search; returns ``(scale [B], the_min [B], L [B, n])``.

    Dequantization is ``scale · L - the_min`` with L in 0..nmax and the_min ≥ 0 (the block
    minimum is clamped to ≤ 0). For each candidate inverse scale the (s, m) pair solves
    min Σ w (s·l + m - x)² in closed form:  D = Σw·Σwl² - (Σwl)²,
    s = (Σw·Σwlx - Σwx·Σwl)/D,  m = (Σwl²·Σwx - Σwl·Σwlx)/D  (m forced to 0 if it came out > 0).
    """
    x = x.astype(F32, copy=False)
    w = x * x if weights is None else weights.astype(F32, copy=False)
    vmin = np.minimum(x.min(axis=-1), F32(0))
    vmax = x.max(axis=-1)
    flat = vmax <= vmin
    sum_w, sum_x = seqsum(w), seqsum(w * x)
    span = vmax - vmin
    xm = x - vmin[:, None]
    err = (lambda d: np.abs(d)) if use_mad else (lambda d: d * d)  # noqa: E731

    iscale = _safe_div(F32(nmax), span)
    scale = _safe_div(F32(1), iscale)
    L = np.clip(nearest_int(iscale[:, None] * xm), 0, nmax)
    best = seqsum(w * err(scale[:, None] * L + vmin[:, None] - x))
    the_min = vmin
    for k in range(nstep + 1):
        # as in llama.cpp, an accepted candidate's min replaces the block min for the next ones
        span, xm = vmax - the_min, x - the_min[:, None]
        isc = _safe_div(F32(rmin) + F32(rdelta) * F32(k) + F32(nmax), span)
        La = np.clip(nearest_int(isc[:, None] * xm), 0, nmax)
        wl = w * La
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * La), seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        s = _safe_div(sum_w * sum_xl - sum_x * sum_l, D)
        m = _safe_div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = m > 0
        s = np.where(pos, _safe_div(sum_xl, sum_l2), s)
        m = np.where(pos, F32(0), m)
        with np.errstate(invalid="ignore", over="ignore"):
            cur = seqsum(w * err(s[:, None] * La + m[:, None] - x))
        better = (D > 0) & (cur < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, cur, best)
        scale = np.where(better, s, scale)
        the_min = np.where(better, m, the_min)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat[:, None], F32(0), L)
    return scale, (-the_min).astype(F32), L


@np.errstate(all="ignore")
def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale for non-negative values on levels 0..nmax (value = scale · L); ``(scale [B], L)``.

    Used for the 6-bit (Q4_K/Q5_K) and 4-bit (Q2_K) sub-block scales and mins in the imatrix path.
    """
    x = x.astype(F32, copy=False)
    w = weights.astype(F32, copy=False)
    vmax = np.maximum(x.max(axis=-1), F32(0))
    zero = vmax < GROUP_MAX_EPS
    iscale = _safe_div(F32(nmax), vmax)
    L = nearest_int(iscale[:, None] * x)
    scale = _safe_div(F32(1), iscale)
    d = x - scale[:, None] * L
    best = seqsum(w * d * d)
    for k in [k for k in range(-4, 5) if k != 0]:
        isc = _safe_div(F32(0.1) * F32(k) + F32(nmax), vmax)
        sc = _safe_div(F32(1), isc)
        Lk = np.minimum(nearest_int(isc[:, None] * x), F32(nmax))
        d = x - sc[:, None] * Lk
        mse = seqsum(w * d * d)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    L = np.minimum(nearest_int(iscale[:, None] * x), F32(nmax))
    sumlx, suml2 = seqsum(w * x * L), seqsum(w * L * L)
    sumlx, suml2 = _coordinate_descent(x, w, L, sumlx, suml2, None, nmax, True)
    scale = np.where(suml2 > 0, _safe_div(sumlx, suml2), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero[:, None], F32(0), L)
