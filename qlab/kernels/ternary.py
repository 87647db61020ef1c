"""Ternary (BitNet b1.58) matmul: weights in {-1, 0, +1}, 2 bits each, one scale per tensor.

BitNet b1.58 (Ma et al. 2024, eq. 1-3) quantizes a weight with its mean absolute value:

    gamma = mean |W|,   T = clamp(round(W / gamma), -1, 1),   W ~ gamma * T

so a matmul needs no multiplications by weights at all, only additions and subtractions of x,
and one multiply by gamma at the end:

    y[m, n] = gamma * sum_k x[m, k] * T[n, k]

T is stored with qlab's 'ternary' codes (code = T + 1, i.e. -1 -> 0, 0 -> 1, +1 -> 2), four codes per
byte, the first in the lowest two bits: T = [1, 0, -1, 1] -> codes [2, 1, 0, 2] -> byte 0b10_00_01_10 = 134.
(1.58 = log2(3) bits would be the entropy limit; 2 bits keep decoding to a shift and a mask.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)


@dataclass
class TernaryWeight:
    packed: torch.Tensor  # uint8 [ceil(N*K/4)]
    scale: float  # gamma
    shape: tuple  # (N, K)

    @classmethod
    def from_quantized(cls, qt) -> "TernaryWeight":
        """Adapt a ``qlab.core.quant.QuantizedTensor`` of spec 'ternary' (absmean, per tensor)."""
        from qlab.core.granularity import PerTensor

        if qt.spec.format != "ternary" or not isinstance(qt.spec.granularity, PerTensor) or len(qt.shape) != 2:
            raise ValueError(f"the ternary kernel needs a 2-D per-tensor 'ternary' tensor, got {qt!r}")
        return cls(qt.packed, qt.scales().item(), tuple(qt.shape))

    def values(self) -> torch.Tensor:
        """T in {-1, 0, 1} as float32 [N, K]."""
        n = self.shape[0] * self.shape[1]
        p = self.packed.reshape(-1).to(torch.int64)
        codes = ((p[:, None] >> (2 * torch.arange(4, device=p.device))) & 3).reshape(-1)[:n]
        return (codes - 1).float().reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return self.scale * self.values()


def ternary_quantize(w: torch.Tensor) -> TernaryWeight:
    """BitNet b1.58 absmean quantization of a [N, K] weight, by qlab's core quantizer (spec 'ternary')."""
    from qlab.core.quant import quantize

    return TernaryWeight.from_quantized(quantize(w, "ternary"))


def ternary_matmul_reference(x: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
    """Torch reference: gamma * (x @ T.T) in fp32, cast to x's dtype."""
    return (weight.scale * (x.float() @ weight.values().T)).to(x.dtype)


@dispatch.kernel(default=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                 autotune=[dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                           for bm, bn, bk, w, s in [(16, 64, 64, 4, 3), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                                    (64, 128, 64, 8, 3), (128, 128, 64, 8, 3)]],
                 key=("M", "N", "K"))
def _matmul_kernel(x_ptr, packed_ptr, y_ptr, M, N, K, stride_xm, stride_ym, scale,
                   DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        e = rn[None, :].to(tl.int64) * K + k[:, None]  # [BK, BN] index of T[n, k] in the 2-bit stream
        byte = tl.load(packed_ptr + (e >> 2), mask=(k[:, None] < K) & (rn[None, :] < N), other=0x55)  # 0x55: four zeros
        t = ((byte.to(tl.int32) >> ((e & 3) * 2).to(tl.int32)) & 3) - 1  # in {-1, 0, 1}
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, t.to(x.dtype))  # exact: -1, 0, 1 are representable in any float type
    y = acc * scale  # gamma, once, in the epilogue
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def ternary_matmul(x: torch.Tensor, weight: TernaryWeight, backend: str | None = None) -> torch.Tensor:
    """y = gamma * x @ T.T for x [..., K]; the result has x's dtype."""
    n, k = weight.shape
    x2 = dispatch.as_rows(x, k)
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return ternary_matmul_reference(x, weight)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (dispatch.cdiv(m, meta["BLOCK_M"]), dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    dot_fp32 = backend == "interpret" or x.dtype == torch.float32
    _matmul_kernel.launch(backend, grid, x2, weight.packed, y, m, n, k, x2.stride(0), y.stride(0), weight.scale,
                          DOT_FP32=dot_fp32)
    return y.reshape(*x.shape[:-1], n)
