"""W4A16: a matmul whose weights stay 4-bit in memory and are dequantized inside the K loop.

    y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = scale[n, k // g] * (code[n, k] - zero[n, k // g])

``x`` is fp16 / bf16 / fp32, ``code`` are 4-bit integers packed two per byte, and the products are
accumulated in fp32. Only the packed codes (0.5 byte per weight) plus one scale (and zero) per group
of ``g`` weights travel from memory; the fp16 weight tile exists only in registers.

Packed layout (qlab's, see ``qlab.core.packing``): the codes of the [N, K] weight, in row-major order,
form one little-endian stream of nibbles, so weight (n, k) is code number ``e = n * K + k``, found
in byte ``e // 2``, low nibble if ``e`` is even. Example: codes [1, 2, 15] pack to bytes
[0x21, 0x0F]. ``scale`` and ``zero`` have shape [N, ceil(K / g)]; the last group may be shorter.

qlab's grids store a value q as the offset-binary code q - qmin, and ``QuantizedTensor.dequantize``
computes scale * (q - zero_point); so the kernel's ``zero`` is zero_point - qmin: the zero point
itself for an asymmetric (uint4) spec, and the constant -qmin for a symmetric one (7 for qlab's
default restricted int4 grid [-7, 7], 8 for the full range [-8, 7]).

Two kernels share that dequantization: a GEMM built on ``tl.dot`` for M > GEMV_MAX_M, and a GEMV
(one program per row of x, a multiply-and-reduce) for the memory-bound batch-1 case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

GEMV_MAX_M = 4  # batches up to this size use the GEMV kernel


@dataclass
class Int4Weight:
    """A [N, K] weight as the W4A16 kernel reads it (raw tensors in qlab's packed layout).

    ``zero`` is None for a symmetric format, whose zero is the constant ``code_offset``.
    """

    packed: torch.Tensor  # uint8 [ceil(N*K/2)]
    scale: torch.Tensor  # float [N, ceil(K/g)]
    zero: torch.Tensor | None  # float [N, ceil(K/g)] (in code units) or None
    shape: tuple  # (N, K)
    group_size: int
    code_offset: float = 8.0  # zero of a symmetric grid: -qmin (8 for int4 [-8, 7], 7 for [-7, 7])

    @classmethod
    def from_quantized(cls, qt) -> "Int4Weight":
        """Adapt a 4-bit integer per-group ``qlab.core.tensor.QuantizedTensor`` (e.g. 'int4-g128-asym-minmax').
        Other 4-bit grids (NF4, FP4 E2M1) or float minima are refused by name: this kernel computes
        scale * (code - zero) on an integer grid."""
        spec = qt.spec
        if not spec.format.startswith("int") or spec.bits != 4:
            raise ValueError(f"W4A16 implements the int4 grid (scale * (code - zero)); {spec.format!r} is another grid "
                             f"(use the NF4 kernel for 'nf4-b<size>-dq', or dequantize)")
        if spec.float_min or spec.double_quant:
            raise ValueError(f"W4A16 takes integer zero points and plain scales, not {spec}")
        shape = tuple(qt.shape)
        if len(shape) != 2 or str(spec.granularity)[:1] != "g" or not spec.granularity.per_row(shape):
            raise ValueError(f"W4A16 needs a 2-D weight with scales per group along its rows (gN), got {qt!r}")
        qmin = spec.grid.decode(torch.tensor([0])).item()  # value of code 0: -8 (int4), -7 (restricted), 0 (uint4)
        zero = None if qt.zero_point is None else qt.zero_point.float() - qmin
        return cls(qt.packed, qt.scales(), zero, shape, spec.granularity.columns_per_scale(shape), -qmin)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.shape[0] * self.shape[1]).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight W[n, k] = scale * (code - zero), groups broadcast along k."""
        n, k = self.shape
        zero = self.code_offset if self.zero is None else self.zero.repeat_interleave(self.group_size, 1)[:, :k]
        return self.scale.float().repeat_interleave(self.group_size, 1)[:, :k] * (self.codes().float() - zero)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` nibbles of a byte stream, low nibble first: [0x21, 0x0F] -> [1, 2, 15, 0]."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_int4` (pads an odd count with a zero nibble)."""
    c = codes.reshape(-1).to(torch.int64)
    c = torch.nn.functional.pad(c, (0, c.numel() % 2)).reshape(-1, 2)
    return (c[:, 0] | (c[:, 1] << 4)).to(torch.uint8)


def w4a16_matmul_reference(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """Torch reference: dequantize the whole weight, then one fp32 matmul."""
    return (x.float() @ weight.dequantize().T).to(x.dtype)


@dispatch.kernel(default=dict(BLOCK_M=16, BLOCK_N=32),
                 autotune=[dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                           for bm, bn, w, s in [(16, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3),
                                                (64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4)]],
                 key=("M", "N", "K"))
def _gemm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr,
                 M, N, K, n_groups, stride_xm, stride_ym, code_offset,
                 GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (pid_m, pid_n) owns the output tile y[rm, rn]
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)  # [BM, BK]
        # --- dequantize the [BK, BN] weight tile W[rn, k]^T in registers ---
        e = rn[None, :].to(tl.int64) * K + k[:, None]  # code index in the nibble stream
        byte = tl.load(packed_ptr + (e >> 1), mask=(k[:, None] < K) & (rn[None, :] < N), other=0)
        code = (byte.to(tl.int32) >> ((e & 1) * 4).to(tl.int32)) & 0xF
        g = k0 // GROUP  # BLOCK_K divides GROUP: the whole tile lies in one group
        scale = tl.load(scale_ptr + rn * n_groups + g, mask=rn < N, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + rn * n_groups + g, mask=rn < N, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - zero[None, :]) * scale[None, :]
        else:
            w = (code.to(tl.float32) - code_offset) * scale[None, :]
        # --- the tensor-core product, fp32 accumulation ---
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@dispatch.kernel(default=dict(BLOCK_N=32),
                 autotune=[dict(BLOCK_N=bn, num_warps=w) for bn, w in [(32, 2), (64, 4), (128, 4), (256, 8)]],
                 key=("N", "K"))
def _gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr,
                 N, K, n_groups, stride_xm, stride_ym, code_offset,
                 GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (m, pid_n) owns y[m, rn]: a dot product of row m of x with BLOCK_N rows of W
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)  # [BK]
        e = rn[None, :].to(tl.int64) * K + k[:, None]
        byte = tl.load(packed_ptr + (e >> 1), mask=(k[:, None] < K) & (rn[None, :] < N), other=0)
        code = (byte.to(tl.int32) >> ((e & 1) * 4).to(tl.int32)) & 0xF
        g = k0 // GROUP
        scale = tl.load(scale_ptr + rn * n_groups + g, mask=rn < N, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + rn * n_groups + g, mask=rn < N, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - zero[None, :]) * scale[None, :]
        else:
            w = (code.to(tl.float32) - code_offset) * scale[None, :]
        acc += tl.sum(w * x[:, None], axis=0)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=rn < N)


def _block_k(group_size: int) -> int:
    for b in (64, 32, 16):
        if group_size % b == 0:
            return b
    raise ValueError(f"the W4A16 kernel needs a group size that is a multiple of 16, got {group_size}")


def w4a16_matmul(x: torch.Tensor, weight, backend: str | None = None) -> torch.Tensor:
    """y = x @ W.T for a 4-bit weight (:class:`Int4Weight` or a 4-bit per-group QuantizedTensor).

    ``x`` has shape [..., K]; the result [..., N] has x's dtype. ``backend``: see ``qlab.kernels.dispatch``.
    """
    if not isinstance(weight, Int4Weight):
        weight = Int4Weight.from_quantized(weight)
    n, k = weight.shape
    x2 = dispatch.as_rows(x, k)
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return w4a16_matmul_reference(x, weight)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_k = _block_k(weight.group_size)
    scale = weight.scale.contiguous()
    zero = weight.zero.contiguous() if weight.zero is not None else scale  # unused when HAS_ZERO=False
    common = dict(GROUP=weight.group_size, HAS_ZERO=weight.zero is not None, BLOCK_K=block_k)
    if m <= GEMV_MAX_M:
        grid = lambda meta: (m, dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _gemv_kernel.launch(backend, grid, x2, weight.packed, scale, zero, y, n, k, scale.shape[1],
                            x2.stride(0), y.stride(0), weight.code_offset, **common)
    else:
        grid = lambda meta: (dispatch.cdiv(m, meta["BLOCK_M"]), dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        dot_fp32 = backend == "interpret" or x.dtype == torch.float32  # bf16 tl.dot is wrong when interpreted
        _gemm_kernel.launch(backend, grid, x2, weight.packed, scale, zero, y, m, n, k, scale.shape[1],
                            x2.stride(0), y.stride(0), weight.code_offset, DOT_FP32=dot_fp32, **common)
    return y.reshape(*x.shape[:-1], n)
