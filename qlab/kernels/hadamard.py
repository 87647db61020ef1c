"""Fast Walsh-Hadamard transform over the last dimension (n a power of two).

The Sylvester Hadamard matrix doubles by H_1 = [1], H_{2n} = [[H_n, H_n], [H_n, -H_n]], so
H_n[i, j] = (-1) ** popcount(i & j), and H_n H_n^T = n I. The transform y = x H_n^T / sqrt(n)
(orthonormal) costs n log2(n) additions in log2(n) butterfly stages instead of n**2 multiplies:

    stage with stride h:  for every pair (i, i + h) with bit h of i clear,
                          (a, b) <- (a + b, a - b)

An optional random-sign diagonal D (entries +-1) is applied first, y = (x * signs) H^T / sqrt(n):
the randomized Hadamard transform of QuIP# / QuaRot incoherence processing. Example (n = 2):
x = [3, 1] -> [3 + 1, 3 - 1] / sqrt(2) = [2.83, 1.41].
"""
from __future__ import annotations

import math

import torch

from qlab.kernels import dispatch

tl = None  # triton.language, bound on first launch (see qlab.kernels.dispatch.Kernel)

MAX_N = 2**15  # one row is transformed in registers by one program


def hadamard_matrix(n: int) -> torch.Tensor:
    """The explicit n x n Sylvester Hadamard matrix (entries +-1), by repeated Kronecker doubling."""
    _check_power_of_two(n)
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """A reproducible vector of n random +-1 entries (the diagonal D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def hadamard_transform_reference(x: torch.Tensor, signs: torch.Tensor | None = None,
                                 normalize: bool = True) -> torch.Tensor:
    """Torch reference: the log2(n) butterfly stages written with reshapes, in fp32."""
    n = x.shape[-1]
    _check_power_of_two(n)
    y = x.float() * (signs.float() if signs is not None else 1.0)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)  # pairs (i, i + h) sit at [.., 0, :] and [.., 1, :]
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    y = y.reshape(x.shape)
    return (y / math.sqrt(n) if normalize else y).to(x.dtype)


@dispatch.kernel(default=dict(num_warps=4))
def _fwht_kernel(x_ptr, signs_ptr, y_ptr, stride_x, stride_y, norm,
                 N: tl.constexpr, LOG_N: tl.constexpr, HAS_SIGNS: tl.constexpr):
    # one program per row; the whole row stays in registers through all log2(N) stages
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + row * stride_x + offs).to(tl.float32)
    if HAS_SIGNS:
        x = x * tl.load(signs_ptr + offs).to(tl.float32)
    for s in tl.static_range(LOG_N):  # stage s pairs i with i + h, h = 2**s (a constexpr: s is unrolled)
        x3 = tl.reshape(x, (N >> (s + 1), 2, 1 << s))  # element i -> [i // 2h, (i // h) % 2, i % h]
        half = tl.arange(0, 2)[None, :, None]
        a = tl.sum(tl.where(half == 0, x3, 0.0), axis=1)  # [N/2H, H]: the "top" of each pair
        b = tl.sum(tl.where(half == 1, x3, 0.0), axis=1)  # the "bottom"
        x3 = tl.where(half == 0, (a + b)[:, None, :], (a - b)[:, None, :])
        x = tl.reshape(x3, (N,))
    tl.store(y_ptr + row * stride_y + offs, (x * norm).to(y_ptr.dtype.element_ty))


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, normalize: bool = True,
                       backend: str | None = None) -> torch.Tensor:
    """y = (x * signs) @ H_n^T, divided by sqrt(n) when ``normalize``; n = x.shape[-1] a power of two."""
    n = x.shape[-1]
    _check_power_of_two(n)
    if signs is not None and signs.shape != (n,):
        raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
    backend = dispatch.resolve(backend)
    if backend == "torch":
        return hadamard_transform_reference(x, signs, normalize)
    if n > MAX_N:
        raise ValueError(f"the Triton FWHT keeps a row in registers; n = {n} exceeds {MAX_N}")
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    s = signs.float().contiguous() if signs is not None else x2
    norm = 1 / math.sqrt(n) if normalize else 1.0
    _fwht_kernel.launch(backend, (x2.shape[0],), x2, s, y, x2.stride(0), y.stride(0), norm,
                        N=n, LOG_N=n.bit_length() - 1, HAS_SIGNS=signs is not None,
                        num_warps=min(16, max(1, n // 256)))  # ~8 values of the row per thread
    return y.reshape(x.shape)


def _check_power_of_two(n: int):
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two size, got {n}")
