"""Scale rules: how the scale (and zero point) of each group is chosen.

All rules take the groups as a matrix ``G [n_groups, group_len]`` (see ``qlab.core.granularity``), an
optional mask of real (non-padding) elements, and the grid; they return ``(scale, zero_point)`` with one
entry per group (``zero_point`` is None for symmetric grids). With them, quantization is

    q = grid.round(x / scale + zero_point)        x_hat = scale * (q - zero_point)

* ``absmax``  (symmetric): scale = max|x| / grid.max_abs            e.g. int8: max|x| / 127
* ``minmax``  (asymmetric, unsigned int grid):  scale = (max - min) / (qmax - qmin),
  zero_point = round(qmin - min / scale). The range is widened to include 0 (as GPTQ's and torchao's
  reference code do) so that 0 is exactly representable and the zero point fits in the grid. (At 1 bit
  this makes the two levels {0, scale} or {-scale, 0}: an integer zero point always keeps 0 a level.)
* ``mse``     the absmax / min-max range shrunk by a factor p in [0.01, 1], keeping for each group the
  p that minimises the squared error (like GPTQ's ``Quantizer(mse=True)`` grid search with norm 2, but
  searched down to 1 % since heavy-tailed groups want clipping far below GPTQ's floor of 0.2):
  clipping a few large values buys a finer step for all the others.
* ``absmean`` (BitNet b1.58, Ma et al. 2024, eq. 1-3): scale = mean|x|, for ternary and binary grids.
* ``none``    scale 1: the grid itself is the format (fp16, bf16 casts).
"""
import torch


def _masked(G, mask, fill):
    return G if mask is None else G.masked_fill(~mask, fill)


def absmax(G, mask, grid):
    # max|x| = max(-min x, max x), without a |G| copy: for one group (per tensor) aminmax, one pass over G;
    # per row amin and amax, two vectorised passes (aminmax(dim=1) is ~20x slower)
    lo, hi = torch.aminmax(G) if G.shape[0] == 1 else (G.amin(dim=1), G.amax(dim=1))
    return torch.maximum(-lo, hi).reshape(-1) / grid.max_abs, None


def minmax(G, mask, grid):
    # the range is widened to include 0, so the zero padding of a short last group never moves it: no mask
    return _range_qparams(G.amin(dim=1), G.amax(dim=1), grid)


def _range_qparams(xmin, xmax, grid):
    xmin, xmax = torch.clamp(xmin, max=0), torch.clamp(xmax, min=0)
    scale = (xmax - xmin) / (grid.qmax - grid.qmin)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(grid.qmin - xmin / safe), grid.qmin, grid.qmax)
    return scale, zero_point


def minmax_float(G, mask, grid):
    """(scale, minimum) of the float-minimum affine form: the group's own range, 0 not forced in."""
    xmin = _masked(G, mask, float("inf")).amin(dim=1)
    xmax = _masked(G, mask, float("-inf")).amax(dim=1)
    return (xmax - xmin) / (grid.qmax - grid.qmin), xmin


def absmean(G, mask, grid):
    n = G.shape[1] if mask is None else mask.sum(dim=1)
    return G.abs().sum(dim=1) / n, None


def none(G, mask, grid):
    return torch.ones(G.shape[0], dtype=G.dtype), None


def mse(G, mask, grid, symmetric, cast_scale, coarse=40, fine=21, min_ratio=0.01, float_min=False, cast_min=None):
    """Search the clipping ratio p per group for the least squared error (see module docstring).

    Two passes: ``coarse`` ratios spaced geometrically from 1 down to ``min_ratio`` (heavy-tailed
    groups want p well below 0.2), then ``fine`` ratios around each group's best, one coarse step
    either side, so the optimum is located to ~0.6 %.
    """
    if symmetric:
        full_scale, _ = absmax(G, mask, grid)
    else:
        xmin = _masked(G, mask, float("inf")).amin(dim=1)
        xmax = _masked(G, mask, float("-inf")).amax(dim=1)

    def candidate(p):  # p: one clipping ratio per group
        if symmetric:
            return cast_scale(full_scale * p), None
        if float_min:
            return cast_scale(p * (xmax - xmin) / (grid.qmax - grid.qmin)), cast_min(p * xmin)
        scale, zp = _range_qparams(p * xmin, p * xmax, grid)
        return cast_scale(scale), zp

    best_err = torch.full((G.shape[0],), float("inf"), dtype=torch.float64)
    best_p = torch.ones(G.shape[0])
    best_scale = best_zp = None
    step = min_ratio ** (1 / (coarse - 1))
    coarse_ps = [step**i * torch.ones(G.shape[0]) for i in range(coarse)]
    for stage in range(2):
        ratios = coarse_ps if stage == 0 else [
            torch.clamp(best_p * step ** (2 * j / (fine - 1) - 1), max=1.0) for j in range(fine)]
        for p in ratios:
            scale, zp = candidate(p)
            err = (fake_quant_groups(G, scale, None, grid, zp) if float_min else fake_quant_groups(G, scale, zp, grid)) - G
            err = err**2
            err = _masked(err, mask, 0.0).sum(dim=1, dtype=torch.float64)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, p, best_p)
            best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
            if zp is not None:
                best_zp = zp if best_zp is None else torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _then(op, fresh, other):
    """``op(fresh, other)``, in place on ``fresh`` (a temporary of ours) unless the result needs a wider dtype:
    the same numbers as the out-of-place op, without allocating another tensor of G's size."""
    if torch.result_type(fresh, other) == fresh.dtype:
        return getattr(fresh, op + "_")(other)
    return getattr(torch, op)(fresh, other)


def scaled_groups(G, scale, zero_point, minimum=None):
    """x / scale + zero_point (or (x - minimum) / scale), one scale per row of G: what the grid rounds."""
    if minimum is not None:
        return _then("div", G - minimum[:, None], scale[:, None])
    x = G / scale[:, None]
    if zero_point is not None:
        x = _then("add", x, zero_point[:, None])
    return x


def slabs(shape, size: int):
    """(rows, columns) slices cutting a group matrix of ``shape`` [n_groups, group_len] into slabs of about
    ``size`` values: whole groups, or pieces of one group when a group alone is larger (per tensor)."""
    n, m = shape
    rows, cols = max(1, size // m), min(m, size)
    for r in range(0, n, rows):
        for c in range(0, m, cols):
            yield slice(r, r + rows), slice(c, c + cols)


def quantize_groups(G, scale, zero_point, grid, minimum=None):
    """Grid values q = grid.round(x / scale + zero_point) (or grid.round((x - minimum) / scale) on the
    unsigned grids that float minima use), one scale per row of G."""
    return grid.round(scaled_groups(G, scale, zero_point, minimum))


def dequantize_groups(Q, scale, zero_point, minimum=None, overwrite=False):
    """x_hat = scale * (q - zero_point)   (or scale * q + minimum). ``overwrite=True`` computes it in Q's
    memory (a float temporary the caller no longer needs; never when Q needs a gradient)."""
    fresh = overwrite and not Q.requires_grad
    if minimum is not None:
        return _then("add", _then("mul", Q, scale[:, None]) if fresh else Q * scale[:, None], minimum[:, None])
    if zero_point is not None:
        Q, fresh = (_then("sub", Q, zero_point[:, None]) if fresh else Q - zero_point[:, None]), True
    return _then("mul", Q, scale[:, None]) if fresh else Q * scale[:, None]


def fake_quant_groups(G, scale, zero_point, grid, minimum=None):
    # the grid values are a temporary of ours: de-quantized in their memory
    return dequantize_groups(quantize_groups(G, scale, zero_point, grid, minimum), scale, zero_point, minimum,
                             overwrite=True)


RULES = {"absmax": absmax, "minmax": minmax, "mse": mse, "absmean": absmean, "none": none}


def choose_qparams(G, mask, grid, rule: str, symmetric: bool, cast_scale, float_min=False, cast_min=None):
    """Dispatch to a rule; ``cast_scale`` (``cast_min``) rounds scales (minima) to their storage dtype.
    Returns (scale, zero_point), or (scale, minimum) with ``float_min``."""
    if rule not in RULES:
        raise ValueError(f"unknown scale rule {rule!r}; known: {', '.join(RULES)}")
    if rule == "mse":
        return mse(G, mask, grid, symmetric, cast_scale, float_min=float_min, cast_min=cast_min)
    if float_min:
        if rule != "minmax":
            raise ValueError(f"a float minimum comes with the minmax or mse rule, not {rule!r}")
        scale, minimum = minmax_float(G, mask, grid)
        return cast_scale(scale), cast_min(minimum)
    scale, zero_point = RULES[rule](G, mask, grid)
    return cast_scale(scale), zero_point
