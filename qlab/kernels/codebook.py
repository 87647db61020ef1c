"""Codebook (additive vector-quantized) matmul: decode AQLM-style weights inside the matmul tile.

The weight W [N, K] is stored as codes [M, N, K/d] into M codebooks [M, 2^B, d] and a scale per output row:

    W[n, g*d:(g+1)*d] = scale[n] * sum_m codebooks[m, codes[m, n, g]]           (AQLM, Egiazarian et al. 2024)

so y = x @ W^T never needs W in memory: each program decodes a [BLOCK_K, BLOCK_N] tile of W^T from the codes
(one gather per codebook per weight: codebook row ``codes[m, n, k // d]``, column ``k % d``), multiplies it into
its [BLOCK_M, BLOCK_N] accumulator, and applies the row scales once in the epilogue (they factor out of the sum
over k). ``codebook_matmul_reference`` is the same computation in torch: decode W, then one matmul.

Tiny example (M=1, d=2, codebook [[1, 0], [0, 1]], codes [[[1, 0]]], scale [2]): W = [[0, 2, 2, 0]], so
x = [1, 2, 3, 4] gives y = [2*2 + 3*2] = [10].

This module takes plain tensors (codes, codebooks, scale), so it sits below ``qlab.methods``; an AQLM result
(``qlab.core.tensor.CodebookTensor``) goes straight in through :func:`codebook_matmul_tensor`.
"""
from __future__ import annotations

import torch

from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)


def check_codebook_weight(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None):
    """Clear errors for tensors the kernel cannot take: shapes, integer codes in range, one scale per row."""
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be [M, 2^B, d], got shape {tuple(codebooks.shape)}")
    M, n_codes, d = codebooks.shape
    if codes.dim() != 3 or codes.shape[0] != M:
        raise ValueError(f"codes must be [M={M}, N, K/d], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= n_codes):
        raise ValueError(f"codes must be integers in [0, {n_codes}) (the codebooks have {n_codes} vectors)")
    if scale is not None and tuple(scale.shape) != (codes.shape[1],):
        raise ValueError(f"scale must have one entry per output row ({codes.shape[1]}), got {tuple(scale.shape)}")


def codebook_dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """W [N, K] in float32 from codes [M, N, G], codebooks [M, 2^B, d] and scale [N] (or None)."""
    check_codebook_weight(codes, codebooks, scale)
    M, N, G = codes.shape
    books = codebooks.float()
    W = sum(books[m][codes[m].long()] for m in range(M)).reshape(N, -1)  # [N, G, d] -> [N, K]
    return W if scale is None else W * scale.float()[:, None]


def codebook_matmul_reference(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                              scale: torch.Tensor | None) -> torch.Tensor:
    """Torch reference: decode W in float32, y = x @ W^T in float32, cast to x's dtype."""
    return (x.float() @ codebook_dequantize(codes, codebooks, scale).T).to(x.dtype)


@dispatch.kernel(default=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                 autotune=[dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
                           for bm, bn, bk, w, s in [(16, 64, 64, 4, 3), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                                    (64, 128, 64, 8, 3)]],
                 key=("M", "N", "K"))
def _codebook_kernel(x_ptr, codes_ptr, books_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     NUM_BOOKS: tl.constexpr, BOOK_SIZE: tl.constexpr, GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
                     DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    G = K // GROUP  # groups per row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask_kn = (k[:, None] < K) & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # W^T tile: w[k, n] = sum_m C_m[codes[m, n, k // d]][k % d]
        for m in tl.static_range(NUM_BOOKS):
            at = (m * N + rn[None, :]).to(tl.int64) * G + k[:, None] // GROUP  # codes[m, n, k // d]
            code = tl.load(codes_ptr + at, mask=mask_kn, other=0)
            row = m * BOOK_SIZE + code.to(tl.int64)  # the vector's row in the stacked codebooks [M * 2^B, d]
            w += tl.load(books_ptr + row * GROUP + k[:, None] % GROUP, mask=mask_kn, other=0.0).to(tl.float32)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_SCALE:  # scale[n] factors out of the sum over k: once per output, in the epilogue
        acc = acc * tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def codebook_matmul(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """y = x @ W^T for x [..., K] and the codebook weight (codes [M, N, K/d], codebooks [M, 2^B, d], scale [N]);
    the result has x's dtype. ``backend``: 'torch', 'triton', 'interpret' or None (see qlab.kernels.dispatch)."""
    check_codebook_weight(codes, codebooks, scale)
    M_books, n, groups = codes.shape
    k = groups * codebooks.shape[2]  # the weight's K: G groups of d inputs
    x2 = dispatch.as_rows(x, k)
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return codebook_matmul_reference(x, codes, codebooks, scale)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (dispatch.cdiv(m, meta["BLOCK_M"]), dispatch.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    dot_fp32 = backend == "interpret" or x.dtype == torch.float32
    scale_arg = scale.contiguous() if scale is not None else codebooks  # an unused pointer when HAS_SCALE is off
    _codebook_kernel.launch(backend, grid, x2, codes.to(torch.int32).contiguous(), codebooks.contiguous(), scale_arg,
                            y, m, n, k, x2.stride(0), y.stride(0), NUM_BOOKS=M_books,
                            BOOK_SIZE=codebooks.shape[1], GROUP=codebooks.shape[2], HAS_SCALE=scale is not None,
                            DOT_FP32=dot_fp32)
    return y.reshape(*x.shape[:-1], n)


def codebook_matmul_tensor(x: torch.Tensor, t, backend: str | None = None) -> torch.Tensor:
    """``codebook_matmul`` on a ``qlab.core.tensor.CodebookTensor`` (an AQLM result)."""
    return codebook_matmul(x, t.codes, t.codebooks, t.scale, backend=backend)
