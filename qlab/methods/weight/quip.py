"""QuIP# at 2 bits (Tseng et al. 2024): incoherence processing, BlockLDLQ, and the E8P lattice codebook.

Three steps per Linear ``W [m, n]`` with proxy Hessian ``H = (2/N) X^T X [n, n]``:

1. Rotate (QuIP# alg. 1): W <- V_m S_V W S_U V_n^T and H <- V_n S_U H S_U V_n^T with random +-1 diagonals S
   and normalized Hadamard matrices V (``qlab.core.rotations.RandomizedHadamard``). The rotated weight has
   no outliers, so one scale for the whole layer is enough: s = RMS(W) / 1.03, where 1.03 is the RMS at
   which E8P quantizes a unit Gaussian best (quip-sharp's ``opt_scale``).
2. BlockLDLQ (QuIP# alg. 2; QuIP's LDLQ, Chee et al. 2023, sec. 3): the proxy loss is

       l(W_hat) = tr( (W_hat - W) H (W_hat - W)^T )                                     (QuIP eq. 1)

   Regularise H <- H / mean(diag H) + sigma I and factor it as H = U D U^T with U unit *block* upper
   triangular (identity blocks of g x g on the diagonal) and D block diagonal. Then, with E = W_hat - W,
   l = sum_k tr( (E U)_k D_k (E U)_k^T ), and (E U)_k = E_k + sum_{j<k} E_j U_jk. Quantizing the blocks of g
   columns left to right as

       W_hat_k = Q( W_k + sum_{j<k} (W_j - W_hat_j) U_jk )                             (LDLQ, block form)

   makes (E U)_k exactly the rounding error of block k alone. With g = 1 and a scalar grid this is GPTQ
   (QuIP thm. 6: LDLQ == OPTQ). quip-sharp factors H = L D L^T with L lower and sweeps the blocks last to
   first; that is the same algorithm on the columns in reverse order.
3. Quantize each group of 8 columns with E8P (``qlab.core.formats.lattice.e8p_nearest``): a 16-bit code per
   8 weights, 2 bits per weight, plus one scale and the sign vectors S_U, S_V per layer.

Tiny worked example of one LDLQ step (g = 1, int grid with step 1, one row, H = [[1, .5], [.5, 1]]):
H = U D U^T with U = [[1, .5], [0, 1]], D = diag(.75, 1). W = [3.4, 1.4]: column 0 rounds to 3 (W - W_hat =
0.4), column 1 targets 1.4 + 0.4 * 0.5 = 1.6 -> 2. LDLQ gives [3, 2], as GPTQ does (see gptq.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlab.core.formats.lattice import e8p_decode, e8p_nearest
from qlab.core.packing import pack, unpack
from qlab.core.quant import validate
from qlab.core.rotations import RandomizedHadamard
from qlab.core.scales import dequantize_groups, quantize_groups
from qlab.core.tensor import dtype_from_name, register_kind
from qlab.methods.base import QuantResult
from qlab.methods.weight.gptq import HessianAccumulator

E8P_OPT_SCALE = 1.03  # RMS of the scaled weight that E8P quantizes best (quip-sharp's opt_scale for E8P12)
SUPPORTED_SPECS = ("e8p",)


# ---------------------------------------------------------------- BlockLDLQ


def regularize(H: torch.Tensor, sigma: float = 0.01) -> torch.Tensor:
    """H / mean(diag H) + sigma I (QuIP#, sec. 4; quip-sharp's regularize_H), in float64."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    H = H.double()
    return H / torch.diag(H).mean() + sigma * torch.eye(H.shape[0], dtype=H.dtype)


def block_ldl(H: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = U D U^T with U unit block upper triangular (g x g identity blocks) and D [n/g, g, g] block diagonal.

    From the "upper Cholesky" factor H = C C^T (C upper, the Cholesky factor of H with rows and columns
    reversed): U = C blockdiag(C_kk)^-1 and D_k = C_kk C_kk^T. Example (g = 1): H = [[1, .5], [.5, 1]] gives
    C = [[sqrt(.75), .5], [0, 1]], U = [[1, .5], [0, 1]], D = (.75, 1).
    """
    n = H.shape[0]
    if H.shape != (n, n) or n % g:
        raise ValueError(f"H must be square with a side divisible by the block size g={g}, got {tuple(H.shape)}")
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info != 0:
        raise ValueError("H is not positive definite; raise sigma (the regularisation sigma * I)")
    C = L.flip(0, 1)  # upper triangular, H = C C^T
    blocks = C.reshape(n // g, g, n // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # C_kk, [n/g, g, g]
    D = blocks @ blocks.transpose(1, 2)
    U = C.reshape(n, n // g, g).transpose(0, 1) @ torch.linalg.inv(blocks)  # column block k times C_kk^-1
    U = U.transpose(0, 1).reshape(n, n)
    return U, D


def block_ldlq(W: torch.Tensor, H: torch.Tensor, quantize, g: int = 8, sigma: float = 0.01):
    """BlockLDLQ: quantize W [m, n] in blocks of g columns, left to right, with feedback through U.

    ``quantize(target [m, g], k) -> (W_hat_k [m, g], codes [m, c])`` rounds block k (a vector codebook such as
    ``e8p_quantizer``, or a scalar grid such as ``scalar_quantizer(...)`` with g = 1). H is regularised to
    H / mean(diag H) + sigma I first. Returns (W_hat [m, n], codes [m, sum of c]), in float64.
    """
    W = W.double()
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight with {n} input columns, got {tuple(H.shape)}")
    if g < 1 or n % g:
        raise ValueError(f"the block size g={g} must divide the input width {n}")
    U, _ = block_ldl(regularize(H, sigma), g)
    W_hat = torch.zeros_like(W)
    codes = []
    for k in range(n // g):
        done, cols = slice(0, k * g), slice(k * g, (k + 1) * g)
        target = W[:, cols] + (W[:, done] - W_hat[:, done]) @ U[done, cols]  # W_k + sum_{j<k} (W_j - W_hat_j) U_jk
        W_hat[:, cols], c = quantize(target, k)
        codes.append(c)
    return W_hat, torch.cat(codes, dim=1)


def e8p_quantizer(target: torch.Tensor, k: int = 0):
    """Nearest E8P point to each row of a block of 8 columns: (points [m, 8], 16-bit codes [m, 1])."""
    points, codes = e8p_nearest(target)
    return points, codes[:, None]


def scalar_quantizer(scale: torch.Tensor, zero_point: torch.Tensor | None, grid):
    """A quantizer for ``block_ldlq`` with g = 1: one column, a fixed scale (and zero point) per row [m].

    Returns the values ``scale * (q - zero_point)`` and the grid values q, rounded as ``qlab.core.scales`` does."""
    def quantize(target, k):
        s = scale.to(target.dtype)
        zp = None if zero_point is None else zero_point.to(target.dtype)
        q = quantize_groups(target, s, zp, grid)  # [m, 1]
        return dequantize_groups(q, s, zp), q
    return quantize


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T), QuIP's proxy objective. Example: W - W_hat = [[1, 1]], H = I -> 2."""
    E = (W - W_hat).double()
    return float(((E @ H.double()) * E).sum())


# ---------------------------------------------------------------- the quantized tensor


@register_kind
@dataclass
class QuipTensor:
    """A QuIP# weight: 16-bit E8P codes of the rotated weight, one scale, and the rotation's sign vectors.

        W_hat = S_V V_m^T ( scale * E8P[codes] ) V_n S_U          (the un-rotated weight, ``dequantize()``)

    ``codes`` [m, n/8] index the 65,536-point E8P codebook (shared by every layer and computed from 256
    patterns, so not counted here); ``SU`` [n] and ``SV`` [m] are +-1 (1 bit each); ``seed`` is the seed that
    drew them. nbytes = 2 per code + 4 (fp32 scale) + (n + m) / 8: about 2.01 bits per weight at 192 x 576.
    """

    kind = "quip"

    shape: tuple
    codes: torch.Tensor
    scale: float
    SU: torch.Tensor
    SV: torch.Tensor
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if len(self.shape) != 2 or self.shape[1] % 8:
            raise ValueError(f"a QuIP# weight is [out, in] with in a multiple of 8 (E8P groups), got {self.shape}")
        m, n = self.shape
        if tuple(self.codes.shape) != (m, n // 8):
            raise ValueError(f"codes must be [out={m}, in/8={n // 8}], got {tuple(self.codes.shape)}")
        if self.codes.is_floating_point() or self.codes.numel() and (self.codes.min() < 0 or self.codes.max() >= 1 << 16):
            raise ValueError("codes must be integers in [0, 65536) (16-bit E8P codes)")
        for name, v, size in (("SU", self.SU, n), ("SV", self.SV, m)):
            if tuple(v.shape) != (size,) or not bool((v.abs() == 1).all()):
                raise ValueError(f"{name} must be {size} signs +-1, got shape {tuple(v.shape)}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rotation(self) -> RandomizedHadamard:
        R = RandomizedHadamard(*self.shape, seed=self.seed)
        R.SU, R.SV = self.SU.double(), self.SV.double()  # the stored signs are the truth, not the generator
        return R

    def rotated(self) -> torch.Tensor:
        """scale * E8P[codes]: the weight in the rotated basis, [m, n] float64."""
        return self.scale * e8p_decode(self.codes).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return self.rotation().weight_inverse(self.rotated()).to(self.dtype)

    @property
    def nbytes(self) -> float:
        m, n = self.shape
        return 2 * self.codes.numel() + 4 + math.ceil(n / 8) + math.ceil(m / 8)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def state_dict(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype), "seed": self.seed,
                "codes": pack(self.codes, 16), "scale": float(self.scale),
                "SU": pack(self.SU < 0, 1), "SV": pack(self.SV < 0, 1)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "QuipTensor":
        m, n = state["shape"]
        codes = unpack(state["codes"], 16, m * n // 8).reshape(m, n // 8)
        SU = 1.0 - 2.0 * unpack(state["SU"], 1, n).double()
        SV = 1.0 - 2.0 * unpack(state["SV"], 1, m).double()
        return cls((m, n), codes, float(state["scale"]), SU, SV, int(state["seed"]), dtype_from_name(state["dtype"]))

    def __repr__(self):
        return f"QuipTensor(E8P, shape={self.shape}, {self.nbytes:,} bytes, {self.bits_per_weight:.3f} bits/weight)"


# ---------------------------------------------------------------- QuIP# and its registry entry


def quip_sharp(W: torch.Tensor, H: torch.Tensor, *, seed: int = 0, opt_scale: float = E8P_OPT_SCALE,
               sigma: float = 0.01) -> QuipTensor:
    """QuIP# E8P (2 bits) of a weight [m, n] given its proxy Hessian H [n, n]: rotate, scale, BlockLDLQ.

    The scale is s = RMS(W') / opt_scale for the rotated weight W', so W' / s has RMS ``opt_scale``.
    """
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    validate(W, "weight")
    validate(H, "Hessian")
    if W.dim() != 2:
        raise ValueError(f"QuIP# quantizes a 2-d weight [out, in], got shape {tuple(W.shape)}")
    m, n = W.shape
    if n % 8:
        raise ValueError(f"E8P quantizes groups of 8 input weights: the input width {n} must be a multiple of 8")
    if not opt_scale > 0:
        raise ValueError(f"opt_scale must be positive, got {opt_scale}")
    R = RandomizedHadamard(m, n, seed=seed)  # refuses widths with no Hadamard construction
    Wr, Hr = R.weight(W.double()), R.hessian(H.double())
    rms = float(Wr.pow(2).mean().sqrt())
    scale = rms / opt_scale if rms > 0 else torch.finfo(torch.float32).tiny  # an all-zero W decodes to ~0
    _, codes = block_ldlq(Wr / scale, Hr, e8p_quantizer, g=8, sigma=sigma)
    return QuipTensor((m, n), codes, scale, R.SU, R.SV, seed, W.dtype)


def parse_quip_spec(spec) -> str:
    """'e8p' (2 bits); anything else is refused with the list of what is supported."""
    name = str(spec).strip().lower()
    if name not in SUPPORTED_SPECS:
        raise ValueError(f"quip supports the spec {', '.join(repr(s) for s in SUPPORTED_SPECS)} (E8P: a 16-bit "
                         f"code per 8 weights, 2 bits per weight), got {spec!r}; the residual 3- and 4-bit "
                         f"variants (E8P plus a scaled second E8P stage) are not implemented yet")
    return name


def quip_method(weights, X, spec, names=None, *, seed: int = 0, opt_scale: float = E8P_OPT_SCALE,
                sigma: float = 0.01) -> QuantResult:
    """The registry's QuIP#: H from the calibration batches X, then ``quip_sharp`` on each weight with that
    same H and the same seed (weights that read one input, q/k/v, share S_U, so their inputs rotate once)."""
    parse_quip_spec(spec)
    if not X:
        raise ValueError("QuIP# needs calibration inputs X (a list of batches [..., in])")
    acc = HessianAccumulator(weights[0].shape[1])
    for x in X:
        acc.add(x)
    H = acc.XtX * (2.0 / acc.n)  # float64
    qweights = [quip_sharp(W, H, seed=seed, opt_scale=opt_scale, sigma=sigma) for W in weights]
    return QuantResult(qweights, info={"scales": [q.scale for q in qweights]})
