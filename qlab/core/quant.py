"""The quantization spec, the quantized tensor, and quantize / dequantize.

A ``QuantSpec`` is a small frozen config: a number format (the grid), a granularity, symmetric or
asymmetric, a scale rule, and how the scales themselves are stored. It round-trips through a short
string, handy for sweeps and command lines:

>>> spec = QuantSpec.parse("int4-g128-asym-minmax")
>>> str(spec), spec.bits
('int4-g128-asym-minmax', 4)

``quantize(x, spec)`` returns a ``QuantizedTensor`` holding the codes really packed (two 4-bit codes per
byte), the scales (in their storage dtype), the zero points, and the spec; ``dequantize`` is its exact
inverse on the grid: re-quantizing a dequantized tensor with the same scales gives the same codes.
"""
from dataclasses import dataclass, field, replace
import math

import torch

from qlab.core import scales as _scales
from qlab.core.formats import FloatGrid, IntGrid, get_grid
from qlab.core.granularity import PerBlock, PerChannel, PerGroup, PerTensor, parse_granularity
from qlab.core.packing import pack, packed_nbytes, unpack

SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# What a bare format name means when the string leaves the rest out.
FORMAT_DEFAULTS = {
    "nf4": dict(granularity=PerBlock(64), rule="absmax"),
    "fp8_e4m3": dict(granularity=PerTensor(), rule="absmax", scale_dtype="fp32"),
    "fp8_e5m2": dict(granularity=PerTensor(), rule="absmax", scale_dtype="fp32"),
    "fp4_e2m1": dict(granularity=PerGroup(32), rule="absmax"),
    "ternary": dict(granularity=PerTensor(), rule="absmean"),
    "binary": dict(granularity=PerTensor(), rule="absmean"),
    "fp16": dict(granularity=PerTensor(), rule="none"),
    "bf16": dict(granularity=PerTensor(), rule="none"),
    "dynamic8": dict(granularity=PerBlock(256), rule="absmax", scale_dtype="fp32"),
}
INT_FORMATS = {f"int{b}" for b in range(1, 9)}
FORMATS = INT_FORMATS | set(FORMAT_DEFAULTS)


@dataclass(frozen=True)
class QuantSpec:
    """format + granularity + symmetric/asymmetric + scale rule (+ how scales are stored).

    format:       'int1'..'int8' (signed grid if symmetric, unsigned with a zero point if not),
                  'fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1', 'nf4', 'ternary', 'binary', 'fp16', 'bf16',
                  'dynamic8' (bitsandbytes' 8-bit dynamic tree code)
    granularity:  PerTensor(), PerChannel(axis), PerToken(), PerGroup(size), PerBlock(size)
    rule:         'absmax', 'minmax', 'mse', 'absmean', 'none' (see qlab.core.scales)
    restricted:   symmetric int only: [-(2^(b-1)-1), 2^(b-1)-1] (True) or the full [-2^(b-1), 2^(b-1)-1]
    scale_dtype:  'fp16', 'bf16' or 'fp32': scales are rounded to this and counted at its width
    double_quant: QLoRA-style: the per-block scales, minus their mean, are themselves quantized
                  (8-bit dynamic code, blocks of 256, fp32 second-level scales)
    """

    format: str = "int8"
    granularity: object = PerChannel(0)
    symmetric: bool = True
    rule: str = "absmax"
    restricted: bool = True
    scale_dtype: str = "fp16"
    double_quant: bool = False

    def __post_init__(self):
        if self.format.startswith("int") and self.format[3:].isdigit():
            bits = int(self.format[3:])
            IntGrid(bits)  # raises a clear error for bits out of range
            if self.symmetric and bits < 2:
                raise ValueError("a symmetric 1-bit integer grid is degenerate; use the 'binary' format")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; known: {', '.join(sorted(FORMATS))}")
        if self.rule not in _scales.RULES:
            raise ValueError(f"unknown scale rule {self.rule!r}; known: {', '.join(_scales.RULES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        is_int = self.format in INT_FORMATS
        if not self.symmetric and not is_int:
            raise ValueError(f"asymmetric (zero-point) quantization needs an int format, not {self.format!r}")
        if self.rule == "minmax" and self.symmetric:
            raise ValueError("the minmax rule is asymmetric; use absmax for symmetric grids")
        if self.rule == "absmax" and not self.symmetric:
            raise ValueError("the absmax rule is symmetric; use minmax (or mse) for asymmetric grids")
        if self.double_quant and not isinstance(self.granularity, (PerBlock, PerGroup)):
            raise ValueError("double quantization applies to per-block or per-group scales")

    # ---- the grid --------------------------------------------------------------------------
    @property
    def grid(self):
        if self.format in INT_FORMATS:
            name = self.format if self.symmetric else "u" + self.format
            return get_grid(name, restricted=self.symmetric and self.restricted)
        return get_grid(self.format)

    @property
    def bits(self) -> int:
        return self.grid.bits

    # ---- the short string ------------------------------------------------------------------
    def __str__(self):
        parts = [self.format, str(self.granularity), "sym" if self.symmetric else "asym", self.rule]
        if self.format in INT_FORMATS and self.symmetric and not self.restricted:
            parts.append("full")
        if self.double_quant:
            parts.append("dq")
        if self.scale_dtype != self._default("scale_dtype"):
            parts.append("s" + self.scale_dtype)
        return "-".join(parts)

    def _default(self, key):
        return _defaults(self.format, self.symmetric)[key]

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """'int4-g128-asym-minmax', 'nf4', 'nf4-b64-dq', 'fp8_e4m3-token', 'int8-full', 'int4-g32-sfp32'."""
        if isinstance(text, QuantSpec):
            return text
        tokens = text.strip().lower().split("-")
        fmt, rest = tokens[0], tokens[1:]
        symmetric = "asym" not in rest
        kw = dict(_defaults(fmt, symmetric), format=fmt, symmetric=symmetric)
        for tok in rest:
            if tok in ("sym", "asym"):
                continue
            elif tok in _scales.RULES:
                kw["rule"] = tok
            elif tok == "full":
                kw["restricted"] = False
            elif tok == "dq":
                kw["double_quant"] = True
            elif tok.startswith("s") and tok[1:] in SCALE_DTYPES:
                kw["scale_dtype"] = tok[1:]
            else:
                kw["granularity"] = parse_granularity(tok)
        return cls(**kw)

    @classmethod
    def integer(cls, bits: int, group_size: int | None = None, symmetric: bool = True, rule: str | None = None):
        """The everyday case: int{bits}, per channel (group_size=None) or per group along the input dim."""
        gran = PerChannel(0) if group_size is None else PerGroup(group_size)
        rule = rule or ("absmax" if symmetric else "minmax")
        return cls(format=f"int{bits}", granularity=gran, symmetric=symmetric, rule=rule)


def _defaults(fmt, symmetric):
    d = dict(granularity=PerChannel(0), rule="absmax" if symmetric else "minmax", scale_dtype="fp16")
    d.update(FORMAT_DEFAULTS.get(fmt, {}))
    return d


# QLoRA's second level: the mean-centred fp32 absmax constants in blocks of 256, 8-bit dynamic code
DOUBLE_QUANT_SPEC = QuantSpec("dynamic8", PerBlock(256), symmetric=True, rule="absmax", scale_dtype="fp32")


@dataclass
class QuantizedTensor:
    """Packed codes + scales (+ zero points) + the spec that made them.

    ``scale`` has ``spec.granularity.scale_shape(shape)``; with double quantization it is itself a
    QuantizedTensor of the scales minus ``scale_offset`` (their mean), as in QLoRA.
    """

    spec: QuantSpec
    shape: tuple
    dtype: torch.dtype
    packed: torch.Tensor  # uint8 bit stream of the codes, see qlab.core.packing
    scale: object  # torch.Tensor | QuantizedTensor
    zero_point: torch.Tensor | None = None
    scale_offset: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, in the tensor's shape."""
        return unpack(self.packed, self.spec.bits, self.numel).reshape(self.shape)

    def scales(self) -> torch.Tensor:
        """The scales as float32 (dequantizing them first under double quantization)."""
        if isinstance(self.scale, QuantizedTensor):
            return self.scale.dequantize().float() + self.scale_offset
        return self.scale.float()

    def values(self) -> torch.Tensor:
        """Grid values q of the codes (before scaling), in the tensor's shape."""
        return self.spec.grid.decode(self.codes())

    def dequantize(self) -> torch.Tensor:
        gran = self.spec.granularity
        Q, _ = gran.to_groups(self.values())
        zp = None if self.zero_point is None else self.zero_point.reshape(-1).float()
        x_hat = _scales.dequantize_groups(Q, self.scales().reshape(-1), zp)
        return gran.from_groups(x_hat, self.shape).to(self.dtype)

    # ---- honest size -------------------------------------------------------------------------
    @property
    def nbytes(self) -> float:
        """Bytes of codes + scales + zero points (zero points counted at the grid's width)."""
        n = self.packed.numel()
        if isinstance(self.scale, QuantizedTensor):
            n += self.scale.nbytes + 4  # + the fp32 offset
        elif self.spec.rule != "none":
            n += self.scale.numel() * SCALE_DTYPES[self.spec.scale_dtype].itemsize
        if self.zero_point is not None:
            n += packed_nbytes(self.zero_point.numel(), self.spec.bits)
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def __repr__(self):
        return (f"QuantizedTensor({self.spec}, shape={tuple(self.shape)}, "
                f"{self.nbytes:,} bytes, {self.bits_per_weight:.3f} bits/weight)")


def validate(x: torch.Tensor, what: str = "tensor"):
    """Raise a clear ValueError for tensors quantization cannot take."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty {what} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}; it is already quantized?")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} has {bad} NaN/Inf value(s); quantization needs finite values")


def _cast_scale(dtype):
    def cast(scale):
        stored = scale.to(dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(f"a scale overflows {dtype}; store scales in fp32 (scale_dtype='fp32')")
        return torch.where(stored == 0, torch.ones_like(stored), stored).float()  # all-zero groups

    return cast


def _qparams(G, mask, spec: QuantSpec, scale=None, zero_point=None):
    """Scale and zero point per group (chosen by the spec's rule, or the given ones checked), as used for
    rounding, plus the scale as stored (a tensor, or a QuantizedTensor under double quantization) and
    its offset."""
    grid = spec.grid
    cast = _cast_scale(SCALE_DTYPES[spec.scale_dtype])
    if scale is None:
        scale, zero_point = _scales.choose_qparams(G, mask, grid, spec.rule, spec.symmetric, cast)
    else:
        scale = cast(torch.as_tensor(scale, dtype=torch.float32).reshape(-1))
        zero_point = None if zero_point is None else torch.as_tensor(zero_point).reshape(-1).float()
        if zero_point is not None:
            if not spec.symmetric and not torch.equal(zero_point, zero_point.round()):
                raise ValueError("zero points are integers on the grid (stored in the grid's bits); got fractions")
            if spec.symmetric or zero_point.min() < grid.qmin or zero_point.max() > grid.qmax:
                raise ValueError(f"zero points must lie in [{grid.qmin}, {grid.qmax}] and need an asymmetric spec")
    if not spec.symmetric and zero_point is None:
        raise ValueError("an asymmetric spec needs a zero point")

    scale_offset, stored_scale = 0.0, scale
    if spec.double_quant:  # QLoRA: quantize the (mean-centred) scales themselves
        scale_offset = scale.mean().item()
        stored_scale = quantize(scale - scale_offset, DOUBLE_QUANT_SPEC)
        scale = stored_scale.dequantize() + scale_offset
    return scale, zero_point, stored_scale, scale_offset


def qparams(x: torch.Tensor, spec) -> tuple:
    """The scale and zero point (None if symmetric) per group that ``quantize(x, spec)`` rounds with,
    flat, as float32: ``quantize(x, spec).scales().reshape(-1)`` without quantizing anything."""
    spec = QuantSpec.parse(spec)
    validate(x)
    G, mask = spec.granularity.to_groups(x.detach().float())
    scale, zero_point, _, _ = _qparams(G, mask, spec)
    return scale, zero_point


def quantize(x: torch.Tensor, spec, *, scale=None, zero_point=None) -> QuantizedTensor:
    """Quantize ``x`` with ``spec`` (a QuantSpec or its string). Pass ``scale``/``zero_point`` (one per
    group) to reuse existing quantization parameters instead of choosing new ones."""
    spec = QuantSpec.parse(spec)
    validate(x)
    grid, gran = spec.grid, spec.granularity
    G, mask = gran.to_groups(x.detach().float())
    scale, zero_point, stored_scale, scale_offset = _qparams(G, mask, spec, scale, zero_point)
    Q = _scales.quantize_groups(G, scale, zero_point, grid)
    codes = gran.from_groups(grid.encode(Q), x.shape)
    scale_shape = gran.scale_shape(tuple(x.shape))
    if not isinstance(stored_scale, QuantizedTensor):
        stored_scale = stored_scale.to(SCALE_DTYPES[spec.scale_dtype]).reshape(scale_shape)
    return QuantizedTensor(
        spec=spec,
        shape=tuple(x.shape),
        dtype=x.dtype,
        packed=pack(codes, grid.bits),
        scale=stored_scale,
        zero_point=None if zero_point is None else zero_point.to(torch.int64).reshape(scale_shape),
        scale_offset=scale_offset,
    )


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    return qt.dequantize()


def fake_quant(x: torch.Tensor, spec) -> torch.Tensor:
    """dequantize(quantize(x)): the values a quantized model computes with, in x's dtype.

    The same numbers as ``quantize(x, spec).dequantize()``, without encoding and packing the codes (the
    inner loop of the searches in AWQ and the scale rules calls this many times per layer)."""
    spec = QuantSpec.parse(spec)
    validate(x)
    gran = spec.granularity
    G, mask = gran.to_groups(x.detach().float())
    scale, zero_point, _, _ = _qparams(G, mask, spec)
    x_hat = _scales.fake_quant_groups(G, scale, zero_point, spec.grid)
    return gran.from_groups(x_hat, tuple(x.shape)).to(x.dtype)


def worked_example(x: torch.Tensor, spec) -> "pandas.DataFrame":
    """One row per element, the steps of quantization written out: x, x/scale (+ zero point), the code
    q, the reconstruction x_hat = scale * (q - zero_point) and the error x - x_hat."""
    import pandas as pd

    qt = quantize(x, spec)
    gran = qt.spec.granularity
    G, _ = gran.to_groups(x.detach().float())
    scale = qt.scales().reshape(-1)
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
