"""Perplexity, KL divergence and top-1 agreement over non-overlapping token windows.

Protocol (GPTQ-style, as used for every number qlab reports): each window of ``L`` tokens
is one independent forward pass with no BOS token; every position but the last predicts the
next token, so a window scores ``L - 1`` tokens and

    PPL = exp( (1 / N) * sum_t -log p(x_t | x_<t) )          over all N scored tokens.

Quantized-vs-reference comparison (like llama.cpp ``perplexity --kl-divergence``): on the same
scored positions, with P the reference model's next-token distribution and Q the quantized one,

    KL(P || Q) = sum_v P(v) * (log P(v) - log Q(v))          per position,

reported as mean / median / 99th percentile over positions, and top-1 agreement = fraction of
positions where argmax P == argmax Q. The reference log-probabilities are computed once
(:func:`reference_logprobs`) and cached, in float16 by default to halve memory (40 windows of
512 tokens x 49,152 vocabulary = 2 GB); Q is rounded to the same dtype before the difference,
so an unchanged model gives KL exactly 0 and 100 % agreement.

``autocast="bf16"`` runs the forward passes under ``torch.autocast`` in bfloat16 (matmuls in bf16, softmax and
norms in float32; the scoring above stays float32), an option for sweeps on CPUs with bf16 matrix units: on this
project's 2-core Xeon (AMX) 1.84x less CPU per window at +0.035% perplexity at one thread, 1.59x at two
(8 windows; ``python -m qlab.eval --part evaluation --n-windows 8 --autocast bf16``). Every number qlab reports is float32, the default.

Nothing is reported that is not a number: windows must hold at least one window of at least 2 token ids
inside the model's vocabulary, and logits holding NaN or inf (a damaged weight, an overflowing quantized
layer) raise a ValueError instead of a perplexity of nan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Reference:
    """Cached next-token log-probabilities of the reference model on ``windows``."""

    windows: torch.Tensor  # [n, L] token ids
    logprobs: torch.Tensor  # [n, L-1, V] log P, stored in a compact dtype
    top1: torch.Tensor  # [n, L-1] argmax of the float32 reference logits
    nll: torch.Tensor  # [n, L-1] -log P(next token), float32

    @property
    def perplexity(self) -> float:
        return float(torch.exp(self.nll.mean()))


def _vocab_size(model) -> int | None:
    """Rows of the model's input embedding (the ids it can look up), when it says."""
    get = getattr(model, "get_input_embeddings", None)
    n = getattr(get(), "num_embeddings", None) if callable(get) else None
    return n if n is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def _check_ids(windows: torch.Tensor, vocab: int, offset: int = 0) -> None:
    bad = (windows < 0) | (windows >= vocab)
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"windows hold token id {int(windows[i, j])} (window {offset + i}, position {j}) outside the "
                         f"model's vocabulary [0, {vocab}): tokenize the text with the model's own tokenizer")


def _check_windows(model, windows) -> None:
    """Windows the protocol can score: [n >= 1, L >= 2] integer ids inside the vocabulary."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be [n_windows, seq_len], got shape {shape}")
    n, length = windows.shape
    if n == 0:
        raise ValueError(f"windows hold no window (shape {tuple(windows.shape)}): pass at least one, "
                         f"e.g. wikitext2_windows(tokenizer, n_windows=8)")
    if length < 2:
        raise ValueError(f"windows of {length} token score nothing: a window of L tokens scores its L - 1 "
                         f"next-token predictions, so use seq_len >= 2 (got shape {tuple(windows.shape)})")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}: pass the tokenizer's ids "
                         f"(torch.long)")
    vocab = _vocab_size(model)
    if vocab is not None:
        _check_ids(windows, vocab)


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield start, windows[start : start + batch_size]


# positions scored per pass: a [32, V] slice of float32 logits (6 MB at V = 49,152) and its few temporaries stay in
# cache, where whole-window temporaries (100 MB each at 511 positions) cost a trip to memory and fresh pages per op
CHUNK = 32


def _check_finite(logits: torch.Tensor, window: int) -> None:
    if not torch.isfinite(logits).all():
        raise ValueError(f"the model's logits hold NaN or inf (window {window}): no perplexity is reported. A weight "
                         f"may be non-finite (a damaged checkpoint or cache: load_model checks them) or a quantized "
                         f"layer overflowed; check the model with torch.isfinite on its parameters")


def _scored(logits: torch.Tensor, batch: torch.Tensor, start: int):
    """Walk one batch's logits ``[b, L-1, V]`` in chunks of positions: yields ``(i, slice, logits chunk,
    log-softmax chunk, nll chunk)`` for window ``i`` of the batch, after checking the ids and that the chunk is
    finite. Every operation is per position, so the chunks give the whole-window numbers bit for bit."""
    _check_ids(batch, logits.shape[-1], start)  # ids as wide as the logits (models that do not say their vocabulary)
    for i in range(logits.shape[0]):
        for s in range(0, logits.shape[1], CHUNK):
            part = slice(s, s + CHUNK)
            x = logits[i, part]
            _check_finite(x, start + i)
            lq = F.log_softmax(x, dim=-1)
            nll = -lq.gather(-1, batch[i, 1:][part, None]).squeeze(-1)
            yield i, part, x, lq, nll


AUTOCAST = {None: None, "bf16": torch.bfloat16}  # the forward passes' autocast dtype (None: none, float32)


def _autocast(autocast) -> torch.dtype | None:
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {list(AUTOCAST)}, got {autocast!r}")
    return AUTOCAST[autocast]


@torch.no_grad()
def _next_token_logits(model, batch: torch.Tensor, autocast: str | None = None) -> torch.Tensor:
    """float32 logits ``[b, L-1, V]`` at the positions that predict tokens 1..L-1 (forward under torch.autocast
    when ``autocast`` names a dtype)."""
    device = next(model.parameters()).device
    dtype = _autocast(autocast)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=batch.to(device), use_cache=False).logits
    return logits[:, :-1].float().cpu()


@torch.no_grad()
def reference_logprobs(
    model, windows: torch.Tensor, batch_size: int = 1, dtype=torch.float16, progress: bool = True,
    autocast: str | None = None,
) -> Reference:
    """Run the reference model once and cache what the comparison needs (``autocast``: as in :func:`evaluate`)."""
    _check_windows(model, windows)
    _autocast(autocast)
    n, length = windows.shape
    logprobs, top1, nll = None, torch.empty(n, length - 1, dtype=torch.long), torch.empty(n, length - 1)
    for start, batch in _batches(windows, batch_size, "reference", progress):
        logits = _next_token_logits(model, batch, autocast)
        if logprobs is None:  # [n, L-1, V]: the vocabulary is the logits' width
            logprobs = torch.empty(n, length - 1, logits.shape[-1], dtype=dtype)
        for i, part, x, lp, nll_part in _scored(logits, batch, start):
            nll[start + i, part] = nll_part
            top1[start + i, part] = x.argmax(-1)
            logprobs[start + i, part] = lp
    return Reference(windows, logprobs, top1, nll)


@torch.no_grad()
def evaluate(
    model,
    windows: torch.Tensor,
    reference: Reference | None = None,
    batch_size: int = 1,
    progress: bool = True,
    autocast: str | None = None,
) -> dict:
    """Perplexity of ``model`` on ``windows`` and, given a reference, KL and top-1 agreement.
    ``autocast="bf16"``: forward passes under torch.autocast in bfloat16 (module docstring); None: float32.

    Returns a dict with ``ppl``, ``nll``, ``n_windows``, ``seq_len``, ``n_tokens``, ``seconds``,
    ``s_per_window`` and, with a reference, ``ppl_ref``, ``kl_mean``, ``kl_median``, ``kl_p99``,
    ``top1`` (fraction in [0, 1]) and ``delta_ppl_pct`` (100 * (ppl / ppl_ref - 1)).
    """
    _check_windows(model, windows)
    _autocast(autocast)
    if reference is not None and not torch.equal(reference.windows, windows):
        raise ValueError("reference was computed on different windows")
    t0 = time.perf_counter()
    n, length = windows.shape
    nll, kl, agree = torch.empty(n, length - 1), torch.empty(n, length - 1), torch.empty(n, length - 1, dtype=torch.bool)
    for start, batch in _batches(windows, batch_size, "evaluate", progress):
        logits = _next_token_logits(model, batch, autocast)
        for i, part, x, lq, nll_part in _scored(logits, batch, start):
            nll[start + i, part] = nll_part
            if reference is not None:
                lp = reference.logprobs[start + i, part]
                lq_stored = lq.to(lp.dtype).float()  # Q rounded as P is stored: an unchanged model gives KL 0
                lp = lp.float()
                kl[start + i, part] = (lp.exp() * (lp - lq_stored)).sum(-1)
                agree[start + i, part] = x.argmax(-1) == reference.top1[start + i, part]
    seconds = time.perf_counter() - t0
    if not torch.isfinite(nll.mean()) or not math.isfinite(float(torch.exp(nll.mean()))):
        raise ValueError(f"the mean NLL {float(nll.mean()):.4g} nats gives no finite perplexity: the model's "
                         f"predictions are degenerate (check its weights and logits)")
    out = {
        "ppl": float(torch.exp(nll.mean())),
        "nll": float(nll.mean()),
        "window_nll": nll.mean(dim=1).tolist(),  # per window, for paired comparisons (paired_ppl_ratio)
        "n_windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "n_tokens": nll.numel(),
        "seconds": seconds,
        "s_per_window": seconds / windows.shape[0],
    }
    if reference is not None:
        kl = kl.flatten()
        out.update(
            ppl_ref=reference.perplexity,
            delta_ppl_pct=100 * (out["ppl"] / reference.perplexity - 1),
            kl_mean=float(kl.mean()),
            kl_median=float(kl.median()),
            kl_p99=float(torch.quantile(kl, 0.99)),
            top1=float(agree.float().mean()),
        )
    return out


def paired_ppl_ratio(window_nll_a, window_nll_b) -> dict:
    """Perplexity of model A over model B on the same windows, with a 95% interval from the spread of the
    per-window differences (a paired comparison: both models see the same text, so the text's own
    difficulty cancels). With d_i = mean NLL of A minus that of B on window i (equal-length windows):

        ratio = exp(mean d),   95% interval = exp(mean d -+ 1.96 sd(d) / sqrt(n))

    ``a_better`` counts the windows where A has the lower NLL. An interval containing 1 means the
    windows cannot tell the two apart."""
    a = torch.as_tensor(window_nll_a, dtype=torch.float64)
    b = torch.as_tensor(window_nll_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"need two equal-length lists of per-window NLLs (at least 2), got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a - b
    half = 1.96 * float(d.std()) / len(d) ** 0.5
    mean = float(d.mean())
    return {"ratio": math.exp(mean), "ci95": (math.exp(mean - half), math.exp(mean + half)),
            "a_better": int((d < 0).sum()), "n_windows": len(d)}


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """Just the perplexity (see the module docstring for the protocol)."""
    return evaluate(model, windows, batch_size=batch_size, progress=progress)["ppl"]


def main(argv=None):
    """``python -m qlab.eval``: perplexity of a model on WikiText-2 test (the README's reference number)."""
    import argparse
    import json

    from qlab.models.data import wikitext2_windows
    from qlab.models import EMBEDDED, load_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--part", default="all", choices=["all", "evaluation", "calibration"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-windows", type=int, default=None, help="default: every window")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--autocast", choices=["bf16"], default=None,
                   help="also score under bf16 autocast, and print both runs and their perplexity and CPU-time ratios")
    args = p.parse_args(argv)
    model, tokenizer = load_model(args.model)
    windows = wikitext2_windows(tokenizer, args.part, args.seq_len, args.n_windows)
    runs = {}
    for autocast in [None] + ([args.autocast] if args.autocast else []):
        cpu = time.process_time()
        out = evaluate(model, windows, batch_size=args.batch_size, autocast=autocast)
        runs[autocast or "fp32"] = {**out, "cpu_s_per_window": (time.process_time() - cpu) / len(windows)}
        print(json.dumps({"model": args.model, "part": args.part, "autocast": autocast,
                          **{k: v for k, v in runs[autocast or "fp32"].items() if k != "window_nll"}}, indent=1))
    if args.autocast:
        a, f = runs[args.autocast], runs["fp32"]
        print(f"{args.autocast} autocast: perplexity {a['ppl']:.4f} vs {f['ppl']:.4f} ({100 * (a['ppl'] / f['ppl'] - 1):+.3f}%), "
              f"CPU per window {a['cpu_s_per_window']:.3f} vs {f['cpu_s_per_window']:.3f} s "
              f"({f['cpu_s_per_window'] / a['cpu_s_per_window']:.2f}x less)")

