"""Closed forms to check quantizers against: SQNR of a uniform quantizer, the Gaussian rate–distortion
bound, and the optimal (Lloyd–Max) scalar quantizer.

**SQNR of a uniform quantizer.** A step Δ that never overloads leaves an error spread evenly over
(-Δ/2, Δ/2], of power Δ²/12. A signal of peak A and power P·A² then has

    SQNR = 10 log10(P A² / (Δ²/12))                                                   (1)

With 2^n cells tiling [-A, A] (Δ = 2A / 2^n, the textbook "mid-rise" quantizer) this is
10 log10(12 P · 4^n / 4) = 6.02 n + 10 log10(3 P):

* full-scale uniform signal, P = 1/3:  SQNR = 6.02 n dB            (exact for every n)
* full-scale sine,           P = 1/2:  SQNR = 6.02 n + 1.76 dB     (high-resolution approximation)

The +1.76 dB belongs to the sine (its power A²/2 against A²/3); it is not a property of quantization.
qlab's absmax int grid puts ±A *on* the end levels and keeps 0 exact, so it has 2^n - 1 levels and
Δ = 2A / (2^n - 2): formula (1) gives 20 log10(2^n - 2) + 10 log10(3P), 1.16 dB below 6.02 n at n = 4.

**Rate–distortion** (Shannon; Cover & Thomas, Theorem 10.3.2): no code of R bits per sample can
describe a Gaussian of variance σ² with mean squared error below

    D(R) = σ² 2^(-2R)                                                                 (2)

so each bit buys at most 6.02 dB: halving the distortion (3.01 dB) takes half a bit, one more bit
quarters it. A uniform quantizer followed by an ideal entropy coder reaches πe/6 · D(R) at high rate
(Gish & Pierce 1968): 1.53 dB or 0.254 bit from the bound.

**Lattices, entropy-coded, at high rate** (Zador; Gersho 1979; Conway & Sloane ch. 2): a lattice of
normalized second moment G and cell volume V leaves D = G V^(2/n) per dimension, and entropy-coding its
points costs R = h - log2(V)/n bits per dimension, h = ½ log2(2πe σ²) for a Gaussian. Eliminating V:

    D ≈ 2πe G · σ² 2^(-2R)                                                             (3)

Z (G = 1/12) gives πe/6 (+1.53 dB); D4 (G = 0.0766032) +1.17 dB; E8 (G = 929/12960) +0.88 dB, i.e. 0.65 dB
better than Z; the bound itself is the limit G → 1/(2πe) of ever larger dimension. (3) describes
variable-rate (entropy-coded) quantization; a fixed-rate codebook (QuIP#'s E8P) is a different curve.

**Lloyd–Max** (Lloyd 1957/1982, Max 1960): the L-level quantizer of least MSE satisfies
thresholds t_i = (c_i + c_(i+1)) / 2 and c_i = E[x | t_(i-1) < x <= t_i]. For a unit Gaussian the
centroid of (a, b] is (φ(a) - φ(b)) / (Φ(b) - Φ(a)) and the MSE is 1 - Σ P_i c_i². Max's table:
1 bit 0.3634, 2 bits 0.1175, 3 bits 0.03454, 4 bits 0.009497.

>>> round(lloyd_max_gaussian(2)["mse"], 4)       # 1 bit: levels ±sqrt(2/π)
0.3634
"""
import math

import torch

from qlab.core.error import mse as _mse, sqnr_db
from qlab.core.formats import get_grid
from qlab.core.quant import fake_quant, quantize
from qlab.core.scales import fake_quant_groups

DB_PER_BIT = 20 * math.log10(2)  # 6.0206 dB
ECSQ_GAP = math.pi * math.e / 6  # 1.4233 = 1.53 dB = 0.2546 bit
# normalized second moments G (Conway & Sloane, "Sphere Packings, Lattices and Groups", table 2.3)
LATTICE_G = {"Z": 1 / 12, "D4": 0.0766032, "E8": 929 / 12960}


# ---- signals --------------------------------------------------------------------------------------
def _uniform(n, g):
    return 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1  # U[-1, 1], peak 1


def _sine(n, g):
    # equidistributed phases (golden-ratio frequency): the amplitude follows the arcsine law of a sine
    phase = (torch.arange(n, dtype=torch.float64) * (math.sqrt(5) - 1) / 2 + torch.rand(1, generator=g)) % 1
    return torch.sin(2 * math.pi * phase)


def _gaussian(n, g):
    return torch.randn(n, generator=g, dtype=torch.float64)


def _laplace(n, g):  # unit variance: scale 1/sqrt(2)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)


def _student_t3(n, g):  # t with 3 degrees of freedom, divided by sqrt(3) for unit variance
    z = torch.randn(n, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(3, n, generator=g, dtype=torch.float64) ** 2).sum(0)
    return z / torch.sqrt(chi2 / 3) / math.sqrt(3)


SOURCES = {"uniform": _uniform, "sine": _sine, "gaussian": _gaussian, "laplace": _laplace,
           "student_t3": _student_t3}
SOURCE_POWER = {"uniform": 1 / 3, "sine": 1 / 2}  # mean square / peak² of the full-scale signals


def signal(source: str, n: int, seed: int = 0) -> torch.Tensor:
    """n float64 samples: 'uniform' and 'sine' have peak 1; 'gaussian', 'laplace', 'student_t3' unit variance."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if n <= 0:
        raise ValueError(f"need at least one sample, got n={n}")
    return SOURCES[source](n, torch.Generator().manual_seed(seed))


# ---- SQNR closed forms ----------------------------------------------------------------------------
def sqnr_theory_db(source: str, peak_over_step: float) -> float:
    """Equation (1): SQNR of a non-overloading uniform quantizer, from the ratio 2A / Δ."""
    if source not in SOURCE_POWER:
        raise ValueError(f"closed-form SQNR is for {', '.join(SOURCE_POWER)}, not {source!r}")
    return 20 * math.log10(peak_over_step) + 10 * math.log10(3 * SOURCE_POWER[source])


def sqnr_full_scale_db(bits: int, source: str = "uniform") -> float:
    """The textbook line: 6.02 n (uniform), 6.02 n + 1.76 (sine), for 2^n cells tiling [-A, A]."""
    return sqnr_theory_db(source, 2**bits)


def sqnr_absmax_db(bits: int, source: str = "uniform") -> float:
    """Equation (1) for qlab's symmetric absmax int grid: 2^n - 1 levels, Δ = 2A / (2^n - 2)."""
    if bits < 2:
        raise ValueError("a symmetric absmax int grid needs at least 2 bits")
    return sqnr_theory_db(source, 2**bits - 2)


def sqnr_minmax_db(bits: int, source: str = "uniform") -> float:
    """Equation (1) for the asymmetric min-max uint grid: 2^n levels from -A to A, Δ = 2A / (2^n - 1)."""
    return sqnr_theory_db(source, 2**bits - 1)


def midrise_quantize(x: torch.Tensor, bits: int, peak: float = 1.0) -> torch.Tensor:
    """The textbook quantizer: 2^n cells of width Δ = 2·peak / 2^n tiling [-peak, peak], each value
    sent to its cell's centre. Built from the core's uint grid with a half-integer zero point.

    >>> midrise_quantize(torch.tensor([-1.0, -0.1, 0.3, 1.0]), bits=1)
    tensor([-0.5000, -0.5000,  0.5000,  0.5000])
    """
    step = torch.tensor([2 * peak / 2**bits], dtype=torch.float64)
    zero_point = torch.tensor([2 ** (bits - 1) - 0.5], dtype=torch.float64)
    G = x.reshape(1, -1).double()
    return fake_quant_groups(G, step, zero_point, get_grid(f"uint{bits}")).reshape(x.shape)


# ---- rate–distortion ------------------------------------------------------------------------------
def gaussian_rd(rate, variance: float = 1.0):
    """Equation (2): D(R) = σ² 2^(-2R), the least MSE at R bits per sample for a Gaussian source."""
    rate = rate.double() if isinstance(rate, torch.Tensor) else torch.tensor(rate, dtype=torch.float64)
    return variance * 2.0 ** (-2 * rate)


def lattice_rd(rate, G: float, variance: float = 1.0):
    """Equation (3): the high-rate MSE per sample of an entropy-coded lattice quantizer of normalized
    second moment G on a Gaussian, 2πe G · σ² 2^(-2R) (G = 1/12, the scalar grid, gives πe/6 · D(R))."""
    return 2 * math.pi * math.e * G * gaussian_rd(rate, variance)


def lattice_gap_db(G: float) -> float:
    """How far (dB) equation (3) sits above D(R): 10 log10(2πe G); 1.53 for Z, 0.88 for E8."""
    return 10 * math.log10(2 * math.pi * math.e * G)


def entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy -Σ p log2 p of integer codes: the rate an ideal entropy coder would reach."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * torch.log2(p)).sum())


# ---- Lloyd–Max ------------------------------------------------------------------------------------
def _normal_pdf(x):
    return torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def lloyd_max_gaussian(levels: int, tol: float = 1e-13, max_iter: int = 100_000) -> dict:
    """Lloyd–Max quantizer of a unit Gaussian with ``levels`` levels, by Lloyd's iteration on the exact
    density (centroids from the normal pdf/cdf), until no level moves by more than ``tol``.

    Returns {'levels', 'thresholds' (interior), 'mse', 'iterations'} (float64 tensors).
    """
    if levels < 1:
        raise ValueError(f"need at least one level, got {levels}")
    c = torch.special.ndtri(torch.arange(0.5, levels, dtype=torch.float64) / levels)  # quantile start
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for it in range(1, max_iter + 1):
        t = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])  # nearest-neighbour thresholds
        P = torch.special.ndtr(t[1:]) - torch.special.ndtr(t[:-1])  # P(t_(i-1) < x <= t_i)
        new = (_normal_pdf(t[:-1]) - _normal_pdf(t[1:])) / P  # centroids E[x | cell]
        moved = float((new - c).abs().max())
        c = new
        if moved < tol:
            break
    t = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])
    P = torch.special.ndtr(t[1:]) - torch.special.ndtr(t[:-1])
    return {"levels": c, "thresholds": t[1:-1], "mse": float(1 - (P * c**2).sum()), "iterations": it}


def lloyd_1d(x: torch.Tensor, levels: int, iters: int = 100, tol: float = 1e-10) -> dict:
    """Lloyd's algorithm (1-D k-means) on samples: the empirical MSE-optimal scalar quantizer.

    Starts from the sample quantiles; each step assigns every sample to its nearest level and moves
    each level to the mean of its samples. Returns {'levels', 'mse', 'iterations'}.
    """
    if levels < 1:
        raise ValueError(f"need at least one level, got {levels}")
    x = x.reshape(-1).double()
    if x.numel() < levels:
        raise ValueError(f"{x.numel()} samples cannot fill {levels} levels")
    xs = x.sort().values
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), xs.cumsum(0)])  # a cell is a slice of xs
    c = xs[((torch.arange(levels, dtype=torch.float64) + 0.5) / levels * len(xs)).long()]
    for it in range(1, iters + 1):
        edges = torch.cat([torch.tensor([0]), torch.searchsorted(xs, (c[1:] + c[:-1]) / 2), torch.tensor([len(xs)])])
        counts = (edges[1:] - edges[:-1]).double()
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # an empty cell keeps its level
        moved = float((new - c).abs().max())
        c = new
        if moved < tol:
            break
    return {"levels": c, "mse": float(((xs - c[nearest(c, xs)]) ** 2).mean()), "iterations": it}


def nearest(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for each x (count of midpoints below x)."""
    return torch.searchsorted((levels[1:] + levels[:-1]) / 2, x.contiguous())


# ---- measuring the core's quantizers against the closed forms -------------------------------------
def measured_sqnr(x: torch.Tensor, bits: int) -> dict:
    """Measured SQNR (dB) of the textbook mid-rise quantizer and of the core's absmax (symmetric int)
    and min-max (asymmetric uint) per-tensor quantizers on a full-scale signal x."""
    xf = x.float()
    row = {"bits": bits, "midrise": sqnr_db(x, midrise_quantize(x, bits)),
           "minmax": sqnr_db(xf, fake_quant(xf, f"int{bits}-tensor-asym-minmax"))}
    row["absmax"] = sqnr_db(xf, fake_quant(xf, f"int{bits}-tensor-sym-absmax")) if bits >= 2 else math.nan
    return row


def sqnr_sine_midrise_db(bits: int) -> float:
    """6.02 n + 1.76 dB corrected for the sine's peaks: its arcsine density piles up in the two outer
    cells, whose mean squared error is 7Δ²/60 instead of Δ²/12. Those cells hold a fraction
    (2/π) sqrt(2Δ/A) of the samples, so the noise grows by the factor 1 + (1.6/π) 2^(-n/2)
    (first order in sqrt(Δ/A); 0.14 dB at n = 8, 0.53 dB at n = 4)."""
    return sqnr_full_scale_db(bits, "sine") - 10 * math.log10(1 + 1.6 / math.pi * 2 ** (-bits / 2))


def clip_sweep(x: torch.Tensor, bits: int, clips) -> torch.Tensor:
    """MSE of the core's symmetric int quantizer (per tensor) when the range is clipped at each value
    of ``clips`` (scale = clip / qmax). The minimum over a wide log-spaced range of clips is the
    MSE-optimal uniform quantizer (the core's 'mse' rule searches clip/max in [0.01, 1])."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    out = [float(((quantize(xf, f"int{bits}-tensor-sym-absmax", scale=torch.tensor([c / qmax])).dequantize()
                  - xf).double() ** 2).mean()) for c in clips]
    return torch.tensor(out, dtype=torch.float64)


def gptq_clip_search(x: torch.Tensor, bits: int, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4) -> dict:
    """GPTQ's reference range search on the core's symmetric int grid (per tensor): try the clip ratios
    p = 1 - i/grid for i < maxshrink·grid (1.00 down to 0.21) and keep the one of least Σ|x - Q(x)|^norm
    (IST-DASLab/gptq quant.py, ``Quantizer.find_params`` with ``mse=True``: grid 100, maxshrink 0.8,
    norm 2.4). Returns the MSE at the chosen ratio ('mse') and the ratio ('p')."""
    if not 0 < maxshrink <= 1 or grid < 1:
        raise ValueError(f"need grid >= 1 and 0 < maxshrink <= 1, got grid={grid}, maxshrink={maxshrink}")
    xf = x.float()
    peak, qmax = float(xf.abs().max()), 2 ** (bits - 1) - 1
    best = (math.inf, 1.0, math.nan)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        err = quantize(xf, f"int{bits}-tensor-sym-absmax", scale=torch.tensor([p * peak / qmax])).dequantize() - xf
        score = float((err.double().abs() ** norm).sum())
        if score < best[0]:
            best = (score, p, float((err.double() ** 2).mean()))
    return {"mse": best[2], "p": best[1]}


def clipping_study(x: torch.Tensor, bits: int, n_clips: int = 40, lloyd_iters: int = 300) -> dict:
    """MSE of four b-bit scalar quantizers on samples x (per tensor):

    * 'absmax':   the core's symmetric int grid scaled to max|x| (no clipping);
    * 'mse_rule': the core's 'mse' rule (clip/max searched in [0.01, 1]); its chosen ratio in 'p_mse_rule';
    * 'best_clip': the least MSE over clip values log-spaced from max|x|/1000 to max|x|, refined on a
      fine linear grid around the best (the MSE-optimal uniform quantizer); the clip value in 'clip_at';
    * 'lloyd':    Lloyd's 2^b-level non-uniform quantizer fitted to x (None above 6 bits: slow to converge).
    """
    xf = x.float()
    peak = float(xf.abs().max())
    qmax = 2 ** (bits - 1) - 1
    out = {"bits": bits, "absmax": _mse(xf, quantize(xf, f"int{bits}-tensor-sym-absmax").dequantize())}
    qt = quantize(xf, f"int{bits}-tensor-sym-mse")
    out["mse_rule"] = _mse(xf, qt.dequantize())
    out["p_mse_rule"] = float(qt.scales()) * qmax / peak
    clips = torch.logspace(math.log10(peak / 1000), math.log10(peak), n_clips, dtype=torch.float64)
    i = int(clip_sweep(xf, bits, clips).argmin())  # coarse log grid, then a fine linear grid around it
    fine = torch.linspace(float(clips[max(i - 1, 0)]), float(clips[min(i + 1, n_clips - 1)]), 21, dtype=torch.float64)
    sweep = clip_sweep(xf, bits, fine)
    out["best_clip"], out["clip_at"] = float(sweep.min()), float(fine[sweep.argmin()])
    out["lloyd"] = lloyd_1d(x, 2**bits, iters=lloyd_iters)["mse"] if bits <= 6 else None
    return out


# ---- everyone against the bound (notebook 03, section 5) ------------------------------------------
def rate_distortion_points(x: torch.Tensor, lloyd_mse: dict | None = None, bits=range(1, 9),
                           steps=(1.0, 0.5, 0.25, 0.1, 0.05, 0.02)) -> list[dict]:
    """(quantizer, bits, mse) rows for samples x of a Gaussian: the core's int grid per tensor with absmax and
    with its 'mse' clipping rule (2..8 bits), Lloyd–Max (``lloyd_mse``: bits -> MSE at unit variance, scaled
    by the sample variance), NF4 in blocks of 64 counted with and without its scales, and a uniform grid of
    each step in ``steps`` followed by an ideal entropy coder (rate = the codes' empirical entropy)."""
    var, xf = float(x.var()), x.float()
    rows = []
    for b in bits:
        if b >= 2:
            rows.append(dict(quantizer="int absmax (per tensor)", bits=b, mse=_mse(xf, fake_quant(xf, f"int{b}-tensor"))))
            rows.append(dict(quantizer="int mse-clip (core 'mse')", bits=b,
                             mse=_mse(xf, fake_quant(xf, f"int{b}-tensor-sym-mse"))))
        if lloyd_mse and b in lloyd_mse:
            rows.append(dict(quantizer="Lloyd-Max", bits=b, mse=lloyd_mse[b] * var))
    qt = quantize(xf, "nf4-b64")
    nf4 = _mse(xf, qt.dequantize())
    rows += [dict(quantizer="NF4 b64, code bits", bits=4, mse=nf4),
             dict(quantizer="NF4 b64, incl. scales", bits=qt.bits_per_weight, mse=nf4)]
    for step in steps:  # uniform step, no clipping, entropy-coded
        codes = torch.round(x / step)
        rows.append(dict(quantizer="uniform + entropy coding", bits=entropy_bits(codes), mse=_mse(x, codes * step)))
    return rows
