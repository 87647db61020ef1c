"""Lattices as vector grids: nearest-point decoders, the normalized second moment G, and QuIP#'s E8P codebook.

Nearest points (Conway & Sloane 1982, "Fast quantizing and decoding algorithms for lattice quantizers and
codes", and "Sphere Packings, Lattices and Groups" ch. 20):

* Z^n   round every coordinate;
* D_n   the integer vectors with an even sum: round, and if the sum is odd re-round the one coordinate with
        the largest rounding error the other way;
* E8    D8 u (D8 + 1/2): decode in both cosets, keep the nearer;
* A_n   the integer vectors of R^{n+1} with zero sum (A2 is the hexagonal lattice).

Hand example (the paper's): x = (0.1, 0.1, 0.8, 1.3, 2.2, -0.6, -0.7, 0.9) rounds to (0, 0, 1, 1, 2, -1, -1,
1), sum 3 is odd, the worst coordinate is -0.6 (error 0.4), so D8 gives (0, 0, 1, 1, 2, 0, -1, 1) at squared
distance 0.65; the coset D8 + 1/2 gives 0.95, so that D8 point is E8's nearest.

The normalized second moment G = E||x - Q(x)||^2 / (n V^(2/n)) (x uniform, V the volume per point) is the
mean squared error per dimension of a lattice quantizer at unit density: Z^n 1/12 = 0.0833, A2 0.0802,
D4 0.0766, E8 929/12960 = 0.0717 (Conway & Sloane, table 2.3 and ch. 21).

E8P (QuIP#, Tseng et al. 2024, sec. 4.1; quip-sharp lib/codebook/latticee8_padded12.py): 2^16 points of
E8 + 1/4 with a 16-bit code = (8-bit abs pattern index) << 8 | (8 sign bits). See ``e8p_codebook``.
"""
from __future__ import annotations

import functools
import itertools

import torch

# ---------------------------------------------------------------- nearest-point decoders


def nearest_zn(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of Z^n: round each coordinate (ties to even)."""
    return torch.round(x)


def nearest_dn(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D_n = {z in Z^n : sum z even} over the last dim (Conway & Sloane's f and g).

    >>> nearest_dn(torch.tensor([0.6, 0.2, 0.1, 0.0]))   # round -> (1, 0, 0, 0) is odd; fix the worst
    tensor([0., 0., 0., 0.])
    """
    f = torch.round(x)
    err = x - f
    worst = err.abs().argmax(dim=-1, keepdim=True)  # the coordinate rounded "most wrongly"
    step = torch.where(err.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)  # re-round it the other way
    g = f.scatter_add(-1, worst, step)
    odd = (f.sum(dim=-1, keepdim=True) % 2) != 0
    return torch.where(odd, g, f)


def nearest_e8(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of E8 = D8 u (D8 + 1/2) over the last dim (size 8): the nearer of the two cosets."""
    if x.shape[-1] != 8:
        raise ValueError(f"E8 is 8-dimensional: x must have last dim 8, got {x.shape[-1]}")
    y0 = nearest_dn(x)
    y1 = nearest_dn(x - 0.5) + 0.5
    nearer0 = ((x - y0) ** 2).sum(-1, keepdim=True) <= ((x - y1) ** 2).sum(-1, keepdim=True)
    return torch.where(nearer0, y0, y1)


def nearest_an(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of A_n = {z in Z^(n+1) : sum z = 0}; x (last dim n + 1) is first projected on sum = 0.

    Conway & Sloane's algorithm: round; the sum Delta of the rounded point is the number of coordinates to
    move by one, and the cheapest to move are the Delta with the largest (if Delta > 0, move down) or
    smallest (Delta < 0, move up) rounding error f - x.
    """
    x = x - x.mean(dim=-1, keepdim=True)
    f = torch.round(x)
    delta = f.sum(dim=-1, keepdim=True).long()  # how many coordinates must move by one
    rank = torch.argsort(torch.argsort(f - x, dim=-1, descending=True), dim=-1)  # 0 = largest f - x
    n1 = x.shape[-1]
    down = (delta > 0) & (rank < delta)
    up = (delta < 0) & (rank >= n1 + delta)  # the |delta| smallest f - x
    return f - down.to(x.dtype) + up.to(x.dtype)


def generator(name: str) -> tuple:
    """(nearest-point function, generator matrix B with the lattice = integer row combinations, dimension n).

    Z: I. D_n: rows (-1, -1, 0..), (1, -1, 0..), (0, 1, -1, 0..), ... (det 2). E8: Conway & Sloane's
    (4.8.1): rows 2e_1, e_i - e_(i-1), and (1/2)^8 (det 1). A2: (1, -1, 0), (0, 1, -1) in R^3 (volume sqrt 3).
    """
    if name.startswith("Z") and name[1:].isdigit():
        n = int(name[1:])
        return nearest_zn, torch.eye(n, dtype=torch.float64), n
    if name.startswith("D") and name[1:].isdigit() and int(name[1:]) >= 2:
        n = int(name[1:])
        B = torch.zeros(n, n, dtype=torch.float64)
        B[0, :2] = -1
        for i in range(1, n):
            B[i, i - 1], B[i, i] = 1, -1
        return nearest_dn, B, n
    if name == "E8":
        B = torch.zeros(8, 8, dtype=torch.float64)
        B[0, 0] = 2
        for i in range(1, 7):
            B[i, i - 1], B[i, i] = -1, 1
        B[7] = 0.5
        return nearest_e8, B, 8
    if name == "A2":
        return nearest_an, torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64), 2
    raise ValueError(f"unknown lattice {name!r}; known: 'Z<n>', 'D<n>' (n >= 2), 'E8', 'A2'")


def normalized_second_moment(name: str, samples: int = 100_000, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo G = E||x - Q(x)||^2 / (n V^(2/n)) with its standard error, x uniform in a fundamental cell.

    x = u B with u uniform in [0, 1)^n covers the cell spanned by the generator rows once, so it is uniform
    modulo the lattice; V = sqrt(det(B B^T)). Returns (G, standard error of G).

    >>> G, se = normalized_second_moment("Z1"); abs(G - 1 / 12) < 4 * se
    True
    """
    nearest, B, n = generator(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, B.shape[0], generator=g, dtype=torch.float64) @ B
    d2 = ((x - nearest(x)) ** 2).sum(dim=-1)
    scale = n * torch.linalg.det(B @ B.T).sqrt() ** (2 / n)  # n V^(2/n)
    return float(d2.mean() / scale), float(d2.std() / samples**0.5 / scale)


# ---------------------------------------------------------------- the E8P codebook of QuIP#

# the 29 norm-12 abs patterns (five 3/2 and three 1/2) that pad D8+1/2's 227 short patterns to 256, as the
# positions of their three 1/2 entries, in quip-sharp's order (get_norm12 in latticee8_padded12.py)
E8P_NORM12_HALVES = ("123 023 013 012 367 357 347 356 346 345 267 257 247 256 246 245 "
                     "167 157 147 156 146 045 067 057 047 056 046 014 237").split()
E8P_SIGN_BIT = (0, 4, 1, 5, 2, 6, 3, 7)  # coordinate i takes sign bit E8P_SIGN_BIT[i] (quip-sharp's shuffle_map)


def e8p_abs_patterns() -> torch.Tensor:
    """The 256 sign-free patterns (256 x 8, entries in {1/2, 3/2, 5/2}), in quip-sharp's index order.

    First the 227 vectors a in (N + 1/2)^8 with ||a||^2 <= 10 in lexicographic order (every such a is |u| for
    some u in D8 + 1/2: flipping one sign changes the sum by an odd number, so one sign choice makes it
    even), then the 29 norm-12 patterns of ``E8P_NORM12_HALVES``. Example: pattern 0 is (1/2, ..., 1/2).
    """
    return _abs_patterns().clone()


@functools.lru_cache(maxsize=1)
def _abs_patterns() -> torch.Tensor:
    halves = (0.5, 1.5, 2.5)  # 7/2 already has 49/4 > 10
    short = [a for a in itertools.product(halves, repeat=8) if sum(v * v for v in a) <= 10]
    norm12 = [tuple(0.5 if str(i) in h else 1.5 for i in range(8)) for h in E8P_NORM12_HALVES]
    return torch.tensor(sorted(short) + norm12, dtype=torch.float64)


def _popcount_parity(s: torch.Tensor) -> torch.Tensor:
    return sum((s >> i) & 1 for i in range(8)) & 1


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes -> points of E8 + 1/4 (shape codes.shape + (8,)), bit for bit quip-sharp's get_full_grid.

    code = abs_index << 8 | s. Let p = parity of popcount(s); s' = s with bit 0 flipped when p = 1 (so s'
    always has an even popcount). Coordinate i is abs[i], negated when sign bit E8P_SIGN_BIT[i] of s' is set,
    and coordinate 7 is negated once more when the abs pattern's sum is odd; this makes the signed vector u
    lie in D8 + 1/2 (even sum). The point is u + 1/4 if p = 0, else u - 1/4.

    Worked example, code 0x0103: abs 1 = (1/2)^7 (3/2) has sum 5, odd; s = 0b11, p = 0, s' = 0b11: bits 0 and
    1 negate coordinates 0 and 2; coordinate 7 flips for the odd sum: u = (-1/2, 1/2, -1/2, 1/2, 1/2, 1/2,
    1/2, -3/2) (sum 0), point = u + 1/4.
    """
    codes = codes.long()
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << 16):
        raise ValueError(f"E8P codes are 16-bit: got values in [{int(codes.min())}, {int(codes.max())}], "
                         f"expected 0 .. 65535")
    A = e8p_abs_patterns()
    a = A[codes >> 8]  # (..., 8)
    s = codes & 255
    p = _popcount_parity(s)
    s = s ^ p  # bit 0 carries the parity
    neg = torch.stack([(s >> b) & 1 for b in E8P_SIGN_BIT], dim=-1).bool()
    neg[..., 7] ^= (A.sum(-1) % 2 == 1)[codes >> 8]
    u = torch.where(neg, -a, a)
    return u + torch.where(p.bool(), -0.25, 0.25)[..., None]


def e8p_encode(abs_index: torch.Tensor, negative: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The code of the point u + shift/4 with |u| = pattern ``abs_index``, ``negative`` its sign mask (..., 8)
    and ``shift`` = +1 or -1 per point; the signs must give u an even sum (u in D8 + 1/2). Inverse of decode.
    """
    abs_index = torch.as_tensor(abs_index).long()
    if abs_index.numel() and (abs_index.min() < 0 or abs_index.max() > 255):
        raise ValueError(f"abs_index must be in 0 .. 255 (the 256 E8P patterns), got values in "
                         f"[{int(abs_index.min())}, {int(abs_index.max())}]")
    if negative.shape != abs_index.shape + (8,):
        raise ValueError(f"negative must have shape abs_index.shape + (8,) = {tuple(abs_index.shape) + (8,)}, "
                         f"got {tuple(negative.shape)}")
    A = e8p_abs_patterns()
    neg = negative.bool().clone()
    neg[..., 7] ^= (A.sum(-1) % 2 == 1)[abs_index]  # undo decode's extra flip for odd-sum patterns
    s = sum(neg[..., i].long() << b for i, b in enumerate(E8P_SIGN_BIT))
    if bool((_popcount_parity(s) != 0).any()):
        raise ValueError("the sign mask must give u an even sum (an even count of signs after the odd-sum "
                         "flip of coordinate 7)")
    s = torch.where(shift < 0, s ^ 1, s)  # p = 1 (shift -1/4) is stored with bit 0 flipped
    return (abs_index << 8) | s


def e8p_codebook() -> torch.Tensor:
    """All 65536 E8P points in code order (65536 x 8, float64; multiples of 1/4).

    2^16 = 256 abs patterns x 128 even-sum sign choices x 2 shifts (+-1/4): the set {u +- 1/4 : |u| one of
    the 256 patterns, u in D8 + 1/2}, a subset of E8 + 1/4 (u - 1/2 is in D8). 2 bits per weight.
    """
    return e8p_decode(torch.arange(1 << 16))


def _e8p_nearest_u(y: torch.Tensor, A: torch.Tensor):
    """For each row of y: the nearest u in D8 + 1/2 with |u| one of the patterns A. Returns (||y - u||^2,
    pattern index, negative-sign mask)."""
    ay = y.abs()[:, None, :] * A  # (N, 256, 8): a_i |y_i|
    odd_negatives = (y < 0).sum(-1) % 2 == 1
    bad = odd_negatives[:, None] ^ (A.sum(-1) % 2 == 1)[None, :]  # sum(sign(y) a) = sum(a) + #neg (mod 2)
    cheapest, where = ay.min(-1)
    score = ay.sum(-1) - 2 * bad * cheapest  # <u, y> for the best even-sum u
    d2, k = ((A**2).sum(-1)[None, :] - 2 * score).min(-1)  # ||y - u||^2 - ||y||^2
    rows = torch.arange(len(y))
    neg = y < 0
    neg[rows, where[rows, k]] ^= bad[rows, k]
    return d2 + (y**2).sum(-1), k, neg


def e8p_nearest(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P point to each row of x (N x 8): (points N x 8, codes N). A 512-way search, not 65536-way.

    For the shift t = +-1/4, the nearest u to y = x - t with |u| = a: take the signs of y (that maximises
    <u, y> = sum a_i |y_i|); if they give an odd sum, flip the one coordinate with the least a_i |y_i| (the
    cheapest way to fix the parity, Conway & Sloane's D_n trick). Then ||y - u||^2 = ||y||^2 + ||a||^2 - 2
    <u, y>, compared over the 256 patterns and both shifts.
    """
    if x.dim() != 2 or x.shape[1] != 8:
        raise ValueError(f"x must have shape (N, 8) (groups of 8 weights), got {tuple(x.shape)}")
    A = e8p_abs_patterns().to(x.dtype)  # (256, 8)
    codes = []
    for xc in x.split(chunk):
        d_plus, k_plus, neg_plus = _e8p_nearest_u(xc - 0.25, A)
        d_minus, k_minus, neg_minus = _e8p_nearest_u(xc + 0.25, A)
        minus = d_minus < d_plus
        k = torch.where(minus, k_minus, k_plus)
        neg = torch.where(minus[:, None], neg_minus, neg_plus)
        codes.append(e8p_encode(k, neg, torch.where(minus, -1, 1)))
    codes = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long)
    return e8p_decode(codes).to(x.dtype), codes


# ---------------------------------------------------------------- the 1-bit E8 codebook of 3-bit QuIP#

E81B_SIZE = 256  # 8-bit codes: 1 bit per weight for a group of 8


def e81b_codebook() -> torch.Tensor:
    """The 256 points of E8 that 3-bit QuIP# adds to E8P as a residual stage (256 x 8, float64), in quip-sharp's
    code order (get_e81bgrid in lib/codebook/latticee8_padded12_rvq3bit.py).

    They are the E8 points of squared norm <= 2 (the origin and the 240 roots: 112 of the form +-e_i +- e_j,
    128 of the form (+-1/2)^8 with an even number of minus signs), then 15 of the 16 points +-2 e_i of norm 4
    (+2 e_0 .. +2 e_7, -2 e_0 .. -2 e_6; quip-sharp leaves -2 e_7 out to make 256). Integer points come before
    half-integer ones, each in lexicographic order. Example: code 0 is (-1, -1, 0, 0, 0, 0, 0, 0).
    """
    return _e81b().clone()


@functools.lru_cache(maxsize=1)
def _e81b() -> torch.Tensor:
    integer = [v for v in itertools.product((-1, 0, 1), repeat=8) if sum(map(abs, v)) in (0, 2) and sum(v) % 2 == 0]
    half = [v for v in itertools.product((-0.5, 0.5), repeat=8) if sum(c < 0 for c in v) % 2 == 0]
    two = [tuple(2 * s * (i == j) for j in range(8)) for s in (1, -1) for i in range(8)][:15]
    return torch.tensor(sorted(integer) + sorted(half) + two, dtype=torch.float64)


def e81b_decode(codes: torch.Tensor) -> torch.Tensor:
    """8-bit codes -> points of the 256-point E8 codebook (shape codes.shape + (8,))."""
    codes = torch.as_tensor(codes).long()
    if codes.numel() and (codes.min() < 0 or codes.max() >= E81B_SIZE):
        raise ValueError(f"E81B codes are 8-bit: got values in [{int(codes.min())}, {int(codes.max())}], "
                         f"expected 0 .. 255")
    return _e81b()[codes]


def e81b_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of the 256 E81B points to each row of x (N x 8): (points N x 8, codes N), by a 256-way argmax of
    2 <x, c> - ||c||^2 (= ||x||^2 - ||x - c||^2; the first index on a tie, as quip-sharp's ``round``)."""
    if x.dim() != 2 or x.shape[1] != 8:
        raise ValueError(f"x must have shape (N, 8) (groups of 8 weights), got {tuple(x.shape)}")
    C = _e81b().to(x.dtype)
    codes = (2 * x @ C.T - (C**2).sum(-1)).argmax(-1)
    return C[codes], codes
