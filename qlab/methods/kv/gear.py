"""GEAR (Kang et al. 2024, alg. 1): a quantized KV block plus its outliers and a low-rank error correction.

A block of keys or values X [n, D] (one head) is stored as three parts and read back as their sum:

    S     = Filter_s(X)               the s% largest-magnitude entries of X, kept as (position, fp16 value)
    Q     = Quant_b(X - S)            uniform b-bit codes in KIVI's grouping (keys per channel, values per token)
    R     = X - S - Q                 what is left: the quantization error
    L     = A @ B ~ R                 rank r, by power iteration: A [n, r], B [r, D], both fp16
    X_hat = Q + S + L

Q's scales and minima may be stored fp16 (``scale_dtype='fp16'``, as a half-precision model's cache would): they are
rounded first and R is the error left after the *rounded* ones, so L corrects what is really read back.
Storage per value of a block of n tokens x D channels: b bits of codes, 2 x 8 x stat bytes / G of Q's
statistics, 32 s bits of S (fp16 value + int16 position), 16 r (n + D) / (n D) bits of L; longer blocks make
L cheaper (n = 32, D = 64, r = 2: 1.5 bits; n = 256: 0.63 bits).

so the few outliers no longer stretch the quantization groups (S), and the error's dominant directions,
which the KV rows share, come back (L). The paper's defaults: s = 2%, b = 2 or 4, r = 2-4, a few
power iterations (its scripts run 3 with rank 4 at prefill and 2 while decoding).

Worked example of S (s = 25% of a 2x2 block keeps k = 1 entry): X = [[1, -5], [2, 3]] -> S holds
position 1 (row-major) with value -5, and Q quantizes [[1, 0], [2, 3]].

Two choices differ from the reference code (github.com/opengear-project/GEAR, ``compress_function.py``),
which follows the same equation in spirit: it picks s/2% largest and s/2% smallest entries of each token
(or channel) and fills their places with the row mean before quantizing; here S is the top s% by magnitude
of each head's [n, D] block and its places hold 0 in X - S, exactly the paper's X - S.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qlab.kernels.kivi import KVQuantized
from qlab.methods.kv.kivi import dequantize_kv, quantize_kv

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def outliers(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S: the k = floor(ratio * n * D) largest-magnitude entries of each [n, D] matrix of x [..., n, D].

    Returns (values fp16 [..., k], positions [..., k]) with positions row-major in [0, n * D), as int16 when
    n * D fits (< 32768), else int32. Example: x = [[1, -5], [2, 3]], ratio 0.25 -> values [-5], positions [1].
    """
    *lead, n, d = x.shape
    k = int(ratio * n * d)
    flat = x.reshape(*lead, n * d)
    position = flat.abs().topk(k, dim=-1).indices if k else flat.new_zeros((*lead, 0), dtype=torch.long)
    values = flat.gather(-1, position)
    if values.numel() and values.abs().max() > FP16_MAX:
        raise ValueError(f"an outlier of magnitude {float(values.abs().max()):.3g} does not fit fp16 (max {FP16_MAX}); "
                         f"GEAR stores its outliers in fp16")
    index_dtype = torch.int16 if n * d <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return values.to(torch.float16), position.to(index_dtype)


def power_iteration(R: torch.Tensor, rank: int, iters: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``rank`` approximation A @ B of each matrix R [..., n, D] by subspace (power) iteration.

    From a seeded random P [D, r]: repeat ``iters`` times  A = orth(R P),  P = R^T A;  then B = P^T.
    A has orthonormal columns and A @ B = A A^T R projects R onto span(A), which tends to R's top-r left
    singular vectors (Halko et al. 2011, alg. 4.3). For a rank-r matrix one iteration is already exact.
    Returns A [..., n, r] and B [..., r, D] (fp32); r is capped at min(n, D).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    *lead, n, d = R.shape
    r = min(rank, n, d)
    R = R.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = torch.randn(d, r, generator=g).to(R.device).expand(*lead, d, r)  # random start, shared by all heads
    for _ in range(iters):
        A = torch.linalg.qr(R @ P).Q  # [..., n, r], orthonormal columns
        P = R.transpose(-1, -2) @ A  # [..., D, r]
    return A, P.transpose(-1, -2)


@dataclass
class GEARBlock:
    """One stored GEAR block of keys or values [..., n, D]: codes Q, outliers S and low-rank factors L = A @ B."""

    q: KVQuantized
    s_values: torch.Tensor | None  # fp16 [..., k]
    s_index: torch.Tensor | None  # int16/int32 [..., k], row-major positions in the [n, D] matrix
    a: torch.Tensor | None  # fp16 [..., n, r]
    b: torch.Tensor | None  # fp16 [..., r, D]

    def dequantize(self, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
        """X_hat = Q + L + S as a dense [..., n, D] tensor (summed in fp32)."""
        x = dequantize_kv(_fp32_stats(self.q), torch.float32, backend=backend)
        if self.a is not None:
            x = x + self.a.float() @ self.b.float()
        if self.s_values is not None:
            shape = x.shape
            x = x.reshape(*shape[:-2], -1).scatter_add(-1, self.s_index.long(), self.s_values.float()).reshape(shape)
        return x.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the block holds (codes, scales, minima, outlier values and positions, A, B)."""
        parts = [self.q.packed, self.q.scale, self.q.minimum, self.s_values, self.s_index, self.a, self.b]
        return [t for t in parts if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fp32_stats(q: KVQuantized) -> KVQuantized:
    """``q`` with its (possibly fp16) scales and minima widened to the fp32 the kernel reads (exact)."""
    if q.scale.dtype == torch.float32:
        return q
    return replace(q, scale=q.scale.float(), minimum=q.minimum.float())


STAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def gear_compress(x: torch.Tensor, which: str, bits: int = 2, group_size: int = 32, outlier_ratio: float = 0.02,
                  rank: int = 2, power_iters: int = 3, seed: int = 0, backend: str | None = None,
                  scale_dtype: str = "fp32") -> GEARBlock:
    """Compress keys (``which='key'``) or values [..., n, D] as GEAR (alg. 1); ratio 0 / rank 0 drop S / L.

    With ``outlier_ratio=0``, ``rank=0`` and fp32 stats this is KIVI's quantizer (``quantize_kv``) alone;
    ``scale_dtype='fp16'`` stores Q's scales and minima in half precision.
    """
    if scale_dtype not in STAT_DTYPES:
        raise ValueError(f"scale_dtype must be one of {list(STAT_DTYPES)}, got {scale_dtype!r}")
    x = x.float()
    s_values = s_index = a = b = None
    dense_s = torch.zeros_like(x)
    if outlier_ratio > 0:
        s_values, s_index = outliers(x, outlier_ratio)
        shape = x.shape
        dense_s = dense_s.reshape(*shape[:-2], -1).scatter(-1, s_index.long(), s_values.float()).reshape(shape)
    q = quantize_kv(x - dense_s, which, bits, group_size, backend=backend)  # Q(X - S)
    if scale_dtype == "fp16":  # codes stay; the statistics are rounded, and what L corrects includes that rounding
        if max(float(q.scale.abs().max()), float(q.minimum.abs().max())) > FP16_MAX:
            raise ValueError(f"GEAR's scales or minima exceed fp16's range ({FP16_MAX}); use scale_dtype='fp32'")
        q = replace(q, scale=q.scale.half(), minimum=q.minimum.half())
    if rank > 0:
        R = x - dense_s - dequantize_kv(_fp32_stats(q), torch.float32, backend=backend)  # the error after Q and S
        A, B = power_iteration(R, rank, power_iters, seed)
        a, b = A.to(torch.float16).contiguous(), B.to(torch.float16).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("GEAR's low-rank factors overflow fp16: the quantization error is too large to store")
    return GEARBlock(q, s_values, s_index, a, b)
