"""The quantization spec: a small frozen config that says how a tensor is quantized.

A ``QuantSpec`` is a number format (the grid), a granularity, symmetric or asymmetric, a scale rule, and
how the scales themselves are stored. It round-trips through a short string, handy for sweeps and
command lines:

>>> spec = QuantSpec.parse("int4-g128-asym-minmax")
>>> str(spec), spec.bits
('int4-g128-asym-minmax', 4)
"""
from dataclasses import dataclass
from functools import cached_property
import re

import torch

from qlab.core import scales as _scales
from qlab.core.formats import IntGrid, get_grid
from qlab.core.granularity import Granularity, PerBlock, PerChannel, PerGroup, PerTensor, parse_granularity

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
    float_min:    asymmetric int only: a float minimum per group instead of an integer zero point,
                  x_hat = scale * q + minimum (llama.cpp's Q4_1 / Q5_1, KIVI), the minimum stored like the
                  scale (token 'fmin': 'int4-g32-asym-minmax-fmin')
    """

    format: str = "int8"
    granularity: Granularity = PerChannel(0)
    symmetric: bool = True
    rule: str = "absmax"
    restricted: bool = True
    scale_dtype: str = "fp16"
    double_quant: bool = False
    float_min: bool = False

    def __post_init__(self):
        if not isinstance(self.format, str):
            raise ValueError(f"format must be a string such as 'int4' or 'nf4', got {self.format!r}")
        if not isinstance(self.granularity, Granularity):
            raise ValueError(f"granularity must be a Granularity (e.g. PerGroup(128)); for a string such as "
                             f"'g128' use QuantSpec.parse or parse_granularity, got {self.granularity!r}")
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
        if self.float_min and (self.symmetric or not is_int):
            raise ValueError("a float minimum ('fmin') belongs to asymmetric int specs, e.g. 'int4-g32-asym-minmax-fmin'")
        if self.float_min and self.rule not in ("minmax", "mse"):
            raise ValueError(f"a float minimum is chosen by the minmax or mse rule, not {self.rule!r}")

    # ---- the grid --------------------------------------------------------------------------
    @cached_property  # (looked up once per spec: a decode asks for it on every call)
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
        if self.float_min:
            parts.append("fmin")
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
        if not isinstance(text, str):
            raise ValueError(f"a spec is a QuantSpec or a string such as 'int4-g128-asym-minmax', got {text!r}")
        tokens = re.split(r"-(?=\D)", text.strip().lower())  # a "-" before a digit is a sign: g32@-2, channel@-1
        fmt, rest = tokens[0], tokens[1:]
        symmetric = "asym" not in rest
        kw = dict(_defaults(fmt, symmetric), format=fmt, symmetric=symmetric)
        seen = {}  # what each token set, so that a repeated or contradictory one is an error, not "last wins"
        for tok in rest:
            if tok in ("sym", "asym"):
                field = "symmetry"
            elif tok in _scales.RULES:
                field, kw["rule"] = "scale rule", tok
            elif tok == "full":
                field, kw["restricted"] = "range", False
            elif tok == "dq":
                field, kw["double_quant"] = "double quantization", True
            elif tok == "fmin":
                field, kw["float_min"] = "float minimum", True
            elif tok.startswith("s") and tok[1:] in SCALE_DTYPES:
                field, kw["scale_dtype"] = "scale dtype", tok[1:]
            else:
                field, kw["granularity"] = "granularity", parse_granularity(tok)
            if field in seen:
                raise ValueError(f"spec {text!r} sets the {field} twice ({seen[field]!r} and {tok!r}); keep one")
            seen[field] = tok
        if "full" in rest and not symmetric:
            raise ValueError(f"spec {text!r}: '-full' (the full signed range) applies to symmetric int grids; "
                             f"an asymmetric grid is unsigned and always uses all 2^b levels")
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
