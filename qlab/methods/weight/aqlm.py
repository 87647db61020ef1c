"""AQLM (Egiazarian et al. 2024, "Extreme Compression of LLMs via Additive Quantization").

A weight W [out, in] is cut into groups of d = 8 consecutive input weights. Each group is the sum of one
vector from each of M learned codebooks C_m [2^B, d], times a scale per output row (paper sec. 3):

    W_hat[o, g*d:(g+1)*d] = scale[o] * sum_m C_m[codes[m, o, g]]

Formats are named ``MxB``: ``2x8`` (two codebooks of 256 vectors, 16 bits per 8 weights), ``1x8`` and
``1x16`` (one codebook of 65,536 vectors). The objective is the layer's output error on calibration
inputs X, written through H = (2/N) X^T X:

    L(W_hat) = tr( (W - W_hat) H (W - W_hat)^T )                                   (paper sec. 3, up to the factor N/2)

Algorithm (paper sec. 3.1-3.2, reference ``src/aq.py``): scales start at each row's L2 norm; codebooks and
codes start with residual k-means on the groups of W / scale (fit C_1, subtract it, fit C_2 on what is
left, ...). Then rounds alternate (a) Adam on the codebooks and scales with the codes fixed and (b) a beam
search over codes with codebooks and scales fixed. The beam search visits the groups left to right and,
inside a group, the codebooks in order; at each step every candidate code of every beam is scored exactly
with the change in L, and the best ``beam_size`` partial solutions per row are kept. Rows are independent
(H couples only the columns), so all rows search at once. Codebooks and scales are stored at fp16; the last
beam search runs on the fp16-rounded values, so the codes are the ones that fit what is stored.

Bits per weight count everything stored (``aqlm_bits_per_weight``): M*B bits per group of d weights, the
codebooks at 16 bits per entry and one fp16 scale per row. Over SmolLM2-135M's block Linears 2x8 costs 2.153
bits per weight (2.08 on down_proj to 2.62 on the 192-row k/v_proj), 1x8 1.088, and 1x16 18.62, because every
Linear carries its own 1 MiB codebook (65,536 x 8 x 2 bytes) against 0.33 to 0.88 M weights.

Public API (also what notebook 11 uses):

* ``AQLMConfig`` (frozen): M, B, d and the search settings; ``AQLMConfig.parse("aqlm-2x8")``.
* ``aqlm_quantize(W, H, config) -> CodebookTensor`` (the core's vector-quantized tensor, kind "codebook").
* ``aqlm_bits_per_weight(out, in, config)``: the size count, by hand.
* ``to_aqlm_layout(t)``: codes/codebooks/scales in the ``aqlm`` package's ``QuantizedLinear`` layout.
* ``residual_kmeans``, ``beam_search``, ``proxy_loss``: the steps, for teaching and tests.

Worked example (M=2, d=2, scale 2): C_1 = [[1, 0], [0, 1]], C_2 = [[.5, .5], [0, 0]], codes (1, 0) ->
2 * ([0, 1] + [.5, .5]) = [1, 3].
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlab.core.atomic import atomic_path
from qlab.core.quant import validate
from qlab.core.tensor import CodebookTensor
from qlab.methods.base import QuantResult
from qlab.methods.weight.gptq import HessianAccumulator

FORMATS = ("1x8", "2x8", "1x16")  # the formats the paper and the aqlm package's kernels name; any MxB parses


@dataclass(frozen=True)
class AQLMConfig:
    """num_codebooks M, nbits B (2^B vectors each), group_size d (input weights per group), and the search:
    ``rounds`` of (Adam on codebooks and scales for ``adam_steps`` at ``lr``, then one beam search of width
    ``beam_size``), after ``kmeans_iters`` Lloyd iterations per codebook; ``seed`` seeds k-means."""

    num_codebooks: int = 2
    nbits: int = 8
    group_size: int = 8
    beam_size: int = 8
    rounds: int = 2
    adam_steps: int = 25
    lr: float = 1e-3
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("num_codebooks", "nbits", "group_size", "beam_size", "rounds", "kmeans_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AQLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.nbits > 16:
            raise ValueError(f"AQLMConfig.nbits={self.nbits}: codebooks of more than 2^16 vectors are not supported")
        if self.adam_steps < 0 or not self.lr > 0:
            raise ValueError(f"AQLMConfig needs adam_steps >= 0 and lr > 0, got {self.adam_steps} and {self.lr}")

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits}"

    @classmethod
    def parse(cls, spec, **options) -> "AQLMConfig":
        """'aqlm-2x8', '2x8', '1x16' (M codebooks x B bits) -> a config; options override the search settings."""
        m = re.fullmatch(r"(?:aqlm-)?(\d+)x(\d+)", str(spec).strip().lower())
        if not m:
            raise ValueError(f"an AQLM spec is 'MxB' or 'aqlm-MxB' (M codebooks of 2^B vectors over groups of 8 "
                             f"input weights), e.g. {', '.join(FORMATS)}; got {spec!r}")
        return cls(num_codebooks=int(m[1]), nbits=int(m[2]), **options)


def aqlm_bits_per_weight(out_features: int, in_features: int, config: AQLMConfig) -> float:
    """(codes + codebooks + scales) bits / weights: M*B per d weights, M * 2^B * d * 16, 16 per row.

    Example: 2x8 on 576 x 576: codes 2 bits/weight, codebooks 2*256*8*16 = 65,536 bits = 0.198, scales
    576*16 = 0.028 -> 2.226. 1x16 on 576 x 576: 2^16*8*16 = 8,388,608 bits (1 MiB) alone is 25.3 bits per weight.
    """
    M, B, d = config.num_codebooks, config.nbits, config.group_size
    n = out_features * in_features
    return (n // d * M * B + M * (1 << B) * d * 16 + out_features * 16) / n


# ---------------------------------------------------------------- the objective


def proxy_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) in float64. Example: W - W_hat = [[1, 1]], H = I -> 2."""
    E = (W - W_hat).double()
    return float(((E @ H.double()) * E).sum())


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale[o] * sum_m C_m[codes[m, o, g]]: codes [M, out, G], codebooks [M, K, d], scale [out] -> [out, G*d]."""
    M, out, G = codes.shape
    parts = sum(codebooks[m][codes[m]] for m in range(M))  # [out, G, d]
    return parts.reshape(out, -1) * scale[:, None]


# ---------------------------------------------------------------- initialisation: residual k-means


CHUNK = 1 << 24  # elements of a [points, candidates] score matrix computed at once (64 MiB of float32)


def nearest(Z: torch.Tensor, C: torch.Tensor):
    """(||z - c||^2 - ||z||^2, index) of the nearest centroid c to each row z of Z, in chunks of rows (a 2^16-vector
    codebook would otherwise need a [points, 65536] matrix at once)."""
    cc = (C * C).sum(1)
    step = max(1, CHUNK // C.shape[0])
    parts = [torch.addmm(cc, z, C.T, alpha=-2).min(1) for z in Z.split(step)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def kmeans(Z: torch.Tensor, K: int, iters: int, generator: torch.Generator):
    """Lloyd's k-means of the rows of Z [N, d] into K centroids, seeded: K distinct rows picked at random start.

    Returns (centroids [K, d], assignment [N], mean squared error after each iteration). Each iteration
    cannot raise the error (assign to the nearest centroid, then move each centroid to its cluster's mean;
    an empty cluster keeps its centroid)."""
    N = Z.shape[0]
    C = Z[torch.randperm(N, generator=generator)[:K]].clone()
    if N < K:  # fewer points than centroids: the rest start as copies of random points
        C = torch.cat([C, Z[torch.randint(N, (K - N,), generator=generator)]])
    zz = (Z * Z).sum(1)
    history = []
    for it in range(iters + 1):
        dist, assign = nearest(Z, C)
        if it:
            history.append(float((dist + zz).mean()))  # the error of the centroids of the last update
        if it == iters:
            return C, assign, history
        sums = torch.zeros_like(C).index_add_(0, assign, Z)
        counts = torch.bincount(assign, minlength=K).to(Z.dtype)
        C = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], C)


def residual_kmeans(Z: torch.Tensor, config: AQLMConfig):
    """Codebooks for the groups Z [out, G, d] (the weight divided by its row scales), one after another:
    C_1 by k-means on Z, C_2 on Z - C_1[codes_1], ... (the reference's ``init_aq_kmeans``).

    Returns (codes [M, out, G], codebooks [M, K, d], history: per codebook, the k-means errors per iteration)."""
    out, G, d = Z.shape
    gen = torch.Generator().manual_seed(config.seed)
    residual = Z.reshape(-1, d).clone()
    codes, books, history = [], [], []
    for _ in range(config.num_codebooks):
        C, assign, h = kmeans(residual, config.codebook_size, config.kmeans_iters, gen)
        residual -= C[assign]
        codes.append(assign.reshape(out, G))
        books.append(C)
        history.append(h)
    return torch.stack(codes), torch.stack(books), history


# ---------------------------------------------------------------- codes: beam search through H


@torch.no_grad()
def beam_search(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scale: torch.Tensor, beam_size: int = 8) -> torch.Tensor:
    """New codes [M, out, G] that lower tr((W - W_hat) H (W - W_hat)^T), starting from ``codes``.

    Changing code (g, m) of row o from ``old`` to c moves W_hat[o, group g] by D = s_o (C_m[c] - C_m[old]);
    with E = W - W_hat the row's loss changes exactly by  -2 D . (E H)_g + D^T H_gg D,  so all 2^B candidates
    of every beam are scored with two small matmuls. Per row, the ``beam_size`` best (beam, candidate) pairs
    survive each step; E H is carried per beam and updated by a rank-d correction. The search never
    returns codes worse than the ones it started from (they are in the first beam, and a step can keep them).
    """
    M, K, d = codebooks.shape
    out, n = W.shape
    if tuple(codes.shape) != (M, out, n // d) or n % d:
        raise ValueError(f"codes must be [M={M}, out={out}, in/d={n // d}] for a weight {tuple(W.shape)} and codebooks "
                         f"{tuple(codebooks.shape)}, got {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.min() < 0 or codes.max() >= K:
        raise ValueError(f"codes must be integers in [0, {K}) (the codebooks have {K} vectors)")
    step = max(1, CHUNK // (beam_size * K))  # rows are independent: search them in blocks that fit in memory
    if out > step:
        return torch.cat([beam_search(W[i:i + step], H, codes[:, i:i + step], codebooks, scale[i:i + step], beam_size)
                          for i in range(0, out, step)], dim=1)
    G = n // d
    codes = codes.long()
    W, H, books, s = W.float(), H.float(), codebooks.float(), scale.float()
    E = W - reconstruct(codes, books, s)
    EH = (E @ H)[None]  # [b, out, n], b = 1 beam to start; E itself is never needed again
    loss = (EH[0] * E).sum(-1)[None]  # [b, out]
    beam_codes = codes.permute(1, 2, 0)[None].clone()  # [b, out, G, M]
    rows = torch.arange(out)
    for g in range(G):
        cols = slice(g * d, (g + 1) * d)
        Hgg, Hg = H[cols, cols], H[cols]  # [d, d], [d, n]
        for m in range(M):
            C = books[m]  # [K, d]
            old = C[beam_codes[..., g, m]]  # [b, out, d]
            CH = C @ Hgg  # [K, d]
            oH = old @ Hgg
            lin = EH[..., cols] @ C.T - (EH[..., cols] * old).sum(-1, keepdim=True)  # (E H)_g . (C_c - old)
            quad = (CH * C).sum(1) - 2 * oH @ C.T + (oH * old).sum(-1, keepdim=True)  # (C_c - old) H_gg (C_c - old)
            cand = loss[..., None] - 2 * s[:, None] * lin + (s * s)[:, None] * quad  # [b, out, K]
            b = cand.shape[0]
            best, idx = cand.permute(1, 0, 2).reshape(out, b * K).topk(min(beam_size, b * K), dim=1, largest=False)
            parent, new = (idx // K).T, (idx % K).T  # [b', out]
            EH = EH[parent, rows]  # re-arrange the beams
            beam_codes = beam_codes[parent, rows]
            D = s[:, None] * (C[new] - old[parent, rows])  # [b', out, d]
            EH -= D @ Hg  # E loses D on the group's columns
            beam_codes[..., g, m] = new
            loss = best.T
    return beam_codes[0].permute(2, 0, 1).contiguous()  # topk sorts ascending: beam 0 is each row's best


# ---------------------------------------------------------------- codebooks and scales: Adam


def adam_update(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scale: torch.Tensor, steps: int, lr: float):
    """Adam on (codebooks, scale) with the codes fixed, minimising tr((W - W_hat) H (W - W_hat)^T).

    Returns the best (codebooks, scale) seen, never worse than the inputs."""
    if steps == 0:
        return codebooks, scale
    with torch.enable_grad():  # the model walker quantizes under no_grad
        return _adam(W.float(), H.float(), codes, codebooks, scale, steps, lr)


def _adam(W, H, codes, codebooks, scale, steps, lr):
    books = codebooks.float().clone().requires_grad_(True)
    s = scale.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([books, s], lr=lr)
    best = (float("inf"), codebooks, scale)
    for step in range(steps + 1):
        W_hat = reconstruct(codes, books, s)
        with torch.no_grad():
            EH = (W - W_hat) @ H
            loss = float((EH * (W - W_hat)).sum())
        if loss < best[0]:
            best = (loss, books.detach().clone(), s.detach().clone())
        if step == steps:
            break
        opt.zero_grad()
        W_hat.backward(-2 * EH)  # dL/dW_hat = -2 (W - W_hat) H: one n x n matmul per step instead of three
        opt.step()
    return best[1], best[2]


# ---------------------------------------------------------------- the whole method


def _check(W: torch.Tensor, H: torch.Tensor, config: AQLMConfig):
    validate(W, "weight")
    validate(H, "Hessian")
    if W.dim() != 2:
        raise ValueError(f"AQLM quantizes a 2-d weight [out, in], got shape {tuple(W.shape)}")
    out, n = W.shape
    if n % config.group_size:
        raise ValueError(f"the input width {n} is not a multiple of the group size {config.group_size}: AQLM codes "
                         f"groups of {config.group_size} consecutive input weights")
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight with {n} input columns, got {tuple(H.shape)}")


def aqlm_quantize(W: torch.Tensor, H: torch.Tensor, config: AQLMConfig = AQLMConfig(), *,
                  history: list | None = None) -> CodebookTensor:
    """AQLM of a weight W [out, in] with proxy Hessian H [in, in] -> a CodebookTensor (codebooks and scale fp16).

    ``history``, if a list, receives the proxy loss after k-means and after each Adam step group and beam search
    (dicts with 'stage' and 'loss'), for plots and tests."""
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    _check(W, H, config)
    out, n = W.shape
    d, G = config.group_size, n // config.group_size
    H32, W32 = H.float(), W.float()
    log = history if history is not None else []
    scale = W32.norm(dim=1) + 1e-9  # the reference's init: each row's L2 norm
    codes, books, _ = residual_kmeans((W32 / scale[:, None]).reshape(out, G, d), config)
    log.append({"stage": "kmeans", "loss": proxy_loss(W32, reconstruct(codes, books, scale), H32)})
    for r in range(config.rounds):
        books, scale = adam_update(W32, H32, codes, books, scale, config.adam_steps, config.lr)
        log.append({"stage": f"adam {r}", "loss": proxy_loss(W32, reconstruct(codes, books, scale), H32)})
        if r == config.rounds - 1:  # what is stored: the last search fits the codes to the fp16 values
            books, scale = books.half(), scale.half()
        codes = beam_search(W32, H32, codes, books, scale, config.beam_size)
        W_hat = reconstruct(codes, books.float(), scale.float())
        log.append({"stage": f"beam {r}", "loss": proxy_loss(W32, W_hat, H32)})
    return CodebookTensor((out, n), codes.to(torch.int32), books, scale, config.nbits, W.dtype)


# ---------------------------------------------------------------- the aqlm package's layout


def to_aqlm_layout(t: CodebookTensor) -> dict:
    """``aqlm.inference.QuantizedLinear``'s tensors for a CodebookTensor (out_group_size 1, in_group_size d):

    codes [out, in/d, M] as int8 (B <= 8) or int16 (B <= 16), values >= 2^(B-1) stored as v - 2^B (the package's
    ``pack_int_data``; ``unpack_int_data`` takes them back mod 2^B); codebooks [M, 2^B, 1, d]; scales [out, 1, 1, 1].
    Codebooks and scales stay float32 holding the fp16 values, so a float32 dequantization is exact."""
    if not isinstance(t, CodebookTensor):
        raise ValueError(f"to_aqlm_layout takes a CodebookTensor, got {type(t).__name__}")
    M, K, d = t.codebooks.shape
    if K != 1 << t.bits:
        raise ValueError(f"the aqlm layout needs 2^bits = {1 << t.bits} vectors per codebook, got {K}")
    if t.bits > 16:
        raise ValueError(f"the aqlm layout stores codes in int8/int16; {t.bits}-bit codes do not fit")
    codes = t.codes.long().permute(1, 2, 0)  # [out, G, M]
    codes = torch.where(codes >= K // 2, codes - K, codes).to(torch.int8 if t.bits <= 8 else torch.int16)
    scale = t.scale.float() if t.scale is not None else torch.ones(t.shape[0])
    return {"codes": codes.contiguous(), "codebooks": t.codebooks.float()[:, :, None, :].contiguous(),
            "scales": scale.reshape(-1, 1, 1, 1).contiguous(), "in_group_size": d, "out_group_size": 1,
            "num_codebooks": M, "nbits_per_codebook": t.bits}


# ---------------------------------------------------------------- the registry entry


def parse_aqlm_spec(spec) -> str:
    """'aqlm-2x8' or '2x8' -> '2x8' (checked by ``AQLMConfig.parse``)."""
    return AQLMConfig.parse(spec).name


def _cache_path(cache_dir, W, H, config) -> Path:
    h = hashlib.sha256()
    for x in (W.float().contiguous(), H.float().contiguous()):
        h.update(x.numpy().tobytes())
    h.update(repr(sorted(asdict(config).items())).encode())
    return Path(cache_dir) / f"aqlm-{config.name}-{h.hexdigest()[:16]}.pt"


def aqlm_method(weights, X, spec, names=None, *, beam_size: int = 8, rounds: int = 2, adam_steps: int = 25,
                lr: float = 1e-3, kmeans_iters: int = 20, seed: int = 0, cache_dir: str | None = None) -> QuantResult:
    """The registry's AQLM: H = (2/N) X^T X from the calibration batches, then ``aqlm_quantize`` per weight.

    ``cache_dir``: keep each quantized weight there (keyed by a hash of W, H and the config, written atomically),
    so a killed whole-model run resumes where it stopped."""
    config = AQLMConfig.parse(spec, beam_size=beam_size, rounds=rounds, adam_steps=adam_steps, lr=lr,
                              kmeans_iters=kmeans_iters, seed=seed)
    if not X:
        raise ValueError("AQLM needs calibration inputs X (a list of batches [..., in])")
    acc = HessianAccumulator(weights[0].shape[1])
    for x in X:
        acc.add(x)
    H = (acc.XtX * (2.0 / acc.n)).float()
    qweights = []
    for k, W in enumerate(tqdm(weights, desc=f"aqlm {config.name}", leave=False, disable=len(weights) < 2)):
        path = _cache_path(cache_dir, W, H, config) if cache_dir else None
        if path is not None and path.exists():
            qweights.append(CodebookTensor.from_state_dict(torch.load(path, weights_only=True)))
            continue
        q = aqlm_quantize(W, H, config)
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save(q.state_dict(), tmp)
        qweights.append(q)
    return QuantResult(qweights, info={"config": asdict(config)})
