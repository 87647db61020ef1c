"""KV-cache quantization in the KIVI layout (Liu et al. 2024, KIVI, sec. 3): 2 or 4 bits, asymmetric.

Keys have a few outlier *channels*, values do not; so KIVI quantizes keys per channel and values per
token, in groups of G elements:

    keys   [T, D]: one (scale, min) per channel d and per group of G consecutive tokens
    values [T, D]: one (scale, min) per token t and per group of G consecutive channels

and in each group (asymmetric min-max, b bits):

    scale = (max - min) / (2**b - 1),  q = clamp(round((x - min) / scale), 0, 2**b - 1),  x ~ q * scale + min

(round half to even; a constant group gets scale 1). Example, b = 2, group [0.0, 0.1, 0.3, 0.6]:
scale = 0.2, q = [0, 0, 2, 3] (0.5 rounds to even 0), x ~ [0.0, 0.0, 0.4, 0.6].

Codes are packed along the channel axis in qlab's little-endian bitstream (2-bit: 4 per byte, the
first in the lowest bits), so each token's row of D codes takes D * b / 8 bytes. The tensors may
carry leading dimensions (batch, heads): x has shape [..., T, D]. KIVI also keeps the most recent
tokens in full precision (the residual); that bookkeeping belongs to the cache (``qlab.methods.kv``), not to
this kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch

from qlab.core.packing import packed_nbytes
from qlab.core.quant import validate
from qlab.core.spec import QuantSpec
from qlab.core.tensor import dtype_from_name, register_kind
from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

AXES = {"key": 0, "value": 1}  # the axis of [T, D] along which a group runs: tokens for keys, channels for values


@register_kind
@dataclass
class KVQuantized:
    """Quantized keys or values in the kernel's layout; implements the quantized-tensor protocol.

    It is the core spec ``self.spec`` (int{bits}, float minimum, fp32 scales, groups of G tokens per channel
    for keys, of G channels per token for values) with the statistics laid out for the kernel: keys
    [..., ceil(T/G), D] where the core keeps [..., D, ceil(T/G)]; :meth:`to_quantized` gives the core tensor.
    """

    kind = "kivi"

    packed: torch.Tensor  # uint8 [..., T, D * bits / 8]
    scale: torch.Tensor  # fp32: keys [..., ceil(T/G), D], values [..., T, ceil(D/G)]
    minimum: torch.Tensor  # fp32, same shape as scale
    shape: tuple  # [..., T, D]
    bits: int
    group_size: int
    which: str  # 'key' or 'value'
    dtype: torch.dtype = torch.float32

    @property
    def spec(self) -> QuantSpec:
        """The equivalent core spec (:func:`kivi_spec`)."""
        return kivi_spec(self.which, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        """Codes + fp32 scales + fp32 minima."""
        return self.packed.numel() + 4 * (self.scale.numel() + self.minimum.numel())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)

    def dequantize(self) -> torch.Tensor:
        return kivi_dequantize_reference(self).to(self.dtype)

    def to_quantized(self):
        """The same codes and statistics as a core ``QuantizedTensor`` of :attr:`spec`."""
        from qlab.core.tensor import QuantizedTensor

        stats = (lambda s: s.transpose(-1, -2)) if self.which == "key" else (lambda s: s)
        return QuantizedTensor(self.spec, tuple(self.shape), self.dtype, self.packed.reshape(-1), stats(self.scale).contiguous(),
                               minimum=stats(self.minimum).contiguous())

    def state_dict(self) -> dict:
        return {"kind": self.kind, "packed": self.packed, "scale": self.scale, "minimum": self.minimum,
                "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "which": self.which,
                "dtype": str(self.dtype)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "KVQuantized":
        t = cls(state["packed"], state["scale"], state["minimum"], tuple(state["shape"]), int(state["bits"]),
                int(state["group_size"]), state["which"], dtype_from_name(state["dtype"]))
        _check(t.shape, t.bits, t.group_size, t.which)
        if t.packed.numel() != packed_nbytes(math.prod(t.shape), t.bits):
            raise ValueError(f"{t.packed.numel()} bytes cannot hold the codes of a {t.shape} tensor at {t.bits} bits")
        return t


def kivi_spec(which: str, bits: int = 2, group_size: int = 32) -> QuantSpec:
    """The core spec of KIVI's keys ('key': groups of G tokens per channel) or values ('value': groups of G
    channels per token): int{bits}, min-max with a float minimum, fp32 scales."""
    if which not in AXES:
        raise ValueError(f"which must be 'key' or 'value', got {which!r}")
    axis = "@-2" if which == "key" else ""
    return QuantSpec.parse(f"int{bits}-g{group_size}{axis}-asym-minmax-fmin-sfp32")


def _stats_shape(t: int, d: int, g: int, kind: str) -> tuple:
    return (-(-t // g), d) if kind == "key" else (t, -(-d // g))


def _check(x_shape, bits: int, group_size: int, kind: str):
    if kind not in AXES:
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    if bits not in (2, 4):
        raise ValueError(f"KIVI quantizes to 2 or 4 bits, got {bits}")
    if group_size < 1 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two, got {group_size}")
    if len(x_shape) < 2 or x_shape[-1] % (8 // bits):
        raise ValueError(f"need x [..., T, D] with D a multiple of {8 // bits} to pack {bits}-bit codes, got {tuple(x_shape)}")


def kivi_quantize_reference(x: torch.Tensor, bits: int, group_size: int, kind: str) -> KVQuantized:
    """Torch reference: group with reshapes, min-max per group, pack along D."""
    _check(x.shape, bits, group_size, kind)
    *lead, t, d = x.shape
    g = group_size
    xf = x.float().reshape(-1, t, d)
    if kind == "key":  # groups of g tokens: pad T with copies of the last token (no effect on min/max)
        nt = -(-t // g)
        xp = torch.cat([xf, xf[:, -1:].expand(-1, nt * g - t, d)], dim=1).reshape(-1, nt, g, d)
        mn, mx = xp.amin(dim=2), xp.amax(dim=2)  # [B, T/g, D]
        mn_e, mx_e = mn.repeat_interleave(g, 1)[:, :t], mx.repeat_interleave(g, 1)[:, :t]
    else:  # groups of g channels
        nd = -(-d // g)
        xp = torch.cat([xf, xf[..., -1:].expand(-1, t, nd * g - d)], dim=2).reshape(-1, t, nd, g)
        mn, mx = xp.amin(dim=3), xp.amax(dim=3)  # [B, T, D/g]
        mn_e, mx_e = mn.repeat_interleave(g, 2)[..., :d], mx.repeat_interleave(g, 2)[..., :d]
    qmax = 2**bits - 1
    scale = torch.where(mx > mn, (mx - mn) / qmax, torch.ones_like(mn))
    scale_e = torch.where(mx_e > mn_e, (mx_e - mn_e) / qmax, torch.ones_like(mn_e))
    q = torch.round((xf - mn_e) / scale_e).clamp(0, qmax).to(torch.int64)  # [B, T, D]
    per_byte = 8 // bits
    shifts = bits * torch.arange(per_byte, device=x.device)
    packed = (q.reshape(-1, t, d // per_byte, per_byte) << shifts).sum(-1).to(torch.uint8)
    return KVQuantized(packed.reshape(*lead, t, d // per_byte), scale.reshape(*lead, *scale.shape[1:]),
                       mn.reshape(*lead, *mn.shape[1:]), tuple(x.shape), bits, group_size, kind)


def kivi_dequantize_reference(qkv: KVQuantized) -> torch.Tensor:
    """Torch reference: x ~ q * scale + min, in fp32."""
    *lead, t, d = qkv.shape
    per_byte = 8 // qkv.bits
    p = qkv.packed.reshape(-1, t, d // per_byte).to(torch.int64)
    q = ((p[..., None] >> (qkv.bits * torch.arange(per_byte, device=p.device))) & (2**qkv.bits - 1)).reshape(-1, t, d)
    axis = 1 if qkv.which == "key" else 2
    scale = qkv.scale.reshape(q.shape[0], *qkv.scale.shape[-2:]).repeat_interleave(qkv.group_size, axis)
    mn = qkv.minimum.reshape(scale.shape[0], *qkv.minimum.shape[-2:]).repeat_interleave(qkv.group_size, axis)
    return (q.float() * scale[:, :t, :d] + mn[:, :t, :d]).reshape(qkv.shape)


@dispatch.kernel(default=dict(TILE=32), autotune=[dict(TILE=t, num_warps=w) for t, w in [(32, 2), (64, 4), (128, 4)]],
                 key=("T", "D"))
def _quantize_kernel(x_ptr, packed_ptr, scale_ptr, min_ptr, T, D, n_stat_cols,
                     stride_xb, stride_xt, stride_pb, stride_sb,
                     BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr, TILE: tl.constexpr):
    # A program quantizes one [ROWS, COLS] tile of x[b] = [T, D]: keys (AXIS 0) take a tile of GROUP
    # tokens x TILE channels and reduce over the tokens; values take TILE tokens x GROUP channels.
    ROWS: tl.constexpr = GROUP if AXIS == 0 else TILE
    COLS: tl.constexpr = TILE if AXIS == 0 else GROUP
    PER_BYTE: tl.constexpr = 8 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(2)
    rt = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rd = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (rt[:, None] < T) & (rd[None, :] < D)
    x = tl.load(x_ptr + b * stride_xb + rt[:, None] * stride_xt + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(mask, x, float("inf")), axis=AXIS)
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=AXIS)
    empty = mn > mx  # stats of a group lying wholly outside the tensor: make them finite
    mn, mx = tl.where(empty, 0.0, mn), tl.where(empty, 0.0, mx)
    scale = tl.where(mx > mn, tl.div_rn(mx - mn, QMAX * 1.0), 1.0)
    if AXIS == 0:  # stats [T/G, D]: one row of them for this tile
        stat = tl.program_id(0) * n_stat_cols + rd
        tl.store(scale_ptr + b * stride_sb + stat, scale, mask=rd < D)
        tl.store(min_ptr + b * stride_sb + stat, mn, mask=rd < D)
        v = tl.div_rn(x - mn[None, :], scale[None, :])
    else:  # stats [T, D/G]: one column of them for this tile
        stat = rt * n_stat_cols + tl.program_id(1)
        tl.store(scale_ptr + b * stride_sb + stat, scale, mask=rt < T)
        tl.store(min_ptr + b * stride_sb + stat, mn, mask=rt < T)
        v = tl.div_rn(x - mn[:, None], scale[:, None])
    r = tl.floor(v + 0.5)
    r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even
    q = tl.minimum(tl.maximum(r, 0.0), QMAX * 1.0).to(tl.int32)
    # pack PER_BYTE neighbours along D into one byte, the first in the lowest bits
    q3 = tl.reshape(q, (ROWS, COLS // PER_BYTE, PER_BYTE))
    shifts = (tl.arange(0, PER_BYTE) * BITS)[None, None, :]
    byte = tl.sum(q3 << shifts, axis=2)  # [ROWS, COLS / PER_BYTE]
    rbyte = tl.program_id(1) * (COLS // PER_BYTE) + tl.arange(0, COLS // PER_BYTE)
    bmask = (rt[:, None] < T) & (rbyte[None, :] < D // PER_BYTE)
    tl.store(packed_ptr + b * stride_pb + rt[:, None] * (D // PER_BYTE) + rbyte[None, :], byte.to(tl.uint8), mask=bmask)


@dispatch.kernel(default=dict(BLOCK=256), autotune=[dict(BLOCK=b, num_warps=w) for b, w in [(512, 4), (1024, 4)]],
                 key=("numel",))
def _dequantize_kernel(packed_ptr, scale_ptr, min_ptr, out_ptr, numel, T, D, n_stat_cols,
                       BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index into [B, T, D]
    mask = e < numel
    d = e % D
    t = (e // D) % T
    b = e // (T * D)
    bit = e * BITS  # rows are whole bytes (D * BITS % 8 == 0), so the stream index is the flat one
    byte = tl.load(packed_ptr + (bit >> 3), mask=mask, other=0).to(tl.int32)
    q = (byte >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)
    if AXIS == 0:
        stat = b * ((T + GROUP - 1) // GROUP) * n_stat_cols + (t // GROUP) * n_stat_cols + d
    else:
        stat = b * T * n_stat_cols + t * n_stat_cols + d // GROUP
    scale = tl.load(scale_ptr + stat, mask=mask, other=0.0)
    mn = tl.load(min_ptr + stat, mask=mask, other=0.0)
    tl.store(out_ptr + e, (q.to(tl.float32) * scale + mn).to(out_ptr.dtype.element_ty), mask=mask)


def kivi_quantize(x: torch.Tensor, bits: int = 2, group_size: int = 32, kind: str = "key",
                  backend: str | None = None) -> KVQuantized:
    """Quantize keys (per channel) or values (per token) of shape [..., T, D] in groups of ``group_size``."""
    _check(x.shape, bits, group_size, kind)
    validate(x, "x")
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return kivi_quantize_reference(x, bits, group_size, kind)
    *lead, t, d = x.shape
    x3 = x.reshape(-1, t, d).contiguous()
    nb = x3.shape[0]
    st, sd = _stats_shape(t, d, group_size, kind)
    packed = torch.empty(nb, t, d * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, st, sd, dtype=torch.float32, device=x.device)
    mn = torch.empty_like(scale)
    axis = AXES[kind]
    if axis == 0:
        grid = lambda meta: (st, dispatch.cdiv(d, meta["TILE"]), nb)  # noqa: E731
    else:
        grid = lambda meta: (dispatch.cdiv(t, meta["TILE"]), sd, nb)  # noqa: E731
    _quantize_kernel.launch(backend, grid, x3, packed, scale, mn, t, d, sd, x3.stride(0), x3.stride(1),
                            packed.stride(0), scale.stride(0), BITS=bits, GROUP=group_size, AXIS=axis)
    return KVQuantized(packed.reshape(*lead, t, -1), scale.reshape(*lead, st, sd), mn.reshape(*lead, st, sd),
                       tuple(x.shape), bits, group_size, kind)


def kivi_dequantize(qkv: KVQuantized, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """x ~ q * scale + min, as a dense [..., T, D] tensor of ``dtype``."""
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return kivi_dequantize_reference(qkv).to(dtype)
    *_, t, d = qkv.shape
    numel = int(torch.Size(qkv.shape).numel())
    out = torch.empty(numel, dtype=dtype, device=qkv.packed.device)
    grid = lambda meta: (dispatch.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    _dequantize_kernel.launch(backend, grid, qkv.packed.contiguous(), qkv.scale.contiguous(),
                              qkv.minimum.contiguous(), out, numel, t, d, qkv.scale.shape[-1],
                              BITS=qkv.bits, GROUP=qkv.group_size, AXIS=AXES[qkv.which],
                              enable_fp_fusion=False)  # no FMA: bit-exact with the reference
    return out.reshape(qkv.shape)
