"""NF4 with double-quantized block constants (QLoRA, Dettmers et al. 2023, sec. 3).

A weight is cut into blocks of ``blocksize`` (64) consecutive elements of its row-major flattening;
each block keeps its absmax c1[b], and each element a 4-bit index into the 16 NF4 levels
(normal-distribution quantiles scaled to [-1, 1]):

    W[e] = NF4[code[e]] * c1[e // 64]

Double quantization (QLoRA eq. 6) stores the c1 themselves in 8 bits: subtract their mean, cut them
into blocks of 256 and quantize each block with its own fp32 absmax c2 onto the 8-bit "dynamic" map
of bitsandbytes (qlab's grid 'dynamic8', see ``qlab.core.quant.DOUBLE_QUANT_SPEC``; qlab's 'nf4' spec
rounds c1 to fp16 first, bitsandbytes keeps it in fp32). The kernels only look codes up in a 256-entry
table:

    c1[b] = table8[qc1[b]] * c2[b // 256] + mean

which costs 8/64 + 32/(64*256) = 0.127 bits per weight instead of 32/64 = 0.5.
Codes are packed two per byte, low nibble first (qlab's layout, see ``qlab.core.packing``; bitsandbytes
puts the first code in the high nibble). ``tests/kernels/peer_bitsandbytes.py`` feeds bitsandbytes'
own quantization state to these kernels and checks them bit for bit against its ``dequantize_4bit``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlab.kernels import dispatch
from qlab.kernels.w4a16 import unpack_int4

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

@dataclass
class NF4Weight:
    """An NF4 tensor with double-quantized absmax, as the kernels read it (raw tensors)."""

    packed: torch.Tensor  # uint8 [ceil(numel/2)]: NF4 codes, low nibble first
    levels: torch.Tensor  # fp32 [16]: the NF4 table
    absmax_codes: torch.Tensor  # uint8 [n_blocks]: the 8-bit codes of c1 - mean
    absmax_table: torch.Tensor  # fp32 [256]: the value of each 8-bit code
    absmax_scale: torch.Tensor  # fp32 [ceil(n_blocks / absmax_blocksize)]: c2
    absmax_mean: float  # the mean subtracted from c1 before its quantization
    shape: tuple
    blocksize: int = 64
    absmax_blocksize: int = 256

    @classmethod
    def from_quantized(cls, qt) -> "NF4Weight":
        """Adapt a ``qlab.core.quant.QuantizedTensor`` of spec 'nf4-b64-dq' (any block size)."""
        from qlab.core.granularity import PerBlock

        spec = qt.spec
        if spec.format != "nf4" or not isinstance(spec.granularity, PerBlock) or not spec.double_quant:
            raise ValueError(f"the NF4 kernels need an 'nf4-b<size>-dq' tensor, got {qt!r}")
        inner = qt.scale  # the QuantizedTensor of c1 - mean: 'dynamic8' codes, blocks of 256
        return cls(qt.packed, spec.grid.levels.float(), inner.packed,
                   inner.spec.grid.decode(torch.arange(256)).float(), inner.scales().reshape(-1),
                   float(qt.scale_offset), tuple(qt.shape), spec.granularity.size, inner.spec.granularity.size)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def absmax(self) -> torch.Tensor:
        """The decoded first-level constants c1 [n_blocks]."""
        b = torch.arange(self.absmax_codes.numel(), device=self.absmax_codes.device)
        c2 = self.absmax_scale[b // self.absmax_blocksize]
        return self.absmax_table[self.absmax_codes.long()] * c2 + self.absmax_mean

    @property
    def bits_per_weight(self) -> float:
        return 4 + 8 / self.blocksize + 32 / (self.blocksize * self.absmax_blocksize)


def nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> NF4Weight:
    """NF4 with double-quantized absmax, by qlab's core quantizer (spec 'nf4-b{blocksize}-dq')."""
    from qlab.core.quant import quantize

    return NF4Weight.from_quantized(quantize(w, f"nf4-b{blocksize}-dq"))


def nf4_dequantize_reference(weight: NF4Weight) -> torch.Tensor:
    """Torch reference: W[e] = NF4[code[e]] * c1[e // blocksize], in fp32."""
    codes = unpack_int4(weight.packed, weight.numel)
    c1 = weight.absmax()
    e = torch.arange(weight.numel, device=codes.device)
    return (weight.levels[codes] * c1[e // weight.blocksize]).reshape(weight.shape)


def nf4_gemv_reference(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """Torch reference: x @ dequantize(W).T in fp32, cast to x's dtype."""
    return (x.float() @ nf4_dequantize_reference(weight).T).to(x.dtype)


@dispatch.kernel(default=dict(BLOCK=256),
                 autotune=[dict(BLOCK=b, num_warps=w) for b, w in [(512, 4), (1024, 4), (2048, 8)]],
                 key=("numel",))
def _dequantize_kernel(packed_ptr, qabs_ptr, c2_ptr, levels_ptr, table_ptr, out_ptr, numel, mean,
                       BLOCKSIZE: tl.constexpr, ABS_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((e & 1) * 4)) & 0xF
    b = e // BLOCKSIZE  # first-level block
    qc1 = tl.load(qabs_ptr + b, mask=mask, other=0).to(tl.int32)
    c1 = tl.load(table_ptr + qc1) * tl.load(c2_ptr + b // ABS_BLOCKSIZE, mask=mask, other=0.0) + mean
    w = tl.load(levels_ptr + code) * c1
    tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=mask)


@dispatch.kernel(default=dict(BLOCK_N=32, BLOCK_K=32),
                 autotune=[dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
                           for bn, bk, w in [(32, 64, 2), (64, 64, 4), (128, 64, 4), (64, 128, 4)]],
                 key=("N", "K"))
def _gemv_kernel(x_ptr, packed_ptr, qabs_ptr, c2_ptr, levels_ptr, table_ptr, y_ptr, N, K, stride_xm, stride_ym,
                 mean, BLOCKSIZE: tl.constexpr, ABS_BLOCKSIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask = (k[:, None] < K) & (rn[None, :] < N)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        e = rn[None, :].to(tl.int64) * K + k[:, None]  # [BK, BN] flat index of W[n, k]
        byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> ((e & 1) * 4).to(tl.int32)) & 0xF
        b = e // BLOCKSIZE
        qc1 = tl.load(qabs_ptr + b, mask=mask, other=0).to(tl.int32)
        c1 = tl.load(table_ptr + qc1) * tl.load(c2_ptr + b // ABS_BLOCKSIZE, mask=mask, other=0.0) + mean
        w = tl.load(levels_ptr + code) * c1
        acc += tl.sum(w * x[:, None], axis=0)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def _tables(weight: NF4Weight, device):
    return (weight.levels.float().to(device).contiguous(), weight.absmax_table.float().to(device).contiguous())


def nf4_dequantize(weight: NF4Weight, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """The dense weight W[e] = NF4[code[e]] * c1[e // blocksize] in ``dtype``."""
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return nf4_dequantize_reference(weight).to(dtype)
    device = weight.packed.device
    out = torch.empty(weight.numel, dtype=dtype, device=device)
    levels, table = _tables(weight, device)
    grid = lambda meta: (dispatch.cdiv(weight.numel, meta["BLOCK"]),)  # noqa: E731
    _dequantize_kernel.launch(backend, grid, weight.packed, weight.absmax_codes, weight.absmax_scale.float(),
                              levels, table, out, weight.numel, weight.absmax_mean,
                              BLOCKSIZE=weight.blocksize, ABS_BLOCKSIZE=weight.absmax_blocksize,
                              enable_fp_fusion=False)  # no FMA: bit-exact with the reference
    return out.reshape(weight.shape)


def nf4_gemv(x: torch.Tensor, weight: NF4Weight, backend: str | None = None) -> torch.Tensor:
    """y = x @ W.T for an NF4 weight [N, K], dequantizing inside the K loop; x [..., K] (few rows)."""
    if len(weight.shape) != 2:
        raise ValueError(f"nf4_gemv needs a 2-d weight [N, K], got shape {weight.shape}")
    n, k = weight.shape
    x2 = dispatch.as_rows(x, k)
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return nf4_gemv_reference(x, weight)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    levels, table = _tables(weight, x.device)
    grid = lambda meta: (x2.shape[0], dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _gemv_kernel.launch(backend, grid, x2, weight.packed, weight.absmax_codes, weight.absmax_scale.float(),
                        levels, table, y, n, k, x2.stride(0), y.stride(0), weight.absmax_mean,
                        BLOCKSIZE=weight.blocksize, ABS_BLOCKSIZE=weight.absmax_blocksize)
    return y.reshape(*x.shape[:-1], n)
