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
   8 weights, 2 bits per weight, plus one scale and the sign vectors S_U, S_V per layer. For 3 and 4 bits a
   second, residual stage follows inside the same BlockLDLQ step (``QuipCodebook``: 'e8p-rvq3', 'e8p-rvq4').

Linears that read one input (q/k/v, gate/up) share H and S_U: ``quip_sharp_shared`` rotates H once, factors it
once and sweeps their stacked rows in one BlockLDLQ call (every row is its own problem given H, so this gives
the codes each would get alone). At inference the weight may stay in the rotated basis and the activation be
rotated instead (``quip_method(..., rotate_inputs=True)`` installs ``qlab.models.modules.QuipLinear``).

Tiny worked example of one LDLQ step (g = 1, int grid with step 1, one row, H = [[1, .5], [.5, 1]]):
H = U D U^T with U = [[1, .5], [0, 1]], D = diag(.75, 1). W = [3.4, 1.4]: column 0 rounds to 3 (W - W_hat =
0.4), column 1 targets 1.4 + 0.4 * 0.5 = 1.6 -> 2. LDLQ gives [3, 2], as GPTQ does (see gptq.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlab.core.formats.lattice import e8p_decode, e8p_nearest, e81b_decode, e81b_nearest
from qlab.core.packing import pack, unpack
from qlab.core.quant import validate
from qlab.core.rotations import RandomizedHadamard, check_signs
from qlab.core.scales import dequantize_groups, quantize_groups
from qlab.core.tensor import dtype_from_name, pack_signs, register_kind, sign_nbytes, unpack_signs
from qlab.methods.base import QuantResult
from qlab.methods.weight.gptq import HessianAccumulator

E8P_OPT_SCALE = 1.03  # RMS of the scaled weight that E8P quantizes best (quip-sharp's opt_scale for E8P12)


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


@dataclass(frozen=True)
class QuipCodebook:
    """A QuIP# codebook for groups of 8 rotated weights, in units of the layer's scale s.

    2 bits: E8P alone. 3 and 4 bits (QuIP#'s residual vector quantization for higher rates): a codebook C2 rounds
    the first stage's residual, magnified by ``resid_scale``:

        c1 = nearest E8P point to w,   c2 = nearest C2 point to (w - E8P[c1]) * resid_scale,
        w_hat = E8P[c1] + C2[c2] / resid_scale        (so the weights are s E8P[c1] + (s / resid_scale) C2[c2])

    C2 is E8P again (4 bits: two 16-bit codes per 8 weights) or the 256-point E81B (3 bits: 16 + 8 bits per 8).
    ``opt_scale`` (the RMS the rotated weight is scaled to) and ``resid_scale`` are quip-sharp's: E8P12 1.03,
    E8P12RVQ3B 0.98 and 2.04, E8P12RVQ4B 1.03 and 3.45 (tests/data/lattice/e81b_reference.json records them).
    Measured here (tests/methods/weight/test_quip_rvq.py): both resid_scales are within 2% of the best MSE on a
    unit Gaussian, but at 4 bits a stage-1 scale of 0.9 gives ~10% less MSE than 1.03 (pass ``opt_scale``).
    """

    name: str
    opt_scale: float
    resid: str | None = None  # the second stage's codebook: None, 'e8p' or 'e81b'
    resid_scale: float = 1.0

    @property
    def resid_bits(self) -> int:
        """Bits of the second-stage code per group of 8: 0, 8 (E81B) or 16 (E8P)."""
        return {None: 0, "e81b": 8, "e8p": 16}[self.resid]

    @property
    def bits(self) -> float:
        """Code bits per weight (the per-layer scale and signs come on top)."""
        return (16 + self.resid_bits) / 8

    def decode(self, codes: torch.Tensor, resid_codes: torch.Tensor | None = None) -> torch.Tensor:
        """E8P[codes] + C2[resid_codes] / resid_scale, shape codes.shape + (8,), float64."""
        points = e8p_decode(codes)
        if self.resid is None:
            return points
        if resid_codes is None:
            raise ValueError(f"the {self.name} codebook needs resid_codes (its second stage)")
        second = e8p_decode(resid_codes) if self.resid == "e8p" else e81b_decode(resid_codes)
        return points + second / self.resid_scale

    def quantize(self, target: torch.Tensor, k: int = 0):
        """A ``block_ldlq`` quantizer: the stage-by-stage nearest points to each row of a block [m, 8].

        Returns (points [m, 8] as ``decode`` gives them, codes [m, 1] or [m, 2] = (c1, c2))."""
        _, c1 = e8p_nearest(target)
        if self.resid is None:
            return self.decode(c1).to(target.dtype), c1[:, None]
        residual = (target - e8p_decode(c1).to(target.dtype)) * self.resid_scale
        _, c2 = e8p_nearest(residual) if self.resid == "e8p" else e81b_nearest(residual)
        return self.decode(c1, c2).to(target.dtype), torch.stack([c1, c2], dim=1)


CODEBOOKS = {cb.name: cb for cb in (
    QuipCodebook("e8p", E8P_OPT_SCALE),                              # 2 bits (quip-sharp's E8P12)
    QuipCodebook("e8p-rvq3", 0.98, resid="e81b", resid_scale=2.04),  # 3 bits (quip-sharp's E8P12RVQ3B)
    QuipCodebook("e8p-rvq4", 1.03, resid="e8p", resid_scale=3.45),   # 4 bits (quip-sharp's E8P12RVQ4B)
)}
SUPPORTED_SPECS = tuple(CODEBOOKS)


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
    """A QuIP# weight: E8P codes of the rotated weight (and residual codes at 3 and 4 bits), one scale, and the
    rotation's sign vectors.

        W_hat = S_V V_m^T ( scale * C[codes] ) V_n S_U          (the un-rotated weight, ``dequantize()``)

    with C[codes] = E8P[codes] + C2[resid_codes] / resid_scale for the residual specs (``QuipCodebook``).
    ``codes`` [m, n/8] index the 65,536-point E8P codebook and ``resid_codes`` [m, n/8] the second stage's (both
    codebooks are fixed, shared by every layer and computed from a few patterns, so not counted here); ``SU``
    [n] and ``SV`` [m] are +-1 (1 bit each); ``seed`` is the seed that drew them. nbytes = (16 + 16 or 8 or 0) / 8
    per group of 8 + 4 (fp32 scale) + (n + m) / 8: at 192 x 576, 2.007, 3.007 and 4.007 bits per weight.
    """

    kind = "quip"

    shape: tuple
    codes: torch.Tensor
    scale: float
    SU: torch.Tensor
    SV: torch.Tensor
    seed: int = 0
    dtype: torch.dtype = torch.float32
    spec: str = "e8p"
    resid_codes: torch.Tensor | None = None

    def __post_init__(self):
        self.shape = tuple(self.shape)
        if self.spec not in CODEBOOKS:
            raise ValueError(f"spec must be one of {', '.join(CODEBOOKS)}, got {self.spec!r}")
        if len(self.shape) != 2 or self.shape[1] % 8:
            raise ValueError(f"a QuIP# weight is [out, in] with in a multiple of 8 (E8P groups), got {self.shape}")
        m, n = self.shape
        if tuple(self.codes.shape) != (m, n // 8):
            raise ValueError(f"codes must be [out={m}, in/8={n // 8}], got {tuple(self.codes.shape)}")
        if self.codes.is_floating_point() or self.codes.numel() and (self.codes.min() < 0 or self.codes.max() >= 1 << 16):
            raise ValueError("codes must be integers in [0, 65536) (16-bit E8P codes)")
        check_signs(self.SU, self.SV, m, n)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")
        bits = self.codebook.resid_bits
        if bits == 0 and self.resid_codes is not None:
            raise ValueError(f"the {self.spec} spec has no second stage: resid_codes must be None")
        if bits:
            r = self.resid_codes
            if r is None or tuple(r.shape) != (m, n // 8):
                raise ValueError(f"{self.spec} needs resid_codes [out={m}, in/8={n // 8}], got "
                                 f"{None if r is None else tuple(r.shape)}")
            if r.is_floating_point() or r.numel() and (r.min() < 0 or r.max() >= 1 << bits):
                raise ValueError(f"resid_codes must be integers in [0, {1 << bits}) ({bits}-bit codes for {self.spec})")

    @property
    def codebook(self) -> QuipCodebook:
        return CODEBOOKS[self.spec]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def rotation(self) -> RandomizedHadamard:
        return RandomizedHadamard.from_signs(self.SU, self.SV, self.seed)

    def rotated(self) -> torch.Tensor:
        """scale * C[codes]: the weight in the rotated basis, [m, n] float64."""
        return self.scale * self.codebook.decode(self.codes, self.resid_codes).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return self.rotation().weight_inverse(self.rotated()).to(self.dtype)

    @property
    def nbytes(self) -> float:
        m, n = self.shape
        return (16 + self.codebook.resid_bits) // 8 * self.codes.numel() + 4 + sign_nbytes(m, n)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def state_dict(self) -> dict:
        state = {"kind": self.kind, "shape": list(self.shape), "dtype": str(self.dtype), "seed": self.seed,
                 "spec": self.spec, "codes": pack(self.codes, 16), "scale": float(self.scale),
                 "SU": pack_signs(self.SU), "SV": pack_signs(self.SV)}
        if self.resid_codes is not None:
            state["resid_codes"] = pack(self.resid_codes, self.codebook.resid_bits)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "QuipTensor":
        m, n = state["shape"]
        spec = state.get("spec", "e8p")  # files written before the residual specs are E8P
        codes = unpack(state["codes"], 16, m * n // 8).reshape(m, n // 8)
        resid = state.get("resid_codes")
        if resid is not None:
            resid = unpack(resid, CODEBOOKS[spec].resid_bits, m * n // 8).reshape(m, n // 8)
        SU, SV = unpack_signs(state["SU"], n), unpack_signs(state["SV"], m)
        return cls((m, n), codes, float(state["scale"]), SU, SV, int(state["seed"]), dtype_from_name(state["dtype"]),
                   spec, resid)

    def __repr__(self):
        return (f"QuipTensor({self.spec}, shape={self.shape}, {self.nbytes:,} bytes, "
                f"{self.bits_per_weight:.3f} bits/weight)")


# ---------------------------------------------------------------- QuIP# and its registry entry


def quip_sharp(W: torch.Tensor, H: torch.Tensor, *, seed: int = 0, opt_scale: float | None = None,
               sigma: float = 0.01, spec: str = "e8p") -> QuipTensor:
    """QuIP# of a weight [m, n] given its proxy Hessian H [n, n]: rotate, scale, BlockLDLQ with E8P ('e8p', 2 bits)
    or E8P plus a residual stage ('e8p-rvq3', 'e8p-rvq4').

    The scale is s = RMS(W') / opt_scale for the rotated weight W', so W' / s has RMS ``opt_scale`` (None: the
    codebook's, 1.03 for E8P).
    """
    return quip_sharp_shared([W], H, seed=seed, opt_scale=opt_scale, sigma=sigma, spec=spec)[0]


def quip_sharp_shared(weights: list, H: torch.Tensor, *, seed: int = 0, opt_scale: float | None = None,
                      sigma: float = 0.01, spec: str = "e8p") -> list:
    """QuIP# for several weights [m_i, n] that read one input (q/k/v, gate/up) and so share H.

    One seed draws the same S_U for all (``RandomizedHadamard`` draws S_U first), so the input is rotated once
    at inference; H is rotated, regularised and block-factored once; each weight is rotated on its output side
    with its own S_V and scaled by its own RMS; then one BlockLDLQ call sweeps the stacked rows. A row's codes
    depend only on the row, H and the codebook, so each weight gets the codes ``quip_sharp`` gives it alone.
    Returns one QuipTensor per weight, in order.
    """
    weights = [w.weight.data if isinstance(w, torch.nn.Linear) else w for w in weights]
    codebook = CODEBOOKS[parse_quip_spec(spec)]
    opt_scale = codebook.opt_scale if opt_scale is None else opt_scale
    validate(H, "Hessian")
    if not weights:
        raise ValueError("weights must hold at least one weight [out, in]")
    for W in weights:
        validate(W, "weight")
        if W.dim() != 2:
            raise ValueError(f"QuIP# quantizes a 2-d weight [out, in], got shape {tuple(W.shape)}")
    n = weights[0].shape[1]
    if any(W.shape[1] != n for W in weights):
        raise ValueError(f"weights sharing an input must have the same input width, got "
                         f"{[tuple(W.shape) for W in weights]}")
    if n % 8:
        raise ValueError(f"E8P quantizes groups of 8 input weights: the input width {n} must be a multiple of 8")
    if not opt_scale > 0:
        raise ValueError(f"opt_scale must be positive, got {opt_scale}")
    rotations = [RandomizedHadamard(W.shape[0], n, seed=seed) for W in weights]  # refuse widths with no Hadamard
    Hr = rotations[0].hessian(H.double())  # V_n S_U H S_U V_n^T, the same S_U for every weight
    scaled, scales = [], []
    for W, R in zip(weights, rotations):
        Wr = R.weight(W.double())
        rms = float(Wr.pow(2).mean().sqrt())
        scales.append(rms / opt_scale if rms > 0 else torch.finfo(torch.float32).tiny)  # all-zero W decodes to ~0
        scaled.append(Wr / scales[-1])
    _, codes = block_ldlq(torch.cat(scaled), Hr, codebook.quantize, g=8, sigma=sigma)
    stages = codes.shape[1] // (n // 8)  # block_ldlq lays the codes out block by block: (c1, c2) per group
    out, start = [], 0
    for W, R, scale in zip(weights, rotations, scales):
        c = codes[start:start + W.shape[0]]
        start += W.shape[0]
        resid = c[:, 1::stages] if stages == 2 else None
        out.append(QuipTensor(tuple(W.shape), c[:, 0::stages], scale, R.SU, R.SV, seed, W.dtype, codebook.name, resid))
    return out


def parse_quip_spec(spec) -> str:
    """'e8p' (2 bits), 'e8p-rvq3' (3 bits) or 'e8p-rvq4' (4 bits); anything else is refused with the list."""
    name = str(spec).strip().lower()
    if name not in SUPPORTED_SPECS:
        raise ValueError(f"quip supports the specs {', '.join(repr(s) for s in SUPPORTED_SPECS)} (E8P: a 16-bit "
                         f"code per 8 weights, 2 bits per weight; -rvq3 / -rvq4 add an 8- or 16-bit residual code "
                         f"per 8 weights for 3 or 4 bits), got {spec!r}")
    return name


def quip_method(weights, X, spec, names=None, *, seed: int = 0, opt_scale: float | None = None,
                sigma: float = 0.01, rotate_inputs: bool = False) -> QuantResult:
    """The registry's QuIP#: H from the calibration batches X, then ``quip_sharp_shared`` on the group's weights
    (one H, one S_U: q/k/v share their input rotation, and one BlockLDLQ sweep covers their stacked rows).

    ``rotate_inputs``: keep each weight in the rotated basis and rotate the activation at run time (the walker
    installs ``qlab.models.modules.QuipLinear``); False: the weight is de-quantized back to the original basis.
    """
    spec = parse_quip_spec(spec)
    if not X:
        raise ValueError("QuIP# needs calibration inputs X (a list of batches [..., in])")
    acc = HessianAccumulator(weights[0].shape[1])
    for x in X:
        acc.add(x)
    H = acc.XtX * (2.0 / acc.n)  # float64
    qweights = quip_sharp_shared(weights, H, seed=seed, opt_scale=opt_scale, sigma=sigma, spec=spec)
    act = {"kind": "quip_rotated"} if rotate_inputs else None
    return QuantResult(qweights, act=act, info={"scales": [q.scale for q in qweights]})
