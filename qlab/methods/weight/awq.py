"""AWQ, activation-aware weight quantization (Lin et al. 2024).

A few input channels carry much larger activations than the rest; their weights matter most for the
output. AWQ protects them without mixed precision: it scales those weight columns *up* by s > 1 before
rounding (and the activations down by s, folded into the previous op, see ``qlab.models.transforms``):

    Q(W diag(s)) diag(s)^-1 x        instead of        Q(W) x                              (eq. 4-5)

The rounding error of a scaled column shrinks by about 1/s relative to the weight, while the group's
scale barely moves as long as s is moderate. The scales come from activation statistics only:

    s = mean|x|^alpha,  normalised by sqrt(max(s) min(s)),  alpha in {0, 1/20, ..., 19/20}      (eq. 5)

alpha is chosen by grid search on the output error of all Linears that read the same input (alpha = 0
is plain round-to-nearest). The reference code (mit-han-lab/llm-awq, ``auto_scale``) measures that error
at the output of the whole module instead (self-attention for q/k/v, the MLP for gate/up), so that q and k
errors count through the softmax; qlab uses the Linears' own outputs, which needs no attention forward per
grid point on a CPU. The two coincide for v -> o_proj and up -> down_proj. Then a clipping search: for each output channel and group, the weight
range is shrunk to p * max|w| with p in {1, 0.95, ..., 0.55}, keeping the p that minimises that group's
contribution to the output error (AWQ's reference skips this for q/k projections; so can you).

``awq`` returns the quantized *scaled* weights: the model must hold ``x / s`` at their input, by
folding ``s`` into the previous op with ``qlab.models.transforms.fold_into_norm`` / ``fold_into_linear``.
"""
from dataclasses import dataclass
import math

import torch

from qlab.core.quant import fake_quant, quantize, validate
from qlab.core.spec import QuantSpec
from qlab.core.tensor import QuantizedTensor
from qlab.methods.base import QuantResult
from qlab.methods.weight.gptq import gram


CLIP_TOKENS = 512  # tokens of the clipping search's output error


def token_rows(X) -> list:
    """Calibration inputs X [..., in], or a list of batches of them, as a list of [tokens, in] matrices.
    (The batches stay apart: the searches read all tokens only for mean|x|, which goes a block of
    channels at a time, so copying them into one tensor would cost more than reading them.)"""
    return [x.reshape(-1, x.shape[-1]) for x in (X if isinstance(X, (list, tuple)) else [X])]


def mean_abs(X, block: int = 128) -> torch.Tensor:
    """AWQ's activation statistic: mean |x| per input channel over all tokens of X (see ``token_rows``).
    ``block`` channels at a time, so that |x| is a temporary the size of a cache, not of X (each channel's
    mean adds the same numbers in the same order either way)."""
    rows = token_rows(X)
    return torch.cat([torch.cat([r[:, i:i + block] for r in rows]).abs_().float().mean(dim=0)  # |x| in cat's copy
                      for i in range(0, rows[0].shape[1], block)])


def sample_tokens(X, n: int) -> torch.Tensor:
    """At most n evenly spaced tokens of X (see ``token_rows``), as float32 [n, in]."""
    rows = token_rows(X)
    total = sum(len(r) for r in rows)
    chosen = torch.linspace(0, total - 1, min(n, total)).long()  # indices into the tokens of all batches
    picked, start = [], 0
    for r in rows:
        mine = chosen[(chosen >= start) & (chosen < start + len(r))]
        picked.append(r[mine - start])
        start += len(r)
    return torch.cat(picked).float()


def awq_scales(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, clamped at 1e-4 and divided by sqrt(max s * min s) (so s straddles 1).

    Channels that never fired in calibration (mean|x| = 0) keep s = 1 and stay out of the normalisation: a
    tiny s would round their weights to zero, wrong the day they fire."""
    live = x_mean_abs > 0
    s = x_mean_abs.float().pow(alpha).clamp(min=1e-4)
    if not live.any():
        return torch.ones_like(s)
    s = s / (s[live].max() * s[live].min()).sqrt()
    return torch.where(live, s, torch.ones_like(s))


def group_size(spec: QuantSpec, in_features: int) -> int:
    """Input columns per scale of a [out, in_features] weight (AWQ needs scales per row or group of a row)."""
    shape = (1, in_features)
    if not spec.granularity.per_row(shape):
        raise ValueError(f"AWQ needs per-channel or per-group (along the input) weight scales, got {spec.granularity}")
    return spec.granularity.columns_per_scale(shape)


def _pads_freely(spec: QuantSpec) -> bool:
    """Do zero columns appended to a row leave the quantization of its real columns unchanged? For the
    min-max and absmax ranges yes (the range holds 0 anyway): fake_quant may then be given the rows already
    padded to whole groups, and neither pads nor crops a copy per call. (Not absmean's mean or a float
    minimum, which leave the padding out.)"""
    return spec.rule in ("minmax", "absmax") and not spec.float_min


def _pad_columns(A: torch.Tensor, g: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of g and split it into groups: [..., in] -> [..., G, g].
    (A row of 576 in groups of 128: four groups and a last one of 64 real columns plus 64 zeros.)"""
    pad = -A.shape[-1] % g
    return torch.nn.functional.pad(A, (0, pad)).reshape(*A.shape[:-1], -1, g)


def _lower_doubled(H: torch.Tensor) -> torch.Tensor:
    """Lw: H's lower triangle with the off-diagonal doubled (exact, x2). For a symmetric H,
    x H x^T = sum over k >= c of x_k Lw_kc x_c: each pair (k, c) once, from half of H."""
    return torch.tril(H, -1).mul_(2).add_(torch.diag_embed(torch.diagonal(H)))


def _quadratic_forms(dW: torch.Tensor, lower: torch.Tensor, ends: list, block: int = 128) -> list:
    """tr(dW_k H dW_k^T) for each block of rows dW_k = dW[ends[k]:ends[k+1]] (the Linears of a group stacked),
    from ``lower`` = _lower_doubled(H): each block of ``block`` columns meets Lw from its diagonal down, one
    matmul over all rows per block (about 55-60% of the multiply-adds of ``((dW @ H) * dW).sum()``)."""
    n = lower.shape[0]
    totals = [0.0] * (len(ends) - 1)
    for i in range(0, n, block):
        j = min(i + block, n)
        P = (dW[:, i:n] @ lower[i:, i:j]).mul_(dW[:, i:j])  # [rows, block]: dW_c sum_{k >= i} dW_k Lw_kc
        for k, (a, b) in enumerate(zip(ends, ends[1:])):
            totals[k] += float(P[a:b].sum())
    return totals



def search_scale(weights, X, spec, n_grid: int = 20, n_tokens: int = 4096):
    """Grid search of alpha. Returns (s, alpha, losses[n_grid]) with losses the mean squared output error
    of ``(x / s) Q(W diag(s))^T`` over all the Linears in ``weights`` (each [out_i, in]) that read X
    ([..., in] or a list of batches).
    mean|x| uses every token; the output error at most ``n_tokens`` evenly spaced ones (speed, on a CPU)."""
    spec = QuantSpec.parse(spec)
    x_mean = mean_abs(X)
    X = sample_tokens(X, n_tokens)
    n, in_features = X.shape
    # the output error needs X only through H = X^T X: one [in, in] product instead of a matmul per grid point
    lower = _lower_doubled(gram(X))
    # the Linears stacked (groups lie within rows: one fake_quant per grid point gives each its own values),
    # padded to whole groups once where the padding changes nothing (scale 1 on the padding)
    W = torch.cat([W.float() for W in weights])
    ends = torch.tensor([0] + [w.shape[0] for w in weights]).cumsum(0).tolist()
    g = group_size(spec, in_features)  # (raises for a per-tensor spec, whose one scale stacking would share)
    pad = -in_features % g if _pads_freely(spec) else 0
    W = torch.nn.functional.pad(W, (0, pad))
    losses = torch.zeros(n_grid)
    for i in range(n_grid):
        s = torch.nn.functional.pad(awq_scales(x_mean, i / n_grid), (0, pad), value=1.0)
        # the error of the effective weight Q(W s) / s, computed in place in the fake-quantized copy
        E = fake_quant(W * s, spec).div_(s).sub_(W)
        forms = _quadratic_forms(E, lower, ends)  # (E's padding columns are left out: lower is [in, in])
        losses[i] = sum(f / (n * (b - a)) for f, a, b in zip(forms, ends, ends[1:])) / len(weights)
    best = int(torch.argmin(losses))
    return awq_scales(x_mean, best / n_grid), best / n_grid, losses


def search_clip(W: torch.Tensor, X: torch.Tensor, spec, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """Per output channel and group, the clipping range max_val = p * max|w_group| minimising
    mean_t ( x_t,g . (w_g - Q(clamp(w_g, -max_val, max_val))) )^2 over (at most ``n_tokens``) tokens.
    Returns max_val [out, n_groups]."""
    spec = QuantSpec.parse(spec)
    out_features, in_features = W.shape
    g = group_size(spec, in_features)
    X = sample_tokens(X, n_tokens)
    Xg = _pad_columns(X, g).transpose(0, 1)  # [G, n, g]
    H = Xg.transpose(1, 2) @ Xg  # [G, g, g]: each group's X_g^T X_g, so the error needs no token matmul
    Wg = _pad_columns(W.float(), g)  # [out, G, g]
    org_max = Wg.abs().amax(dim=-1)  # [out, G]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    padded = _pads_freely(spec)
    Wg_t = Wg.transpose(0, 1).contiguous()  # the groups first, for the batched matmul
    dW = torch.empty_like(Wg_t)
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = _clip_groups(Wg, max_val)
        # (on the padding, H's zero rows and columns make dW's values there irrelevant)
        Wq = fake_quant(clipped, spec) if padded else _pad_columns(fake_quant(clipped[:, :in_features], spec), g)
        dW = torch.sub(Wq.reshape(Wg.shape).transpose(0, 1), Wg_t, out=dW)  # [G, out, g], contiguous
        err = (dW @ H).mul_(dW).sum(dim=-1).T / X.shape[0]  # mean_t (x_t,g . dw_g)^2 = dw_g H_g dw_g^T / n: [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def apply_clip(W: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """Clamp each group of ``group_size`` columns of W [out, in] to [-max_val, max_val]
    (max_val [out, n_groups]; the last group may be shorter)."""
    g = group_size
    if max_val.shape != (W.shape[0], math.ceil(W.shape[1] / g)):
        raise ValueError(f"max_val must be [{W.shape[0]}, {math.ceil(W.shape[1] / g)}], got {tuple(max_val.shape)}")
    return _clip_groups(_pad_columns(W, g), max_val)[:, : W.shape[1]]


def _clip_groups(Wg: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """Groups Wg [out, G, g] clamped to [-max_val, max_val] (max_val [out, G]), back as rows [out, G * g]."""
    clipped = torch.clamp(Wg, -max_val[..., None], max_val[..., None])  # one pass (max_val >= 0)
    return clipped.reshape(Wg.shape[0], -1)


@dataclass
class AWQResult:
    """s: the per-input-channel scales to fold into the previous op; alpha: the chosen exponent;
    losses: output error for each alpha on the grid; weights: clip(W diag(s)) for each Linear, in W's dtype;
    qweights: QuantizedTensor of each of them; max_val: the clipping ranges (None if the clip search was
    skipped)."""

    s: torch.Tensor
    alpha: float
    losses: torch.Tensor
    weights: list
    qweights: list
    max_val: list | None


def awq(weights, X, spec, *, n_grid: int = 20, clip=True) -> AWQResult:
    """AWQ for the Linears ``weights`` (tensors [out_i, in] or nn.Linears) that all read inputs X [..., in]
    (or a list of batches of them).
    ``clip``: run the clipping search (a bool, or one bool per weight: the reference skips q and k).

    >>> W = torch.randn(8, 64); X = torch.randn(256, 64) * torch.linspace(0.1, 4, 64)
    >>> r = awq([W], X, "int3-g32-asym-minmax"); r.qweights[0].shape, r.s.shape
    ((8, 64), torch.Size([64]))
    """
    spec = QuantSpec.parse(spec)
    single = isinstance(weights, (torch.Tensor, torch.nn.Linear))
    weights = [weights] if single else list(weights)
    weights = [w.weight.data if isinstance(w, torch.nn.Linear) else w for w in weights]
    rows = token_rows(X)
    for x in rows:
        validate(x, "calibration inputs")
    in_features = rows[0].shape[1]
    for W in weights:
        validate(W, "weight")
        if W.dim() != 2 or W.shape[1] != in_features:
            raise ValueError(f"weights must be [out, {in_features}] to read these inputs, got {tuple(W.shape)}")
        group_size(spec, W.shape[1])
    clips = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    if len(clips) != len(weights):
        raise ValueError(f"clip must be a bool or one bool per weight ({len(weights)}), got {clip!r}")
    s, alpha, losses = search_scale(weights, rows, spec, n_grid)
    scaled = [W.float() * s for W in weights]
    # the inputs the scaled weights will read, on the tokens the clipping search uses only
    Xs = sample_tokens(rows, CLIP_TOKENS) / s if any(clips) else None
    max_val = [search_clip(Ws, Xs, spec) if c else None for Ws, c in zip(scaled, clips)]
    g = group_size(spec, in_features)
    scaled = [(Ws if m is None else apply_clip(Ws, m, g)).to(W.dtype) for Ws, m, W in zip(scaled, max_val, weights)]
    max_val = None if not any(clips) else max_val
    qweights = [quantize(Ws, spec) for Ws in scaled]
    return AWQResult(s=s, alpha=alpha, losses=losses, weights=scaled, qweights=qweights, max_val=max_val)


def awq_method(weights, X, spec, names=None, *, n_grid: int = 20, clip="auto") -> QuantResult:
    """The registry's AWQ: scales searched and returned to fold into the previous op, weights clipped and
    quantized. ``clip='auto'`` skips the clipping search for q_proj and k_proj (by ``names``), as the reference."""
    if not X:
        raise ValueError("AWQ needs calibration inputs X")
    if clip == "auto":
        clip = [not (n or "").endswith(("q_proj", "k_proj")) for n in (names or [None] * len(weights))]
    r = awq(weights, X, spec, n_grid=n_grid, clip=clip)
    return QuantResult(r.qweights, fold=r.s, weights=r.weights, info={"alpha": r.alpha, "losses": r.losses})
