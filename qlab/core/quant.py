"""quantize / dequantize: a tensor and a QuantSpec in, a packed QuantizedTensor out, and back.

``quantize(x, spec)`` returns a ``QuantizedTensor`` holding the codes really packed (two 4-bit codes per
byte), the scales (in their storage dtype), the zero points or minima, and the spec; ``dequantize`` is its
exact inverse on the grid: re-quantizing a dequantized tensor with the same scales gives the same codes.
``fake_quant`` gives the same numbers without packing; ``fake_quant_ste`` adds a straight-through gradient.
"""
import math
from typing import NamedTuple

import torch

from qlab.core import scales as _scales
from qlab.core.formats.floating import FloatGrid, e4m3_codes
from qlab.core.formats.integer import IntGrid, int_codes
from qlab.core.packing import pack
from qlab.core.spec import DOUBLE_QUANT_SPEC, SCALE_DTYPES, QuantSpec
from qlab.core.tensor import QuantizedTensor


def validate(x: torch.Tensor, what: str = "tensor", finite: bool = True):
    """Raise a clear ValueError for tensors quantization cannot take. ``finite=False`` leaves out the NaN/Inf
    check (a pass over x), for callers that make it themselves (``_qparams`` reads it off the groups' ranges)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty {what} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}; it is already quantized?")
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        raise ValueError(f"{what} is {x.dtype}, already an 8-bit float; pass x.float() to re-quantize its values")
    if finite:
        check_finite(x, what)


def check_finite(x: torch.Tensor, what: str = "tensor"):
    """Raise a ValueError counting the NaN/Inf values of x, if it has any."""
    lo, hi = torch.aminmax(x.detach())  # NaN propagates through both; one pass, no boolean copy of x
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} has {bad} NaN/Inf value(s); quantization needs finite values")


def _cast_scale(dtype):
    def cast(scale):
        stored = scale.to(dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(f"a scale overflows {dtype}; store scales in fp32 (scale_dtype='fp32')")
        return torch.where(stored == 0, torch.ones_like(stored), stored).float()  # all-zero groups

    return cast


def _cast_min(dtype):
    def cast(minimum):
        stored = minimum.to(dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(f"a minimum overflows {dtype}; store scales in fp32 (scale_dtype='fp32')")
        return stored.float()

    return cast


def _full_range(G, mask, spec: QuantSpec):
    """Each group's unclipped (scale, zero point or minimum) by its rule's range (absmax, min-max, absmean),
    before rounding to the storage dtype: the rule's own answer, or for 'mse' the range it shrinks from."""
    if spec.rule == "absmean":
        return _scales.absmean(G, mask, spec.grid)
    if spec.float_min:
        return _scales.minmax_float(G, mask, spec.grid)
    if spec.symmetric:
        return _scales.absmax(G, mask, spec.grid)
    return _scales.minmax(G, mask, spec.grid)


def _smallest_scale(dtype) -> float:
    """The smallest scale a dtype stores without more than ~1% rounding error: 64 subnormal steps."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps * 64


def _check_underflow(raw: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Raise when a group with non-zero values would get a scale its storage dtype cannot hold (0, or a deep
    subnormal with more than ~1% rounding error: fp16 below 2^-18 = 3.8e-6), ``raw`` being the unclipped
    scales. Returns the mask of all-zero groups (symmetric or integer-zero-point specs), whose scale is stored
    as 0 so they de-quantize to exact zeros on every grid (a binary grid has no 0 level)."""
    dtype = SCALE_DTYPES[spec.scale_dtype]
    bad = (raw > 0) & (raw.to(dtype).float() < _smallest_scale(dtype))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{int(bad.sum())} group scale(s) underflow {spec.scale_dtype} (e.g. group {i}: {float(raw[i]):.3g}, "
                         f"stored as {float(raw[i].to(dtype)):.3g}); store scales in fp32 (add '-sfp32' to the spec)")
    return (raw == 0) if not spec.float_min else torch.zeros_like(raw, dtype=torch.bool)


def _check_range(G, raw, spec: QuantSpec):
    """The scales ``raw`` (each group's range, >= 0, before rounding to the storage dtype) as stored and as
    float32, checked: raises for NaN/Inf in G (they make their group's range NaN/Inf: validate() left this
    out), for a scale that underflows (_check_underflow) or overflows the storage dtype. Returns (scale,
    all-zero groups or None); all-zero groups get scale 1. The checks read four numbers, the extremes of raw
    and of the stored scales (rounding is monotone: the largest range has the largest stored scale, the
    smallest the smallest); only a zero or too small scale takes the group-by-group path."""
    dtype = SCALE_DTYPES[spec.scale_dtype]
    stored = raw.to(dtype)
    scale = stored.float()
    raw_lo, raw_hi, lo, hi = torch.stack([*torch.aminmax(raw), *torch.aminmax(scale)]).tolist()  # NaN propagates
    if not (math.isfinite(raw_lo) and math.isfinite(raw_hi)):
        check_finite(G)  # (finite groups whose range overflows pass, and fail the overflow check below)
    zero_groups = None
    if raw_lo == 0 or lo < _smallest_scale(dtype):
        zero_groups = _check_underflow(raw, spec)  # raises if a non-zero group's scale underflows
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"a scale overflows {dtype}; store scales in fp32 (scale_dtype='fp32')")
    if raw_lo == 0:  # all-zero groups (float minima: constant groups): scale 1
        scale = torch.where(stored == 0, torch.ones_like(scale), scale)
    return scale, zero_groups


def _given(name, value, n_groups):
    v = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if v.numel() != n_groups:
        raise ValueError(f"{name}= needs one value per group ({n_groups}), got {v.numel()}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name}= has NaN/Inf entries; pass finite values")
    if name == "scale" and (v < 0).any():
        raise ValueError("scale= must be non-negative (one step size per group)")
    return v


class QParams(NamedTuple):
    """What _qparams chose for the groups G (one entry per group)."""

    scale: torch.Tensor  # float32, as used for rounding
    zero_point: torch.Tensor | None
    minimum: torch.Tensor | None  # float minima ('fmin' specs)
    stored_scale: object  # the scale as stored: a tensor, or a QuantizedTensor under double quantization
    scale_offset: float  # what double quantization subtracted from the scales before quantizing them
    zero_groups: torch.Tensor | None  # all-zero groups (their stored scale is 0), None if there are none
    bound: float | None  # an upper bound on |G / scale| (absmax rule), which lets the encoder skip its clamp


def _qparams(G, mask, spec: QuantSpec, scale=None, zero_point=None, minimum=None) -> QParams:
    """Scale and zero point (or float minimum) per group, chosen by the spec's rule, or the given ones
    checked (see QParams). Raises for NaN/Inf in G: the callers' validate(finite=False) leaves that check
    here, where the groups' ranges find it without another pass over G."""
    grid = spec.grid
    cast = _cast_scale(SCALE_DTYPES[spec.scale_dtype])
    cast_min = _cast_min(SCALE_DTYPES[spec.scale_dtype])
    zero_groups = bound = None
    if scale is not None or spec.rule == "none":
        check_finite(G)
    if scale is None and spec.rule == "none":
        scale, zero_point = _scales.choose_qparams(G, mask, grid, "none", spec.symmetric, cast)
    elif scale is None:
        raw, offset = _full_range(G, mask, spec)  # one pass over the groups: the rule's range
        if spec.rule == "mse":  # searches clipped ranges below the full one
            _, zero_groups = _check_range(G, raw, spec)
            scale, offset = _scales.choose_qparams(G, mask, grid, "mse", spec.symmetric and not spec.float_min, cast,
                                                   spec.float_min, cast_min)
        else:  # the rule's own answer is the full range (what choose_qparams would compute again)
            scale, zero_groups = _check_range(G, raw, spec)
            offset = cast_min(offset) if spec.float_min else offset
        if spec.rule == "absmax" and not spec.double_quant:
            # |x| <= raw·max_abs up to raw's rounding (2^-24), so |x / scale| <= raw·max_abs / scale, up to
            # that and the divisions' rounding: 1e-6 covers them
            bound = float((raw.double() / scale).max()) * grid.max_abs * (1 + 1e-6)
        if spec.float_min:
            minimum = offset
        else:
            zero_point = offset
    elif spec.float_min:
        if minimum is None or zero_point is not None:
            raise ValueError("a float-minimum spec ('fmin') takes minimum=, not zero_point=")
        scale = cast(_given("scale", scale, G.shape[0]))
        minimum = cast_min(_given("minimum", minimum, G.shape[0]))
    else:
        if minimum is not None:
            raise ValueError("minimum= needs a float-minimum spec ('...-asym-minmax-fmin')")
        scale = cast(_given("scale", scale, G.shape[0]))
        zero_point = None if zero_point is None else _given("zero_point", zero_point, G.shape[0])
        if zero_point is not None:
            if not spec.symmetric and not torch.equal(zero_point, zero_point.round()):
                raise ValueError("zero points are integers on the grid (stored in the grid's bits); got fractions")
            if spec.symmetric or zero_point.min() < grid.qmin or zero_point.max() > grid.qmax:
                raise ValueError(f"zero points must lie in [{grid.qmin}, {grid.qmax}] and need an asymmetric spec")
    if not spec.symmetric and zero_point is None and minimum is None:
        raise ValueError("an asymmetric spec needs a zero point")

    scale_offset, stored_scale = 0.0, scale
    if spec.double_quant:  # QLoRA: quantize the (mean-centred) scales themselves
        scale_offset = scale.mean().item()
        stored_scale = quantize(scale - scale_offset, DOUBLE_QUANT_SPEC)
        scale = stored_scale.dequantize() + scale_offset
        zero_groups = None  # the second-level code stores the scales; NF4 and the int grids have a 0 level
    elif zero_groups is not None and zero_groups.any():
        stored_scale = torch.where(zero_groups, torch.zeros_like(scale), scale)
    else:
        zero_groups = None
    return QParams(scale, zero_point, minimum, stored_scale, scale_offset, zero_groups, bound)


def qparams(x: torch.Tensor, spec) -> tuple:
    """The scale and zero point (None if symmetric; the float minimum for 'fmin' specs) per group that
    ``quantize(x, spec)`` rounds with, flat, as float32: ``quantize(x, spec).scales().reshape(-1)`` without
    quantizing anything."""
    spec = QuantSpec.parse(spec)
    validate(x, finite=False)  # _qparams checks for NaN/Inf
    G, mask = spec.granularity.to_groups(x.detach().float())
    p = _qparams(G, mask, spec)
    return p.scale, (p.minimum if spec.float_min else p.zero_point)


def quantize(x: torch.Tensor, spec, *, scale=None, zero_point=None, minimum=None) -> QuantizedTensor:
    """Quantize ``x`` with ``spec`` (a QuantSpec or its string). Pass ``scale`` and ``zero_point`` (or
    ``minimum`` for 'fmin' specs), one per group, to reuse existing quantization parameters instead of
    choosing new ones."""
    spec = QuantSpec.parse(spec)
    validate(x, finite=False)  # _qparams checks for NaN/Inf
    grid, gran = spec.grid, spec.granularity
    G, mask = gran.to_groups(x.detach().float())
    p = _qparams(G, mask, spec, scale, zero_point, minimum)
    codes = gran.from_groups(_encode_groups(G, p, grid), x.shape)
    scale_shape = gran.scale_shape(tuple(x.shape))
    stored_scale = p.stored_scale
    if not isinstance(stored_scale, QuantizedTensor):
        stored_scale = stored_scale.to(SCALE_DTYPES[spec.scale_dtype]).reshape(scale_shape)
    return QuantizedTensor(
        spec=spec,
        shape=tuple(x.shape),
        dtype=x.dtype,
        packed=pack(codes, grid.bits),
        scale=stored_scale,
        zero_point=None if p.zero_point is None else p.zero_point.to(torch.int64).reshape(scale_shape),
        scale_offset=p.scale_offset,
        minimum=None if p.minimum is None else p.minimum.to(SCALE_DTYPES[spec.scale_dtype]).reshape(scale_shape),
    )


def _encode_groups(G, p: QParams, grid, slab: int = 1 << 20, one_pass: int = 1 << 23) -> torch.Tensor:
    """The codes of the groups G: grid.encode_nearest(G / scale + zero_point) (or (G - minimum) / scale), the
    float temporary rounded in place. Up to ``one_pass`` values (32 MB) at once; larger G a ``slab`` of 2^20
    values at a time, as glibc hands out blocks above 32 MB as fresh memory every time, which the kernel
    zero-fills page by page (at 4096 x 4096: 16k page faults, more time than the arithmetic). Not always in
    slabs: each is a few more torch calls, and with two threads on a busy machine every call can stall.
    Elementwise, so slabs change no code."""
    dtype = torch.uint8 if grid.bits <= 8 else torch.int64
    if isinstance(grid, FloatGrid) and grid.name == "fp8_e4m3" and p.zero_point is None and p.minimum is None \
            and G.device.type == "cpu" and G.dtype == torch.float32:
        return e4m3_codes(G, p.scale)  # divide and cast in one pass: no float temporary, no slabs needed
    if isinstance(grid, IntGrid) and p.minimum is None and G.device.type == "cpu" and G.dtype == torch.float32:
        return int_codes(G, p.scale, p.zero_point, grid)  # divide, add, round, clamp and cast in one pass

    def encode(rows, cols):
        per_group = [None if t is None else t[rows] for t in (p.scale, p.zero_point, p.minimum)]
        X = _scales.scaled_groups(G[rows, cols], *per_group)
        return grid.encode_nearest(X, dtype, overwrite=True, bound=p.bound)

    if G.numel() <= one_pass:
        return encode(slice(None), slice(None))
    codes = torch.empty(G.shape, dtype=dtype)
    for rows, cols in _scales.slabs(G.shape, slab):
        codes[rows, cols] = encode(rows, cols)
    return codes


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    return qt.dequantize()


def fake_quant(x: torch.Tensor, spec) -> torch.Tensor:
    """dequantize(quantize(x)): the values a quantized model computes with, in x's dtype.

    The same numbers as ``quantize(x, spec).dequantize()``, without encoding and packing the codes (the
    inner loop of the searches in AWQ and the scale rules calls this many times per layer)."""
    spec = QuantSpec.parse(spec)
    validate(x, finite=False)  # _qparams checks for NaN/Inf
    G, x_hat, _ = _fake_quant_groups(x, spec)
    return spec.granularity.from_groups(x_hat, tuple(x.shape)).to(x.dtype)


def _fake_quant_groups(x, spec: QuantSpec):
    """(groups of x, their reconstruction, (scale, zero_point, minimum)) with the spec's granularity."""
    G, mask = spec.granularity.to_groups(x.detach().float())
    p = _qparams(G, mask, spec)
    x_hat = _scales.fake_quant_groups(G, p.scale, p.zero_point, spec.grid, p.minimum)
    if p.zero_groups is not None:
        x_hat = x_hat.masked_fill(p.zero_groups[:, None], 0.0)
    return G, x_hat, (p.scale, p.zero_point, p.minimum)


def fake_quant_ste(x: torch.Tensor, spec, clipped: bool = True) -> torch.Tensor:
    """Fake quantization with a straight-through gradient (Bengio et al. 2013; the STE of QAT):

        forward:   fake_quant(x, spec)                       (exactly, bit for bit)
        backward:  d out / d x = 1 inside the grid's range, 0 outside      (clipped STE, the default)
                   d out / d x = 1 everywhere                               (clipped=False)

    The usual one-liner ``x + (q(x) - x).detach()`` has the same gradient, but its forward value is
    x + (q - x) in floating point, which can miss q by an ulp; adding ``(x - x.detach()) * inside``,
    exactly zero in the forward pass, keeps the forward bit-exact. The range of a group is
    [scale * (lowest level - zero_point), scale * (highest level - zero_point)] (float minimum:
    [minimum, minimum + scale * highest level]). Scales are chosen from ``x`` but carry no gradient
    (learned scales are LSQ's business).

    >>> x = torch.tensor([0.3, 2.0, -4.0], requires_grad=True)
    >>> y = fake_quant_ste(x, QuantSpec.parse("int4-tensor")); y.sum().backward(); x.grad
    tensor([1., 1., 1.])
    """
    spec = QuantSpec.parse(spec)
    validate(x.detach(), finite=False)  # _qparams checks for NaN/Inf
    gran = spec.granularity
    G, x_hat, (scale, zero_point, minimum) = _fake_quant_groups(x, spec)
    x_hat = gran.from_groups(x_hat, tuple(x.shape))
    if not clipped:
        inside = torch.ones_like(x_hat)
    else:
        levels = spec.grid.levels
        ends = torch.stack([levels.min(), levels.max()]).expand(G.shape[0], 2)
        lo, hi = _scales.dequantize_groups(ends, scale, zero_point, minimum).unbind(1)
        inside = ((G >= lo[:, None]) & (G <= hi[:, None])).float()
        inside = gran.from_groups(inside, tuple(x.shape))
    return x_hat.to(x.dtype) + (x - x.detach()) * inside.to(x.dtype)


def worked_example(x: torch.Tensor, spec) -> "pandas.DataFrame":
    """One row per element, the steps of quantization written out: x, x/scale (+ zero point), the code
    q, the reconstruction x_hat = scale * (q - zero_point) and the error x - x_hat."""
    import pandas as pd

    qt = quantize(x, spec)
    gran = qt.spec.granularity
    G, _ = gran.to_groups(x.detach().float())
    scale = qt.scales().reshape(-1)
    if qt.minimum is not None:
        raise ValueError("worked_example shows the integer-zero-point form; this spec stores a float minimum")
    zp = torch.zeros_like(scale) if qt.zero_point is None else qt.zero_point.reshape(-1).float()
    group = torch.arange(G.shape[0])[:, None].expand(G.shape)
    columns = {
        "x": x.detach().float(),
        "group": gran.from_groups(group.float(), x.shape),
        "scale": gran.from_groups(scale[:, None].expand(G.shape), x.shape),
        "zero_point": gran.from_groups(zp[:, None].expand(G.shape), x.shape),
        "x/scale + zero_point": gran.from_groups(G / scale[:, None] + zp[:, None], x.shape),
        "q": qt.values(),
        "x_hat": qt.dequantize().float(),
    }
    df = pd.DataFrame({k: v.reshape(-1).numpy() for k, v in columns.items()})
    df["group"] = df["group"].astype(int)
    df["error"] = df["x"] - df["x_hat"]
    return df
