"""The KV cache, studied: what keys and values look like, what each cache format really holds, what fits.

* :func:`capture_kv`       keys and values of one layer after a forward pass (keys after RoPE, as the cache holds them)
* :func:`channel_outliers` how much the largest channel stands out, for keys and values
* :func:`grouping_error`   relative error of keys quantized per channel (KIVI) and per token, same bits
* :func:`measured_bytes`   bytes a :class:`~qlab.methods.kv.cache.QuantizedKVCache` holds after a prefill in chunks
* :func:`formula_bytes`    the closed form: ``qlab.study.memory``'s 2 x layers x KV heads x head_dim x context x bytes
  plus scales (its :class:`~qlab.study.memory.KVFormat`), and the per-token-key baseline
* :func:`what_fits`        model, context, batch, KV format, GPU memory -> the total, and the longest context and
  largest batch that fit
* :func:`size_claims`      the seeds' KV-cache sizes, recomputed with the formula
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import torch

from qlab.methods.kv.cache import FP8, GEAR, KIVI, QuantizedKVLayer
from qlab.study import memory
from qlab.study.memory import GiB, KVFormat, as_arch


@torch.no_grad()
def capture_kv(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [T, kv_heads * head_dim] of ``layer`` for ``ids`` [1, T] (keys after RoPE, as cached)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    n = len(cache.layers)
    if not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n}), got {layer}")
    k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [H, T, D]
    return k.permute(1, 0, 2).reshape(k.shape[1], -1), v.permute(1, 0, 2).reshape(v.shape[1], -1)


def channel_outliers(x: torch.Tensor) -> float:
    """max over channels of mean |x| per channel / median over channels: how far the top channel stands out."""
    per_channel = x.abs().mean(dim=0)
    return float(per_channel.max() / per_channel.median())


def grouping_error(keys: torch.Tensor, bits: int = 2, group_size: int = 32) -> dict:
    """Relative Frobenius error of keys [T, C] quantized by KIVI's grouping per channel (G tokens) and per token
    (G channels), both asymmetric min-max with ``bits`` bits and the same number of statistics per entry."""
    from qlab.methods.kv.kivi import dequantize_kv, quantize_kv

    t = keys.shape[0] // group_size * group_size
    x = keys[:t].float()
    out = {}
    for grouping, which in (("per channel", "key"), ("per token", "value")):
        err = x - dequantize_kv(quantize_kv(x, which, bits, group_size, backend="torch"))
        out[grouping] = float(err.norm() / x.norm())
    return out


def _layer_shape(arch) -> tuple[int, int, int]:
    arch = as_arch(arch)
    return arch.n_layers, arch.n_kv_heads, arch.head_dim


def measured_bytes(method, arch, context: int, chunk: int = 128, batch: int = 1, seed: int = 0) -> int:
    """Bytes a quantized cache of ``method`` holds after ``context`` tokens fed ``chunk`` at a time.

    Measured on one real cache layer fed seeded random keys and values of the model's shape, times the number of
    layers (every layer holds the same number of bytes for the same tokens; FP8's static scale is one per layer).
    """
    if not isinstance(context, int) or context < 1 or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"context and chunk must be ints >= 1, got context={context!r}, chunk={chunk!r}")
    n_layers, heads, dim = _layer_shape(arch)
    if isinstance(method, FP8) and method.granularity == "tensor":
        method = FP8("tensor", k_scale=1.0, v_scale=1.0, backend=method.backend)  # any static scale: same bytes
    layer = QuantizedKVLayer(method, heads, dim)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        layer.update(torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g))
    return n_layers * layer.nbytes()


def formula_bytes(method, arch, context: int, batch: int = 1, float_bytes: int = 4) -> int | None:
    """The closed-form bytes of ``method`` (``float_bytes`` for the float window: 4 as qlab runs, 2 deployed).

    FP8 and KIVI with per-channel keys are ``memory.KVFormat``'s; KIVI with per-token keys is its values' rule on
    both sides; float ('fp16' / 'fp32' / None) is 2 x L x H x D x T x bytes. GEAR's blocks depend on how the tokens
    arrived (each flush is one block with its own outliers and factors): None, measure it.
    """
    arch = as_arch(arch)
    if method is None or method in ("fp32", "fp16"):
        return memory.kv_cache_bytes(arch, context, batch, 2 if method == "fp16" else 4)
    if isinstance(method, FP8):
        return KVFormat(8, method.granularity).nbytes(arch, context, batch)
    if isinstance(method, KIVI):
        if method.keys == "channel":
            return KVFormat(method.bits, "kivi", method.group_size, method.residual).nbytes(arch, context, batch,
                                                                                           float_bytes)
        n = max(context - method.residual, 0)  # per-token keys: every token past the window, each side alike
        per_side = (n * arch.head_dim * method.bits // 8 + n * math.ceil(arch.head_dim / method.group_size) * 8
                    + (context - n) * arch.head_dim * float_bytes)
        return 2 * arch.n_layers * arch.n_kv_heads * batch * per_side
    if isinstance(method, GEAR):
        return None
    raise ValueError(f"method must be None, 'fp16', 'fp32' or an FP8 / KIVI / GEAR config, got {method!r}")


def memory_curve(methods: dict, arch, contexts, chunk: int = 128) -> pd.DataFrame:
    """Measured and formula bytes for each (method label, context): columns method, context, measured, formula."""
    rows = []
    for label, method in methods.items():
        for ctx in contexts:
            measured = (formula_bytes(method, arch, ctx) if method is None or isinstance(method, str)
                        else measured_bytes(method, arch, ctx, chunk))
            rows.append({"method": label, "context": ctx, "measured": measured,
                         "formula": formula_bytes(method, arch, ctx)})
    return pd.DataFrame(rows)


def plot_memory_curve(df: pd.DataFrame, ax=None, title: str = ""):
    """Cache MiB against context, one line per method (log-log), formula points marked where there is one."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]  # equal curves (KIVI-2 with per-channel or per-token keys) stay visible
    for k, (label, part) in enumerate(df.groupby("method", sort=False)):
        line, = ax.plot(part["context"], part["measured"] / 2**20, marker="osD^v"[k % 5], ms=5 if k % 2 else 7,
                        mfc="none" if k % 2 else None, ls=styles[k % 4], label=label)
        exact = part.dropna(subset=["formula"])
        ax.scatter(exact["context"], exact["formula"] / 2**20, marker="x", s=40, color=line.get_color(), zorder=3)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB)",
           title=title or "cache bytes held (o measured, x formula)")
    ax.set_xticks(sorted(df["context"].unique()))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_kv_heatmaps(keys: torch.Tensor, values: torch.Tensor, title: str = ""):
    """|K| and |V| [T, channels] as heatmaps: position down, channel across, one shared log colour scale each."""
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, name in zip(axes, (keys, values), ("|K| (after RoPE)", "|V|")):
        a = x.abs().float().numpy() + 1e-3
        im = ax.imshow(a, aspect="auto", cmap="magma", norm=LogNorm(vmin=1e-2, vmax=a.max()), interpolation="nearest")
        ax.set(title=f"{name}: top channel {channel_outliers(x):.1f}x the median", xlabel="channel (head x dim)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0].set_ylabel("position")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def what_fits(model: str, context: int, batch: int, kv, gpu_gib: float, weights=None) -> dict:
    """Total GiB of a deployment (``memory.deployment_bytes``: weights + KV cache + activations) and what fits in
    ``gpu_gib``: at this batch the longest context, at this context the largest batch (0 if none)."""
    arch = as_arch(model)

    def total(ctx, b):
        return memory.deployment_bytes(arch, weights, kv=kv, context=ctx, batch=b)["total"]

    def largest(f, hi):  # the largest n in [0, hi] with f(n) <= budget; f grows with n
        budget = gpu_gib * GiB
        if f(1) > budget:
            return 0
        lo = 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if f(mid) <= budget else (lo, mid - 1)
        return lo

    b = memory.deployment_bytes(arch, weights, kv=kv, context=context, batch=batch)
    return {"total_gib": b["total"] / GiB, "kv_gib": b["kv_cache"] / GiB, "fits": memory.fits(b, gpu_gib),
            "max_context": largest(lambda c: total(c, batch), 1 << 22),
            "max_batch": largest(lambda n: total(context, n), 1 << 16)}


# The seeds' KV-cache sizes: their ids in ``memory.SEED_FIGURES`` (which holds each claim and its number once),
# with the model preset and context the formula needs.
KV_SIZE_FIGURES = (("s000-kv-70b-128k", "Llama-2-70B", 131072), ("s001-kv-llama3-128k", "Llama-3-70B", 131072),
                   ("s003-kv-llama3-8b-8k", "Llama-3-8B", 8192))


def size_claims(figures=KV_SIZE_FIGURES, tolerance: float = 0.25) -> pd.DataFrame:
    """Each stated fp16 KV size next to the formula's (decimal GB, batch 1), and whether it is within
    ``tolerance`` (relative); ``batch_for_claim`` is the batch at which the formula would reach the claim."""
    rows = []
    for key, model, context in figures:
        _, what, stated, unit, _ = memory.SEED_FIGURES[key]
        if unit != "GB":
            raise ValueError(f"{key} is stated in {unit}; size_claims compares decimal GB")
        gb = memory.kv_cache_bytes(as_arch(model), context, 1, 2.0) / memory.GB
        rows.append({"claim": what, "model": model, "context": context, "stated_GB": stated, "formula_GB": gb,
                     "holds": abs(stated / gb - 1) <= tolerance, "batch_for_claim": stated / gb})
    return pd.DataFrame(rows)


@torch.no_grad()
def outlier_profile(model, ids: torch.Tensor, bits: int = 2, group_size: int = 32) -> pd.DataFrame:
    """Per layer: how far the top channel stands out in keys and in values (:func:`channel_outliers`), and the
    relative error of 2-bit keys grouped per channel and per token (:func:`grouping_error`)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True)
    rows = []
    for i, layer in enumerate(cache.layers):
        k, v = (x[0].permute(1, 0, 2).reshape(x.shape[2], -1) for x in (layer.keys, layer.values))
        err = grouping_error(k, bits, group_size)
        rows.append({"layer": i, "keys": channel_outliers(k), "values": channel_outliers(v),
                     "err_per_channel": err["per channel"], "err_per_token": err["per token"]})
    return pd.DataFrame(rows)


def plot_long_context(df: pd.DataFrame, context: int, metric: str = "kl", ax=None):
    """``metric`` against bits per entry (quantized part) for each method at ``context``: the long-context table
    as a picture; peers (transformers' cache) drawn as squares."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 5))
    part = df[(df.context == context) & (df.method != "float")].sort_values(metric, ascending=False)
    placed = []  # (x, log y) of right-hand labels drawn: a close neighbour's label goes below instead of above
    for r in part.itertuples():
        x, y = r.bits_quantized, getattr(r, metric)
        kind = "peer" if r.method.startswith("hf-") else ("gear" if r.method.startswith("gear") else "qlab")
        ax.scatter(x, y, marker="s" if kind == "peer" else "o", s=40,
                   color={"peer": "tab:orange", "gear": "tab:green", "qlab": "tab:blue"}[kind])
        if kind == "gear":  # GEAR's ablation: its part names, centred above each point
            ax.annotate(r.method.split("-", 1)[1], (x, y), xytext=(0, 6), textcoords="offset points", fontsize=8,
                        ha="center", color="darkgreen")
            continue
        near = sum(abs(x - px) < 0.6 and abs(math.log10(y) - py) < 0.12 for px, py in placed)
        ax.annotate(r.method, (x, y), xytext=(6, [2, -10, -22, 14][near % 4]), textcoords="offset points", fontsize=8)
        placed.append((x, math.log10(y)))
    ax.set_xlim(right=max(part.bits_quantized.max() + 1.2, ax.get_xlim()[1]))
    for color, marker, name in (("tab:blue", "o", "qlab"), ("tab:green", "o", "qlab GEAR-2 (Q, +L, +S)"),
                                ("tab:orange", "s", "transformers QuantizedCache")):
        ax.scatter([], [], color=color, marker=marker, label=name)
    ax.legend(fontsize=8, loc="upper right")
    ax.set(yscale="log", xlabel="bits per key/value entry (codes + scales + outliers + factors)",
           ylabel={"kl": "mean KL to the float model (nats)", "ppl": "perplexity"}.get(metric, metric),
           title=f"quantized KV caches at context {context}")
    ax.grid(alpha=0.3, which="both")
    return fig


def quality_claims(df: pd.DataFrame, context: int) -> pd.DataFrame:
    """The seeds' and the issue's quality claims, each checked on the long-context table (``kv_cache.table``) at
    ``context``: the measured number, and whether the claim holds there. Rows whose methods are missing are left
    out."""
    row = {r.method: r for r in df[df.context == context].itertuples()}
    out = []

    def add(claim, measured, holds, *needed):
        if all(m in row for m in needed):
            out.append({"claim": claim, "measured": measured(), "holds": bool(holds())})

    d = lambda m: row[m].delta_ppl_pct  # noqa: E731
    add("FP8 per token changes perplexity by < 1%", lambda: f"{d('fp8-token'):+.2f}% ppl",
        lambda: abs(d("fp8-token")) < 1, "fp8-token")
    add("FP8 per tensor, static scale: < 1%", lambda: f"{d('fp8-tensor'):+.2f}% ppl",
        lambda: abs(d("fp8-tensor")) < 1, "fp8-tensor")
    add("KIVI 2-bit (R = 128): 3-5% loss", lambda: f"{d('kivi2-r128'):+.2f}% ppl",
        lambda: 3 <= d("kivi2-r128") <= 5, "kivi2-r128")
    add("KIVI-2: per-channel keys beat per-token keys (equal bits)",
        lambda: f"KL {row['kivi2-r32'].kl:.4f} vs {row['ktoken2-r32'].kl:.4f}",
        lambda: row["kivi2-r32"].kl < row["ktoken2-r32"].kl, "kivi2-r32", "ktoken2-r32")
    add("GEAR at ~3 bits is near-lossless (< 1%)",
        lambda: f"{d('gear2-Q+L+S'):+.2f}% ppl at {row['gear2-Q+L+S'].bits_quantized:.2f} bits",
        lambda: abs(d("gear2-Q+L+S")) < 1, "gear2-Q+L+S")
    add("GEAR at ~3 bits is closer to float than KIVI-2",
        lambda: f"KL {row['gear2-Q+L+S'].kl:.4f} ({row['gear2-Q+L+S'].bits_quantized:.2f} b) vs "
                f"{row['kivi2-r32'].kl:.4f} ({row['kivi2-r32'].bits_quantized:.2f} b)",
        lambda: row["gear2-Q+L+S"].kl < row["kivi2-r32"].kl, "gear2-Q+L+S", "kivi2-r32")
    return pd.DataFrame(out)
