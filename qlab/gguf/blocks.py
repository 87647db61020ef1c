"""GGUF block formats: the registry, the shared reshaping, and the quantized tensor they produce.

A GGUF block format cuts every row of a weight matrix into blocks of ``block_size`` values and
stores each block in ``type_size`` bytes (llama.cpp's ``ggml-common.h`` structs; both numbers are read
from the gguf package's ``GGML_QUANT_SIZES`` for the format's ``ggml_type``). So

    bits per weight = 8 · type_size / block_size        (Q4_K: 8·144/256 = 4.5)

The base class :class:`BlockFormat` does all the reshaping (rows -> blocks -> rows, chunking,
importance weights); a subclass implements only ``quantize_blocks`` / ``dequantize_blocks`` on a
``[B, block_size]`` float32 array <-> a ``[B, type_size]`` uint8 array, byte for byte as llama.cpp.

>>> FORMATS["Q4_K"].bits_per_weight, FORMATS["Q8_0"].bits_per_weight
(4.5, 8.5)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES, QK_K  # QK_K: the k-quants' super-block size (256)

from qlab.core.tensor import dtype_from_name, register_kind
from qlab.gguf.search import F32, seqsum

FORMATS: dict[str, "BlockFormat"] = {}


def register(cls):
    """Class decorator: add one instance of a block format to :data:`FORMATS` under its name."""
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> "BlockFormat":
    try:
        return FORMATS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown GGUF block format {name!r}; known: {sorted(FORMATS)}") from None


# ---------------------------------------------------------------- byte helpers (little endian)

def f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 [B] -> [B, 2] uint8 of the IEEE half (round to nearest even, as ggml)."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def f16_round(x: np.ndarray) -> np.ndarray:
    """The float32 value that a half-precision store then load gives back."""
    return x.astype(np.float16).astype(F32)


def f16_field(data: np.ndarray, offset: int) -> np.ndarray:
    """Bytes ``offset, offset+1`` of each block ``[B, type_size]`` as a (strided) float16 view [B].

    Every fp16 field of every format sits at an even offset of an even-sized block, so the blocks
    viewed as halves hold it at column offset/2; writing to the view stores a float32 as its half
    (round to nearest even, as ggml).
    """
    return np.ascontiguousarray(data).view(np.float16)[:, offset // 2]


def finite_f16(field: np.ndarray) -> np.ndarray:
    """Which halves are finite: their exponent bits are not all ones (np.isfinite on float16 is ~5x slower)."""
    return (field.view(np.uint16) & 0x7C00) != 0x7C00


def read_f16(data: np.ndarray, offset: int) -> np.ndarray:
    """Bytes ``offset, offset+1`` of each block as a half, returned as float32 [B]."""
    return f16_field(data, offset).astype(F32)


# ---------------------------------------------------------------- the base class

class BlockFormat:
    """One GGUF block format. Subclasses set the class attributes and the two block methods."""

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int  # values per block   } both from GGML_QUANT_SIZES[ggml_type],
    type_size: int  # bytes per block     } set when a subclass names its ggml_type
    f16_offsets: tuple[int, ...]  # byte offsets of the fp16 fields (d, dmin/m) inside a block

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "ggml_type" in cls.__dict__:
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml_type]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    # -- subclass API
    def quantize_blocks(self, x: np.ndarray, qw: np.ndarray | None, sigma2: np.ndarray | None) -> np.ndarray:
        """``x [B, block_size]`` float32 -> ``[B, type_size]`` uint8.

        ``qw`` are the importance weights of each value (the imatrix entry of its column) or None;
        ``sigma2 [B]`` is the mean square of the whole row the block comes from (the legacy
        formats' imatrix path weighs each value by ``qw·sqrt(sigma2 + x²)``).
        """
        raise NotImplementedError

    def dequantize_blocks(self, data: np.ndarray) -> np.ndarray:
        """``[B, type_size]`` uint8 -> ``[B, block_size]`` float32."""
        raise NotImplementedError

    def quantize_ref(self, blocks: np.ndarray, out: np.ndarray) -> bool:
        """Optional: the reference (no imatrix) path in one compiled pass, ``blocks [B, block_size]`` float32
        straight into ``out [B, type_size]``, returning True when every value and every fp16 field came out
        finite. On False (and for formats without such a loop) :meth:`quantize_rows` takes the general
        path, which checks the input first and names what is wrong."""
        return False

    # -- reshaping, shared by all formats
    def check_row(self, n: int) -> None:
        if n % self.block_size:
            raise ValueError(f"{self.name} needs rows whose length is a multiple of {self.block_size}; got {n}")

    def check_imatrix(self, imatrix, n: int, name: str | None = None) -> np.ndarray:
        """The importance vector as float32 ``[n]``, or a ValueError saying what is wrong with it.

        llama.cpp weighs each value's squared error by its column's entry, so an entry must be finite
        and >= 0, and not all of them 0: an all-zero (or NaN, or negative) imatrix makes every scale
        search return 0 and the whole tensor quantizes to zeros (llama-quantize refuses non-finite
        entries too).
        """
        what = f"imatrix for {name}" if name else "imatrix"
        imatrix = np.asarray(imatrix, dtype=F32).reshape(-1)
        if imatrix.shape[0] != n:
            raise ValueError(f"{what} has {imatrix.shape[0]} entries, rows have {n}: pass one importance "
                             f"value per input column (the mean of x² over the calibration tokens)")
        bad = ~np.isfinite(imatrix)
        if bad.any():
            raise ValueError(f"{what} has {int(bad.sum())} non-finite entries (first at column "
                             f"{int(np.argmax(bad))}): recompute it, or drop it to quantize without one")
        if (imatrix < 0).any():
            raise ValueError(f"{what} has {int((imatrix < 0).sum())} negative entries (first at column "
                             f"{int(np.argmax(imatrix < 0))}, {float(imatrix[imatrix < 0][0]):g}); importances "
                             f"are means of x² and must be >= 0")
        if not imatrix.any():
            raise ValueError(f"{what} is all zeros: every block would quantize to 0; recompute it on "
                             f"calibration data that reaches this layer, or drop it to quantize without one")
        return imatrix

    def quantize_rows(self, rows: np.ndarray, imatrix: np.ndarray | None = None,
                      chunk_elems: int = 1 << 20, name: str | None = None) -> np.ndarray:
        """``[R, n]`` float32 -> ``[R, n/block_size·type_size]`` uint8 (what llama.cpp writes).

        Raises ValueError (naming ``name``, the tensor, when given) for non-finite values, a bad
        ``imatrix`` (:meth:`check_imatrix`), or values too large for the fp16 scales: llama.cpp
        would write NaN/inf scales there (or, for Q2_K/Q3_K and a NaN, silently zero the block); so are
        rows with an |x| above sqrt(FLT_MAX) ~ 1.8e19, whose squares overflow the weighted searches (llama.cpp
        writes 0 or NaN scales for them).
        """
        what = f"tensor {name}" if name else "input"
        rows = np.ascontiguousarray(rows, dtype=F32)
        R, n = rows.shape
        self.check_row(n)
        nb = n // self.block_size
        if imatrix is None:  # the fast path: no pass over the data beforehand, the loop itself reports trouble
            out = np.empty((R, nb * self.type_size), np.uint8)
            if self.quantize_ref(rows.reshape(R * nb, self.block_size), out.reshape(R * nb, self.type_size)):
                return out
        huge = np.zeros(R, bool)  # rows with an x² beyond float32: the weighted searches overflow there
        with np.errstate(over="ignore", invalid="ignore"):  # one pass: NaN, inf or x² > FLT_MAX make Σx² non-finite
            flat = rows.reshape(-1)
            finite = bool(np.isfinite(np.dot(flat, flat)))
        bad = None if finite else ~np.isfinite(rows)
        if bad is not None and bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{self.name}: {what} has {int(bad.sum())} non-finite values (first at row {r}, "
                             f"column {c}: {rows[r, c]}); GGUF quantization needs finite data (llama.cpp "
                             f"refuses it too): fix or drop those values first")
        if not finite:
            huge = np.abs(rows).max(axis=1) > np.sqrt(np.finfo(F32).max)
        if imatrix is not None:
            imatrix = self.check_imatrix(imatrix, n, name)
        out = np.empty((R, nb * self.type_size), np.uint8)
        step = max(1, chunk_elems // n)
        for r0 in range(0, R, step):
            x = rows[r0:r0 + step]
            r = x.shape[0]
            blocks = x.reshape(r * nb, self.block_size)
            qw = sigma2 = None
            with np.errstate(all="ignore"):    # overflows end as non-finite scales, refused below
                if imatrix is not None:
                    qw = np.broadcast_to(imatrix.reshape(nb, self.block_size), (r, nb, self.block_size))
                    qw = qw.reshape(r * nb, self.block_size)
                    sigma2 = np.repeat(seqsum(x * x) / F32(n), nb)
                out[r0:r0 + r] = self.quantize_blocks(blocks, qw, sigma2).reshape(r, -1)
        if huge.any() or not self.finite_scales(out):
            bad_rows = np.flatnonzero(huge | ~self.finite_scales_per_row(out))
            raise ValueError(f"{self.name}: {what} is too large for fp16 block scales (row {int(bad_rows[0])}, "
                             f"max |x| = {float(np.abs(rows[bad_rows[0]]).max()):g}; fp16 holds at most 65504): "
                             f"the scales would be inf/NaN. Rescale the tensor or keep it in F32")
        return out

    def dequantize_rows(self, data: np.ndarray, n: int) -> np.ndarray:
        """``[R, bytes]`` uint8 -> ``[R, n]`` float32."""
        self.check_row(n)
        R = data.shape[0]
        nb = n // self.block_size
        if data.shape[1] != nb * self.type_size:
            raise ValueError(f"{self.name}: a row of {n} values takes {nb * self.type_size} bytes, got {data.shape[1]}")
        blocks = np.ascontiguousarray(data).reshape(R * nb, self.type_size)
        return self.dequantize_blocks(blocks).reshape(R, n)

    def finite_scales_per_row(self, data: np.ndarray) -> np.ndarray:
        """``[R]`` bool for ``[R, bytes]`` data: every fp16 scale/min field of the row is finite."""
        blocks = np.ascontiguousarray(data).reshape(-1, self.type_size)
        ok = np.logical_and.reduce([finite_f16(f16_field(blocks, o)) for o in self.f16_offsets])
        return ok.reshape(data.shape[0], -1).all(axis=1)

    def finite_scales(self, data: np.ndarray) -> bool:
        """True when every fp16 scale/min field of every block is finite (no corrupted NaN/inf)."""
        blocks = np.ascontiguousarray(data).reshape(-1, self.type_size)
        return all(finite_f16(f16_field(blocks, o)).all() for o in self.f16_offsets)

    def __repr__(self):
        return f"{self.name}(block={self.block_size}, bytes={self.type_size}, bpw={self.bits_per_weight:g})"


def format_table() -> list[dict]:
    """One row per block format: name, block size, bytes per block, effective bits per weight."""
    return [dict(name=f.name, block_size=f.block_size, type_size=f.type_size, bits_per_weight=f.bits_per_weight)
            for f in FORMATS.values()]


# ---------------------------------------------------------------- the quantized tensor

@register_kind
@dataclass
class GGUFTensor:
    """A tensor stored in a GGUF block format (the bytes llama.cpp would hold in memory).

    Implements the quantized-tensor protocol (``qlab.core.tensor.QTensor``): ``.shape``, ``.nbytes``,
    ``.bits_per_weight``, ``.dequantize()``, ``.state_dict()``. ``data`` is ``[rows, bytes_per_row]``
    uint8, rows being all leading dims of ``shape`` flattened.
    """

    kind = "gguf"

    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray
    dtype: torch.dtype = torch.float32

    @property
    def format(self) -> BlockFormat:
        return get_format(self.qtype)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def dequantize(self) -> torch.Tensor:
        rows = self.format.dequantize_rows(self.data, self.shape[-1])
        return torch.from_numpy(rows.reshape(self.shape)).to(self.dtype)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "qtype": self.qtype, "shape": list(self.shape), "dtype": str(self.dtype),
                "data": torch.from_numpy(np.ascontiguousarray(self.data))}

    @classmethod
    def from_state_dict(cls, state: dict) -> "GGUFTensor":
        fmt = get_format(state["qtype"])
        shape = tuple(state["shape"])
        data = state["data"].numpy()
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        if data.dtype != np.uint8 or data.shape != (rows, shape[-1] // fmt.block_size * fmt.type_size):
            raise ValueError(f"{fmt.name} bytes for shape {shape} must be uint8 [{rows}, "
                             f"{shape[-1] // fmt.block_size * fmt.type_size}], got {data.dtype} {data.shape}")
        return cls(fmt.name, shape, data, dtype_from_name(state["dtype"]))

    def __repr__(self):
        return f"GGUFTensor({self.qtype}, shape={tuple(self.shape)}, {self.bits_per_weight:g} bpw)"


def quantize(x, qtype: str, imatrix=None, name: str | None = None) -> GGUFTensor:
    """Quantize a tensor (torch or numpy, last dim = rows) to a GGUF block format.

    ``imatrix`` (length = last dim, finite, >= 0, not all zero) switches to llama.cpp's
    importance-weighted search, as ``llama-quantize --imatrix`` does; without it the reference
    (``*_ref``) path is used. ``name`` (the tensor's) only goes into error messages.
    Non-finite values, or values too large for fp16 scales, raise a ValueError.
    """
    fmt = get_format(qtype)
    is_torch = isinstance(x, torch.Tensor)
    dtype = x.dtype if is_torch else torch.float32
    arr = x.detach().float().cpu().numpy() if is_torch else np.asarray(x, dtype=F32)
    if arr.ndim == 0:
        raise ValueError("cannot block-quantize a scalar")
    if imatrix is not None and isinstance(imatrix, torch.Tensor):
        imatrix = imatrix.detach().float().cpu().numpy()
    rows = arr.reshape(-1, arr.shape[-1])
    data = fmt.quantize_rows(rows, imatrix, name=name)
    return GGUFTensor(fmt.name, tuple(arr.shape), data, dtype)


def dequantize(t: GGUFTensor) -> torch.Tensor:
    return t.dequantize()
