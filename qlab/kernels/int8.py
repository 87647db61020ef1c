"""W8A8 (the SmoothQuant inference path): int8 per-token activations times int8 weights.

Per-token quantization gives each row m of x its own scale (Xiao et al. 2023, SmoothQuant, sec. 2):

    s[m] = max_k |x[m, k]| / 127,    q[m, k] = clamp(round(x[m, k] / s[m]), -127, 127)

(round half to even, as ``torch.round``; an all-zero row gets s = 1). The same function applied to a
weight [N, K] gives per-output-channel weight scales. The matmul then runs entirely in integers and
applies both scales once, in the epilogue:

    acc[m, n] = sum_k qx[m, k] * qw[n, k]          (int8 x int8 -> int32, exact)
    y[m, n]   = acc[m, n] * sx[m] * sw[n]

Example: x = [[0.5, -1.0, 0.25]] -> s = 1/127, q = [[64, -127, 32]] (63.5 rounds to even 64).
"""
from __future__ import annotations

import torch

from qlab.core.quant import validate
from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

QMAX = 127


def quantize_per_token_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: (q int8 [M, K], scale fp32 [M]) for x [M, K]."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(x / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matmul_reference(qx, qw, sx=None, sw=None, out_dtype=torch.float32) -> torch.Tensor:
    """Torch reference: int32 accumulator, or ``acc * sx[:, None] * sw[None, :]`` when scales are given."""
    acc = qx.to(torch.int64) @ qw.to(torch.int64).T  # exact; int32 range holds for K < 2**17
    acc = acc.to(torch.int32)
    if sx is None:
        return acc
    return (acc.float() * sx.float()[:, None] * sw.float()[None, :]).to(out_dtype)


@dispatch.kernel(default=dict(BLOCK_K=64),
                 autotune=[dict(BLOCK_K=b, num_warps=w) for b, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]],
                 key=("K",))
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    # one program per token (row): pass 1 finds the absmax, pass 2 rounds
    m = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)
    tl.store(scale_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        v = tl.div_rn(x, scale)  # correctly rounded, as torch's division
        r = tl.floor(v + 0.5)  # round half up, then fix the ties that should go to the even neighbour
        r = tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
        q = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + m * stride_qm + k0 + rk, q.to(tl.int8), mask=k0 + rk < K)


@dispatch.kernel(default=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                 autotune=[dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                           for bm, bn, bk, w, s in [(32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                                                    (128, 128, 64, 8, 3), (128, 64, 128, 4, 3)]],
                 key=("M", "N", "K"))
def _matmul_kernel(qx_ptr, qw_ptr, sx_ptr, sw_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(qx_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(qw_ptr + rn[None, :] * stride_wn + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)  # [BM, BK] x [BK, BN], int8 in, int32 out
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if EPILOGUE:  # the two scales, applied once per output instead of once per product
        sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=mask)


def quantize_per_token_int8(x: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., K], scale fp32 [...]) with one scale per row (token) of x."""
    backend = dispatch.resolve(backend)
    validate(x, "x")  # NaN/Inf would become different codes in torch and in the kernel
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if backend == "torch":
        q, scale = quantize_per_token_int8_reference(x2)
    else:
        q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _quantize_kernel.launch(backend, (x2.shape[0],), x2, q, scale, x2.shape[1], x2.stride(0), q.stride(0))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def int8_matmul(qx, qw, sx=None, sw=None, out_dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """qx [M, K] int8 times qw [N, K] int8 transposed: int32 [M, N], or scaled ``out_dtype`` if sx, sw are given."""
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise ValueError(f"int8_matmul needs int8 operands, got {qx.dtype} and {qw.dtype}")
    if qx.shape[-1] != qw.shape[-1]:
        raise ValueError(f"inner sizes differ: {qx.shape[-1]} vs {qw.shape[-1]}")
    if (sx is None) != (sw is None):
        raise ValueError("give both scales (sx, sw) or neither")
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return int8_matmul_reference(qx, qw, sx, sw, out_dtype)
    qx, qw = qx.contiguous(), qw.contiguous()
    (m, k), n = qx.shape, qw.shape[0]
    epilogue = sx is not None
    y = torch.empty(m, n, dtype=out_dtype if epilogue else torch.int32, device=qx.device)
    sx = sx.float().contiguous() if epilogue else y
    sw = sw.float().contiguous() if epilogue else y
    grid = lambda meta: (dispatch.cdiv(m, meta["BLOCK_M"]), dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _matmul_kernel.launch(backend, grid, qx, qw, sx, sw, y, m, n, k, qx.stride(0), qw.stride(0), y.stride(0),
                          EPILOGUE=epilogue)
    return y


def w8a8_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The W8A8 linear layer: quantize x per token on the fly, int8 matmul, scales in the epilogue."""
    qx, sx = quantize_per_token_int8(x, backend)
    k = x.shape[-1]
    y = int8_matmul(qx.reshape(-1, k), qw, sx.reshape(-1), sw, out_dtype=x.dtype, backend=backend)
    return y.reshape(*x.shape[:-1], qw.shape[0])
