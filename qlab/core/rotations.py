"""Hadamard matrices of many sizes and the two-sided randomized Hadamard transform of QuIP / QuIP#.

A Hadamard matrix H_n has entries +-1 and orthogonal rows: H_n H_n^T = n I, so V = H_n / sqrt(n) is a
rotation that spreads every coordinate evenly over all the others. Sizes built here:

* n = 2^k       Sylvester: H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]], so H[i, j] = (-1)^popcount(i & j);
* n = q + 1     Paley I, q a prime = 3 (mod 4): 12 (q = 11), 20 (q = 19), 44, 48, 60, ...;
* n = 2(q + 1)  Paley II, q a prime = 1 (mod 4): 28 (q = 13), 36 (q = 17), 60, 108, ...;
* n = K * 2^k   the Kronecker product H_K (x) H_{2^k} of a Paley matrix and a Sylvester one:
                576 = 36 * 16, 1536 = 12 * 128, 192 = 12 * 16 (the embedded model's widths).

Both Paley constructions start from the Jacobsthal matrix Q[i, j] = chi(j - i) of a prime q, where chi is
the quadratic character mod q (0 at 0, +1 on squares, -1 otherwise); Q Q^T = q I - J and Q J = 0
(Paley 1933, "On orthogonal matrices"; MacWilliams & Sloane, ch. 2 sec. 3).

Incoherence processing (QuIP, Chee et al. 2023, sec. 4; QuIP#, Tseng et al. 2024, alg. 1): with random
+-1 diagonals S_U (n) and S_V (m) and V = normalized Hadamard,

    W <- V_m S_V W S_U V_n^T        H <- V_n S_U H S_U V_n^T

and a layer y = x W^T is unchanged if x is rotated the same way and y rotated back:
y = ((x S_U V_n^T) W'^T) V_m S_V. Example (n = m = 2, no signs): W = [[1, 0], [0, 0]] -> W' = [[.5, .5],
[.5, .5]]: the single large entry is spread over all four, and its incoherence mu drops from 2 to 1.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

PALEY_LIMIT = 1000  # largest Paley base size K searched when factoring n = K * 2^k


# ---------------------------------------------------------------- Hadamard matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for a prime q, chi the quadratic character (Legendre symbol) mod q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley_kind(K: int) -> str | None:
    """'sylvester', 'paley1', 'paley2' or None: which construction gives H_K (K itself, no Kronecker)."""
    if K >= 1 and K & (K - 1) == 0:
        return "sylvester"
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return "paley1"
    if K % 2 == 0 and _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _paley1(q: int) -> torch.Tensor:
    # Paley I: S = [[0, 1^T], [-1, Q]] is skew (Q^T = -Q for q = 3 mod 4) and S S^T = q I, so H = I + S
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    # Paley II: C = [[0, 1^T], [1, Q]] is symmetric (q = 1 mod 4) with C^2 = q I; replace each 0 by
    # [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]]
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    on_one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, on_one) + torch.kron((C == 0).double(), on_zero)


def _sylvester(n: int) -> torch.Tensor:
    i = torch.arange(n)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):  # popcount(i & j) mod 2, one bit at a time
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.double()


def hadamard_factors(n: int) -> tuple[int, int]:
    """Split n = K * p with p = 2^k and H_K given by Sylvester (K = 1) or Paley I/II.

    >>> hadamard_factors(576), hadamard_factors(1536), hadamard_factors(64)
    ((36, 16), (12, 128), (1, 64))
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive integer, got {n!r}")
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        K = n // p
        if K == 1 or (K <= PALEY_LIMIT and paley_kind(K) in ("paley1", "paley2")):
            return K, p
        p //= 2
    raise ValueError(
        f"no Hadamard construction for n = {n}: supported sizes are 2^k, and K * 2^k where K - 1 is a prime "
        f"= 3 (mod 4) (Paley I: K = 12, 20, 44, 48, 60, ...) or K / 2 - 1 is a prime = 1 (mod 4) (Paley II: "
        f"K = 28, 36, 60, 76, ...), K <= {PALEY_LIMIT}; e.g. 576 = 36 * 16, 1536 = 12 * 128. Pad the dimension "
        f"to such a size, or use a random orthogonal matrix instead")


def hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix H_K (x) H_p (entries +-1, float64), with (K, p) = hadamard_factors(n).

    >>> hadamard(2)
    tensor([[ 1.,  1.],
            [ 1., -1.]], dtype=torch.float64)
    """
    K, p = hadamard_factors(n)
    return torch.kron(_base(K), _sylvester(p))


@functools.lru_cache(maxsize=None)  # a handful of small K; callers never modify the result
def _base(K: int) -> torch.Tensor:
    kind = paley_kind(K)
    if kind == "sylvester":
        return _sylvester(K)
    return _paley1(K - 1) if kind == "paley1" else _paley2(K // 2 - 1)


# ---------------------------------------------------------------- the fast transform


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p over the last dim (p = 2^k; H_p symmetric), unnormalized, in log2(p) butterfly stages."""
    p = x.shape[-1]
    y, h = x, 1
    while h < p:
        y = y.reshape(*x.shape[:-1], p // (2 * h), 2, h)  # pairs (i, i + h) at [..., 0, :] and [..., 1, :]
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(x.shape)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """y = x @ V^T over the last dim (or x @ V when ``transpose``), V = (H_K (x) H_p) / sqrt(n).

    Kronecker-factored: with x viewed as a K x p matrix X (row-major), x (A (x) B)^T = A X B^T, so the cost
    is n (K + log2 p) instead of n^2. Example: x = [3, 1] -> [4, 2] / sqrt(2).
    """
    n = x.shape[-1]
    K, p = hadamard_factors(n)
    A = _base(K).to(x.dtype)
    X = x.reshape(*x.shape[:-1], K, p)
    X = _fwht(X)  # X H_p (H_p is symmetric, so this is X B^T and X B alike)
    A = A.T if transpose else A  # (A (x) B)^T -> A^T (x) B^T
    Y = torch.einsum("ka,...ap->...kp", A, X)
    return Y.reshape(x.shape) / math.sqrt(n)


# ---------------------------------------------------------------- incoherence processing


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def check_signs(SU: torch.Tensor, SV: torch.Tensor, m: int, n: int) -> None:
    """Raise unless SU holds n and SV holds m signs, each +-1."""
    for name, v, size in (("SU", SU, n), ("SV", SV, m)):
        if tuple(v.shape) != (size,) or not bool((v.abs() == 1).all()):
            raise ValueError(f"{name} must be {size} signs +-1, got shape {tuple(v.shape)}")


@dataclass
class RandomizedHadamard:
    """The two-sided randomized Hadamard transform of an m x n weight (QuIP# alg. 1), seeded.

    >>> R = RandomizedHadamard(m=12, n=16, seed=0)
    >>> W = torch.randn(12, 16, dtype=torch.float64)
    >>> torch.allclose(R.weight_inverse(R.weight(W)), W)
    True
    """
    m: int
    n: int
    seed: int = 0
    SU: torch.Tensor = field(init=False, repr=False)  # n input-side signs
    SV: torch.Tensor = field(init=False, repr=False)  # m output-side signs

    def __post_init__(self):
        hadamard_factors(self.m), hadamard_factors(self.n)  # refuse unsupported sizes up front
        g = torch.Generator().manual_seed(self.seed)
        self.SU, self.SV = random_signs(self.n, g), random_signs(self.m, g)

    @classmethod
    def from_signs(cls, SU: torch.Tensor, SV: torch.Tensor, seed: int = 0) -> "RandomizedHadamard":
        """The transform with given sign vectors SU [n] and SV [m] (what a stored tensor keeps), not drawn ones."""
        check_signs(SU, SV, len(SV), len(SU))
        R = cls(len(SV), len(SU), seed)
        R.SU, R.SV = SU.double(), SV.double()  # the stored signs are the truth, not the generator
        return R

    def weight(self, W: torch.Tensor) -> torch.Tensor:
        """W' = V_m S_V W S_U V_n^T."""
        self._check(W, (self.m, self.n), "W")
        Z = hadamard_transform(W * self.SU.to(W.dtype))  # W S_U V_n^T, row by row
        return hadamard_transform((Z * self.SV.to(W.dtype)[:, None]).T).T  # V_m (S_V Z) = (Z^T S_V V_m^T)^T

    def weight_inverse(self, Wr: torch.Tensor) -> torch.Tensor:
        """W = S_V V_m^T W' V_n S_U."""
        self._check(Wr, (self.m, self.n), "W'")
        Z = hadamard_transform(Wr, transpose=True)  # W' V_n
        Z = hadamard_transform(Z.T, transpose=True).T  # V_m^T Z = (Z^T V_m)^T
        return Z * self.SV.to(Wr.dtype)[:, None] * self.SU.to(Wr.dtype)

    def hessian(self, H: torch.Tensor) -> torch.Tensor:
        """H' = V_n S_U H S_U V_n^T (the proxy Hessian X^T X of the rotated inputs x S_U V_n^T)."""
        self._check(H, (self.n, self.n), "H")
        SU = self.SU.to(H.dtype)
        Z = hadamard_transform(H * SU)
        return hadamard_transform((Z * SU[:, None]).T).T

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = x S_U V_n^T over the last dim: what the rotated layer is fed."""
        return hadamard_transform(x * self.SU.to(x.dtype))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y = y' V_m S_V over the last dim: the rotated layer's output turned back."""
        return hadamard_transform(y, transpose=True) * self.SV.to(y.dtype)

    @staticmethod
    def _check(T, shape, name):
        if tuple(T.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for this transform, got {tuple(T.shape)}")


def weight_incoherence(W: torch.Tensor) -> float:
    """mu_W = max |W_ij| sqrt(m n) / ||W||_F (QuIP def. 1): 1 for a flat matrix, sqrt(m n) for one spike.

    >>> weight_incoherence(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    2.0
    """
    W = W.double()
    return float(W.abs().max() * math.sqrt(W.numel()) / W.norm())


def hessian_incoherence(H: torch.Tensor) -> float:
    """mu_H = max |Q_ij| sqrt(n) for the eigenvectors Q of H = Q Lambda Q^T (QuIP def. 1).

    Between 1 (eigenvectors as flat as a Hadamard's) and sqrt(n) (an eigenvector on one coordinate).
    Example: H = diag(3, 1) has Q = I, so mu_H = sqrt(2).
    """
    Q = torch.linalg.eigh(H.double()).eigenvectors
    return float(Q.abs().max() * math.sqrt(H.shape[0]))
