"""The quantized-tensor protocol, and the two kinds of quantized tensor the core defines.

Every method in qlab returns an object implementing :class:`QTensor`, so every result can be swapped into a
model, sized and plotted the same way:

* ``shape`` and ``dtype`` of the tensor it stands for, ``numel``;
* ``nbytes``: every byte stored (codes, scales, zero points or minima, codebooks), nothing hidden;
* ``bits_per_weight`` = 8 * nbytes / numel;
* ``dequantize()``: the float tensor the model computes with;
* ``state_dict()`` / ``from_state_dict()``: plain tensors and JSON-able metadata, for saving
  (:func:`save_qtensor` / :func:`load_qtensor` dispatch on the ``kind`` entry).

Implementations: :class:`QuantizedTensor` (a scalar grid: one b-bit code per element, scales per group,
integer zero points or float minima), :class:`CodebookTensor` (vector quantization: one code per group of
d weights into each of M codebooks, summed, times a scale per row: AQLM, QuIP#'s E8P), :class:`RotatedTensor`
(any of them holding a randomized-Hadamard-rotated weight, plus the sign vectors that rotate it back: RTN and
GPTQ with ``rotate=True``), and outside the core ``qlab.gguf.GGUFTensor`` (llama.cpp's byte-exact blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import math
from typing import Protocol, runtime_checkable

import torch

from qlab.core import scales as _scales
from qlab.core.decode4 import decode4, decode8, run_length
from qlab.core.packing import pack, packed_nbytes, unpack
from qlab.core.rotations import RandomizedHadamard, check_signs
from qlab.core.spec import SCALE_DTYPES, QuantSpec


@runtime_checkable
class QTensor(Protocol):
    """What every quantized tensor in qlab offers (see the module docstring)."""

    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> float: ...

    @property
    def bits_per_weight(self) -> float: ...

    def dequantize(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...


KINDS: dict[str, type] = {}


def register_kind(cls):
    """Class decorator: make ``load_qtensor`` / ``from_state_dict`` know a QTensor class by its ``kind``."""
    KINDS[cls.kind] = cls
    return cls


def from_state_dict(state: dict) -> QTensor:
    kind = state.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown quantized-tensor kind {kind!r}; known: {sorted(KINDS)} "
                         f"(GGUF tensors register when qlab.gguf is imported)")
    return KINDS[kind].from_state_dict(state)


def save_qtensor(t: QTensor, path) -> None:
    """Write a quantized tensor's state dict (torch.save of tensors and plain metadata)."""
    torch.save(t.state_dict(), path)


def load_qtensor(path) -> QTensor:
    return from_state_dict(torch.load(path, weights_only=True))


_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def dtype_from_name(name: str) -> torch.dtype:
    """torch.float32 from "torch.float32" (how state dicts store a dtype); unknown names are a clear error."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in a state dict; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


@lru_cache(maxsize=None)
def _nibble_pairs(grid) -> torch.Tensor:
    """For each byte value b, the float32 values of its two 4-bit codes (b & 15 first, as packed), as one
    int64: index_select gathers 8 bytes per packed byte in one pass."""
    codes = unpack(torch.arange(256, dtype=torch.uint8), 4, 512, torch.uint8)
    return grid.decode(codes).view(torch.int64)


@lru_cache(maxsize=None)
def _grid_table(grid, bits: int) -> torch.Tensor:
    """The float32 values of the 2^bits codes of a 4- or 8-bit grid (the decoders' lookup table)."""
    return grid.decode(torch.arange(2**bits, dtype=torch.int32)).float()  # int32: an int grid's 255 is 255 + qmin


@register_kind
@dataclass
class QuantizedTensor:
    """Packed codes + scales (+ integer zero points or float minima) + the spec that made them.

    ``scale`` has ``spec.granularity.scale_shape(shape)``; with double quantization it is itself a
    QuantizedTensor of the scales minus ``scale_offset`` (their mean), as in QLoRA. ``zero_point``
    (integers, stored in the grid's bits) and ``minimum`` (floats, stored like the scales, ``spec.float_min``)
    never both appear:

        x_hat = scale * (q - zero_point)        or        x_hat = scale * q + minimum
    """

    kind = "quantized"

    spec: QuantSpec
    shape: tuple
    dtype: torch.dtype
    packed: torch.Tensor  # uint8 bit stream of the codes, see qlab.core.packing
    scale: object  # torch.Tensor | QuantizedTensor
    zero_point: torch.Tensor | None = None
    scale_offset: float = 0.0
    minimum: torch.Tensor | None = None

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
        """Grid values q of the codes (before scaling), in the tensor's shape, in a fresh tensor."""
        bits = self.spec.bits
        if bits == 4:  # one lookup per byte, of its two codes' values (~10x faster than unpacking the codes)
            pairs = _nibble_pairs(self.spec.grid).index_select(0, self.packed.to(torch.int32))
            return pairs.view(torch.float32)[: self.numel].reshape(self.shape)
        codes = unpack(self.packed, bits, self.numel, torch.uint8 if bits <= 8 else torch.int64)  # uint8: 1/8 of int64
        return self.spec.grid.decode(codes.reshape(self.shape))

    def dequantize(self) -> torch.Tensor:
        gran, grid, bits = self.spec.granularity, self.spec.grid, self.spec.bits
        L = run_length(gran, self.shape) if bits in (4, 8) and self.packed.is_cpu else None
        if L is not None and (bits == 8 or L % 2 == 0):  # one pass over the bytes, the same bits (unless autograd needs torch)
            scale = self.scales()
            if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (scale, self.zero_point, self.minimum))):
                decode = decode4 if bits == 4 else decode8
                x_hat = decode(self.packed, self.numel, _grid_table(grid, bits), L, scale, self.zero_point, self.minimum)
                return x_hat.view(self.shape).to(self.dtype)
        Q, _ = gran.to_groups(self.values())  # a fresh tensor (grids decode into new memory): scaled in place
        zp = None if self.zero_point is None else self.zero_point.reshape(-1).float()
        mn = None if self.minimum is None else self.minimum.reshape(-1).float()
        x_hat = _scales.dequantize_groups(Q, self.scales().reshape(-1), zp, mn, overwrite=True)
        return gran.from_groups(x_hat, self.shape).to(self.dtype)

    # ---- honest size -------------------------------------------------------------------------
    @property
    def nbytes(self) -> float:
        """Bytes of codes + scales + zero points (at the grid's width) or minima (at the scales' width)."""
        n = self.packed.numel()
        if isinstance(self.scale, QuantizedTensor):
            n += self.scale.nbytes + 4  # + the fp32 offset
        elif self.spec.rule != "none":
            n += self.scale.numel() * SCALE_DTYPES[self.spec.scale_dtype].itemsize
        if self.zero_point is not None:
            n += packed_nbytes(self.zero_point.numel(), self.spec.bits)
        if self.minimum is not None:
            n += self.minimum.numel() * SCALE_DTYPES[self.spec.scale_dtype].itemsize
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    # ---- saving ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        scale = self.scale.state_dict() if isinstance(self.scale, QuantizedTensor) else self.scale
        return {"kind": self.kind, "spec": str(self.spec), "shape": list(self.shape), "dtype": str(self.dtype),
                "packed": self.packed, "scale": scale, "zero_point": self.zero_point,
                "scale_offset": self.scale_offset, "minimum": self.minimum}

    @classmethod
    def from_state_dict(cls, state: dict) -> "QuantizedTensor":
        scale = state["scale"]
        if isinstance(scale, dict):
            scale = cls.from_state_dict(scale)
        spec = QuantSpec.parse(state["spec"])
        t = cls(spec, tuple(state["shape"]), dtype_from_name(state["dtype"]), state["packed"], scale,
                state["zero_point"], float(state["scale_offset"]), state.get("minimum"))
        if t.packed.numel() != packed_nbytes(t.numel, spec.bits):
            raise ValueError(f"state dict holds {t.packed.numel()} bytes of codes; {t.numel} codes of "
                             f"{spec.bits} bits take {packed_nbytes(t.numel, spec.bits)}")
        return t

    def __repr__(self):
        return (f"QuantizedTensor({self.spec}, shape={tuple(self.shape)}, "
                f"{self.nbytes:,} bytes, {self.bits_per_weight:.3f} bits/weight)")


@register_kind
@dataclass
class CodebookTensor:
    """Vector quantization of a weight [out, in] over groups of ``d`` consecutive input weights:

        W[o, g*d:(g+1)*d] = scale[o] * sum_m codebooks[m][codes[m, o, g]]          (AQLM, Egiazarian et al. 2024, eq. 2)

    ``codes`` [M, out, in/d] are integers below K = 2**bits (stored packed, ``bits`` each); ``codebooks``
    [M, K, d] and ``scale`` [out] are stored at fp16 (``scale`` may be None: no row scale). A codebook that
    is a fixed table shared by every layer (QuIP#'s E8P lattice codebook, computed from 256 entries and
    sign bits) costs nothing per tensor: ``learned_codebooks=False`` leaves it out of ``nbytes``.

    Example (M=1, d=2, K=2): codebooks [[[1, 0], [0, 1]]], codes [[[1, 0]]], scale [2] -> W = [[0, 2, 2, 0]].
    """

    kind = "codebook"

    shape: tuple
    codes: torch.Tensor
    codebooks: torch.Tensor
    scale: torch.Tensor | None
    bits: int
    dtype: torch.dtype = torch.float32
    learned_codebooks: bool = True

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"a codebook tensor is a 2-d weight [out, in], got shape {self.shape}")
        if self.codebooks.dim() != 3:
            raise ValueError(f"codebooks must be [M, K, d], got {tuple(self.codebooks.shape)}")
        M, K, d = self.codebooks.shape
        out, inp = self.shape
        if inp % d:
            raise ValueError(f"the input width {inp} is not a multiple of the codebook's group size d={d}")
        if K > 2**self.bits:
            raise ValueError(f"{K} codebook entries do not fit {self.bits}-bit codes")
        if tuple(self.codes.shape) != (M, out, inp // d):
            raise ValueError(f"codes must be [M={M}, out={out}, in/d={inp // d}], got {tuple(self.codes.shape)}")
        if self.codes.is_floating_point() or self.codes.numel() and (self.codes.min() < 0 or self.codes.max() >= K):
            raise ValueError(f"codes must be integers in [0, {K}) (the codebooks have {K} entries)")
        if self.scale is not None and tuple(self.scale.shape) != (out,):
            raise ValueError(f"scale must have one entry per output row ({out}), got {tuple(self.scale.shape)}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def group_size(self) -> int:
        return self.codebooks.shape[2]

    def dequantize(self) -> torch.Tensor:
        M = self.codebooks.shape[0]
        parts = torch.stack([self.codebooks[m].float()[self.codes[m].long()] for m in range(M)])  # [M, out, G, d]
        W = parts.sum(dim=0).reshape(self.shape)
        if self.scale is not None:
            W = W * self.scale.float()[:, None]
        return W.to(self.dtype)

    @property
    def nbytes(self) -> float:
        n = packed_nbytes(self.codes.numel(), self.bits)
        if self.learned_codebooks:
            n += self.codebooks.numel() * 2  # fp16
        if self.scale is not None:
            n += self.scale.numel() * 2
        return n

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def state_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype), "bits": self.bits,
                "codes": pack(self.codes, self.bits), "n_codes": self.codes.numel(),
                "codes_shape": list(self.codes.shape), "codebooks": self.codebooks, "scale": self.scale,
                "learned_codebooks": self.learned_codebooks}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CodebookTensor":
        codes = unpack(state["codes"], state["bits"], state["n_codes"]).reshape(state["codes_shape"])
        return cls(tuple(state["shape"]), codes, state["codebooks"], state["scale"], state["bits"],
                   dtype_from_name(state["dtype"]), bool(state["learned_codebooks"]))

    def __repr__(self):
        M, K, d = self.codebooks.shape
        return (f"CodebookTensor({M}x{self.bits} over groups of {d}, shape={self.shape}, "
                f"{self.nbytes:,} bytes, {self.bits_per_weight:.3f} bits/weight)")


def sign_nbytes(m: int, n: int) -> int:
    """Bytes of the two sign vectors of an m x n rotation, one bit per sign: ceil(n / 8) + ceil(m / 8)."""
    return math.ceil(n / 8) + math.ceil(m / 8)


def pack_signs(S: torch.Tensor) -> torch.Tensor:
    """+-1 signs -> a bit stream (bit set where the sign is -1)."""
    return pack(S < 0, 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_signs``: n signs +-1 as float64."""
    return 1.0 - 2.0 * unpack(packed, 1, n).double()


@register_kind
@dataclass
class RotatedTensor:
    """Any quantized tensor of a rotated weight W' = V_m S_V W S_U V_n^T, kept with the signs that turn it back
    (``qlab.core.rotations.RandomizedHadamard``; RTN or GPTQ with ``rotate=True``):

        dequantize() = S_V V_m^T inner.dequantize() V_n S_U          (computed in float64)

    ``inner`` is the QTensor [m, n] of W'; ``SU`` [n] and ``SV`` [m] are +-1, one bit each, so
    nbytes = inner.nbytes + ceil(n / 8) + ceil(m / 8). ``seed`` is the seed that drew them. Example: int3 g128 asym
    of a 192 x 576 weight, 3.165 bits per weight, is 3.165 + 8 * (72 + 24) / 110592 = 3.172 rotated.
    """

    kind = "rotated"

    inner: object  # a QTensor of the rotated weight
    SU: torch.Tensor
    SV: torch.Tensor
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if len(self.inner.shape) != 2:
            raise ValueError(f"a rotated tensor is a 2-d weight [out, in], got shape {tuple(self.inner.shape)}")
        check_signs(self.SU, self.SV, *self.shape)

    @classmethod
    def of(cls, inner, R, dtype: torch.dtype) -> "RotatedTensor":
        """Wrap ``inner`` (the QTensor of ``R.weight(W)``) with the signs of the RandomizedHadamard ``R``."""
        return cls(inner, R.SU, R.SV, R.seed, dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.inner.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rotation(self) -> RandomizedHadamard:
        return RandomizedHadamard.from_signs(self.SU, self.SV, self.seed)

    def dequantize(self) -> torch.Tensor:
        return self.rotation().weight_inverse(self.inner.dequantize().double()).to(self.dtype)

    @property
    def nbytes(self) -> float:
        return self.inner.nbytes + sign_nbytes(*self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def state_dict(self) -> dict:
        return {"kind": self.kind, "inner": self.inner.state_dict(), "SU": pack_signs(self.SU),
                "SV": pack_signs(self.SV), "seed": self.seed, "dtype": str(self.dtype)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RotatedTensor":
        inner = from_state_dict(state["inner"])
        m, n = inner.shape
        return cls(inner, unpack_signs(state["SU"], n), unpack_signs(state["SV"], m), int(state["seed"]),
                   dtype_from_name(state["dtype"]))

    def __repr__(self):
        return (f"RotatedTensor({self.inner!r}, + {sign_nbytes(*self.shape)} bytes of signs, "
                f"{self.bits_per_weight:.3f} bits/weight)")
