"""Figures. Every plotting function returns its figure; ``savefig`` writes it under ``figures/``.

Where figures go: ``$QLAB_FIGURES`` if set (the smoke tests point it at ``runs/smoke/figures`` so that
a test run never overwrites the real figures), else ``figures/`` at the repository root.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def figures_dir() -> Path:
    path = Path(os.environ.get("QLAB_FIGURES", ROOT / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def savefig(fig, name: str) -> Path:
    """Save a matplotlib figure (PNG, 150 dpi) or a plotly figure (HTML) as figures/<name>.

    Plotly HTML loads ``plotly.min.js`` from the same folder (written once, beside the figures), never
    from a CDN: the files open offline."""
    if hasattr(fig, "write_html"):  # plotly
        path = figures_dir() / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory")
    else:
        path = figures_dir() / f"{name}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def interact(fn, **knobs):
    """``ipywidgets.interact(fn, **knobs)`` in a live notebook. In a headless run (``$QLAB_HEADLESS`` set,
    as ``make run`` and the notebook tests do for papermill) ``fn`` is called once with the values the
    widgets would start at, and its result displayed, without creating the interactive widget.

    Why: an ``interact`` widget captures its output in an Output widget, and a headless client
    (nbclient) then syncs that widget's state back to the kernel over the shell channel while the cell
    runs; on this machine that intermittently left papermill waiting forever on an idle kernel (the cell's
    reply never arrived; nteract/papermill#723 reports the same hang). The default figure is the same."""
    if not os.environ.get("QLAB_HEADLESS"):
        import ipywidgets

        return ipywidgets.interact(fn, **knobs)
    from IPython.display import display

    result = fn(**initial_values(fn, **knobs))
    if result is not None:
        display(result)
    return None


def initial_values(fn, **knobs) -> dict:
    """The value each knob of ``interact(fn, **knobs)`` starts at, as ipywidgets picks it: a widget's own
    value; for a list of options, fn's default if it is one of them, else the first; for a (min, max[, step])
    tuple, fn's default or else the middle of the range; a plain value stays fixed."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    values = {}
    for name, knob in knobs.items():
        if hasattr(knob, "value"):  # a widget
            values[name] = knob.value
        elif isinstance(knob, (list, dict)) or (isinstance(knob, tuple) and not all(isinstance(v, (int, float)) for v in knob)):
            options = list(knob.values()) if isinstance(knob, dict) else [v[1] if isinstance(v, tuple) else v for v in knob]
            values[name] = defaults[name] if defaults.get(name, object()) in options else options[0]
        elif isinstance(knob, tuple) and 2 <= len(knob) <= 3:
            low, high = knob[:2]
            mid = (low + high) / 2 if any(isinstance(v, float) for v in knob) else (low + high) // 2
            values[name] = defaults.get(name, mid)
        else:
            values[name] = knob
    return values


def plot_reconstruction(x, quantized: dict, title: str = ""):
    """A number line per quantizer: the grid points each group can take (ticks), the original
    values (circles) and where they land (crosses). ``quantized`` maps a label to a QuantizedTensor."""
    import matplotlib.pyplot as plt
    import torch

    fig, axes = plt.subplots(len(quantized), 1, figsize=(9, 1.5 + 1.2 * len(quantized)), sharex=True,
                             squeeze=False)
    x = x.detach().float().reshape(-1)
    for ax, (label, qt) in zip(axes[:, 0], quantized.items()):
        scales = qt.scales().reshape(-1)
        zps = torch.zeros_like(scales) if qt.zero_point is None else qt.zero_point.reshape(-1).float()
        for g, (s, z) in enumerate(zip(scales, zps)):
            points = s * (qt.spec.grid.levels - z)
            ax.vlines(points, g * 0.3 - 0.1, g * 0.3 + 0.1, color=f"C{g}", lw=0.8, alpha=0.6)
        x_hat = qt.dequantize().float().reshape(-1)
        ax.plot(x, torch.full_like(x, -0.45), "ko", ms=5, label="x")
        ax.plot(x_hat, torch.full_like(x, -0.45), "rx", ms=8, label="x_hat")
        for a, b in zip(x, x_hat):
            ax.annotate("", (b, -0.45), (a, -0.45), arrowprops=dict(arrowstyle="->", color="0.5", lw=0.6))
        err = (x - x_hat).abs().max().item()
        ax.set_title(f"{label}   ({qt.spec}; max |error| {err:.4f})", fontsize=9, loc="left")
        ax.set_yticks([])
        ax.set_ylim(-0.7, 0.3 * len(scales))
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside the number line
    axes[-1, 0].set_xlabel("value")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- number formats (notebook 02) ------------------------------------------------------------------
def plot_spacing(curves: dict, ax=None, relative: bool = False, title: str | None = None):
    """Log-log spacing between neighbours against magnitude. ``curves``: label -> (magnitudes, gaps),
    e.g. from ``qlab.study.precision.spacing``; ``relative=True`` plots gap / magnitude instead."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, gap) in curves.items():
        x, gap = x.double(), gap.double()
        ax.step(x, gap / x if relative else gap, where="post", label=label, lw=1.2)
    ax.set(xscale="log", yscale="log", xlabel="|x|",
           ylabel="gap / |x| (relative spacing)" if relative else "gap to the next value (spacing)")
    ax.set_title(title or ("relative spacing" if relative else "absolute spacing"))
    ax.grid(True, which="major", alpha=0.3)
    return ax.figure


def plot_levels(grids: dict, ax=None, title: str = "levels", xscale: str = "linear"):
    """Every level of each grid as a row of ticks on one shared axis. ``grids``: label -> levels."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 + 0.55 * len(grids)))
    for row, (label, levels) in enumerate(grids.items()):
        levels = levels.double()
        ax.plot(levels, [row] * len(levels), "|", ms=14, mew=1.5)
        ax.text(1.01, row, f"{len(levels)} levels", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_yticks(range(len(grids)), list(grids))
    ax.set(xscale=xscale, title=title, ylim=(-0.7, len(grids) - 0.3))
    ax.grid(True, axis="x", alpha=0.3)
    return ax.figure


def plot_format(name: str, n_points: int = 4000):
    """One format on two panels: its spacing curve, and its levels. A grid of at most 16 levels is drawn
    on a linear axis with every level labelled; a larger one (FP8: 253) as its positive levels on a log
    axis, one colour per binade (the negative half mirrors it), where a linear axis would be a solid bar;
    16- and 32-bit formats get their key numbers as text."""
    import matplotlib.pyplot as plt
    import torch

    from qlab.study.precision import grid_by_name, spacing_curves

    grid = grid_by_name(name)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    plot_spacing(spacing_curves([name], n_points), ax=axes[0], title=f"{name}: spacing")
    axes[0].legend(fontsize=8)
    ax = axes[1]
    if grid.bits > 8:
        ax.axis("off")
        ax.text(0.05, 0.5, f"{name}: eps = {grid.eps:.4g}, max = {grid.max:.4g}\n"
                f"min normal = {grid.min_normal:.4g}, min subnormal = {grid.min_subnormal:.4g}",
                fontsize=11, transform=ax.transAxes)
        return fig
    lv = grid.levels.double()
    if len(lv) <= 16:
        ax.plot(lv, torch.zeros_like(lv), "|", ms=20, mew=1.5)
        for v in lv.tolist():
            ax.annotate(f"{v:.3g}", (v, 0), xytext=(0, -18), textcoords="offset points", ha="center", fontsize=7,
                        rotation=90 if len(lv) > 9 else 0, va="top")
        ax.set(title=f"{name}: all {len(lv)} levels", yticks=[], xlabel="value", ylim=(-1, 1))
    else:
        pos = lv[lv > 0]
        binade = torch.floor(torch.log2(pos))
        for i, e in enumerate(binade.unique().tolist()):
            sel = pos[binade == e]
            ax.plot(sel, torch.zeros_like(sel), "|", ms=22, mew=1.0, color=f"C{i % 10}")
        ax.set(xscale="log", yticks=[], xlabel="value (log axis; the negative levels mirror these)",
               title=f"{name}: {len(pos)} positive of {len(lv)} levels, one colour per binade")
        ax.grid(True, axis="x", which="major", alpha=0.3)
    return fig


# ---- error and rate (notebook 03) ------------------------------------------------------------------
def plot_quantizer_on_density(x, quantizers: dict, ax=None, bins: int = 200, title: str = ""):
    """Histogram of samples x with the reconstruction levels of each quantizer drawn under it.
    ``quantizers``: label -> 1-D tensor of levels."""
    import matplotlib.pyplot as plt
    import torch

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    x = x.double()
    lo, hi = torch.quantile(x, torch.tensor([0.0005, 0.9995], dtype=torch.float64)).tolist()
    ax.hist(x.clamp(lo, hi).numpy(), bins=bins, density=True, color="0.8")
    top = ax.get_ylim()[1]
    for i, (label, levels) in enumerate(quantizers.items()):
        lv = levels.double()
        lv = lv[(lv >= lo) & (lv <= hi)]
        ax.plot(lv, [-(i + 1) * 0.06 * top] * len(lv), "|", ms=10, mew=1.5, label=label)
    ax.set(xlim=(lo, hi), xlabel="x", ylabel="density", title=title)
    ax.legend(loc="upper right", fontsize=8)
    return ax.figure


def plot_rate_distortion(points, variance: float = 1.0, ax=None, max_rate: float = 8.5, lattices: dict | None = None):
    """MSE (log) against bits per sample with the Gaussian bound D(R) = σ² 2^(-2R) and, for each lattice
    in ``lattices`` (name -> normalized second moment G; default Z, D4, E8 from ``theory.LATTICE_G``), the
    entropy-coded high-rate curve 2πe G · D(R) (Z's is the uniform quantizer's πe/6 · D(R)).
    ``points``: rows with 'quantizer', 'bits', 'mse' (a DataFrame or dicts)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from qlab.study.theory import LATTICE_G, lattice_gap_db

    gap_ax = None
    if ax is None:  # a second panel shows the same data as dB above D(R), where the lattice lines separate
        _, (ax, gap_ax) = plt.subplots(1, 2, figsize=(14, 5))
    R = np.linspace(0, max_rate, 200)
    D = variance * 2.0 ** (-2 * R)
    ax.plot(R, D, "k-", lw=2, label="D(R) = σ² 2^(-2R) (Shannon bound)")
    if gap_ax is not None:
        gap_ax.axhline(0, color="k", lw=2)
    for (name, G), style in zip((lattices or LATTICE_G).items(), ("--", "-.", ":")):
        gap = lattice_gap_db(G)
        ax.plot(R, 10 ** (gap / 10) * D, "k" + style, lw=1,
                label=f"{name} lattice, entropy-coded, high rate: 2πeG·D(R) (+{gap:.2f} dB)")
        if gap_ax is not None:
            gap_ax.axhline(gap, color="k", ls=style, lw=1)
    rows = points.to_dict("records") if hasattr(points, "to_dict") else list(points)
    markers = "osD^v<>p*h"
    for i, name in enumerate(dict.fromkeys(r["quantizer"] for r in rows)):
        pts = sorted((r["bits"], r["mse"]) for r in rows if r["quantizer"] == name)
        style = dict(marker=markers[i % len(markers)], ms=4, lw=1, color=f"C{i % 10}")
        ax.plot(*zip(*pts), label=name, **style)
        if gap_ax is not None:
            gap_ax.plot([b for b, _ in pts], [10 * np.log10(m / (variance * 2.0 ** (-2 * b))) for b, m in pts], **style)
    ax.set(yscale="log", xlabel="bits per sample R", ylabel="MSE (σ² = %.3g)" % variance,
           title="Gaussian source: quantizers against the rate–distortion bound")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    if gap_ax is not None:
        gap_ax.set(xlabel="bits per sample R", ylabel="dB above D(R)  = 10 log10(MSE / D(R))",
                   title="the same, as distance from the bound (lines: D(R), Z, D4, E8)", xlim=ax.get_xlim())
        gap_ax.grid(True, alpha=0.3)
    return ax.figure


def plot_granularity_ladder(ladder, axes=None):
    """Relative error against granularity (per tensor → per channel → groups of 1024 … 32), one panel per
    matrix and one line per bit width. The granularities are the x ticks, each labelled with what its fp16
    scales add in bits per weight (the same for every bit width), so no point needs a text label.
    ``ladder``: rows of ``qlab.study.ladder.granularity_ladder``."""
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(ladder)
    names = list(dict.fromkeys(df.matrix))
    if axes is None:
        _, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.3), sharey=True, squeeze=False)
        axes = axes[0]
    order = list(dict.fromkeys(df.granularity))
    for ax, name in zip(axes, names):
        d = df[df.matrix == name]
        for i, (b, db) in enumerate(d.groupby("bits")):
            db = db.set_index("granularity").loc[order]
            ax.plot(range(len(order)), db.rel_error, "o-", color=f"C{i}", label=f"int{b}")
        over = d.groupby("granularity", sort=False).apply(lambda g: (g.bits_per_weight - g.bits).iloc[0]).loc[order]
        ax.set_xticks(range(len(order)), [f"{g}\n+{o:.2g}" for g, o in zip(order, over)], fontsize=8)
        ax.set(title=name, yscale="log", xlabel="granularity, and its scales' cost in bits per weight (fp16 scales)",
               ylabel="relative error ||W - Ŵ||_F / ||W||_F")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="bits per code", title_fontsize=8)
    return axes[0].figure


# ---- real models: outliers and sweeps (notebooks 04, 05) ----------------------------------------------
def plot_channel_heatmap(matrix, ax=None, title: str = "", log: bool = True, ylabel: str = "layer"):
    """A [layers, channels] matrix of activation magnitudes (e.g. per-channel max |x| of one input
    site in every layer) as an image, log colour scale by default."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4))
    m = matrix.detach().float().numpy()
    im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="magma",
                   norm=LogNorm(vmin=max(m[m > 0].min(), 1e-3), vmax=m.max()) if log else None)
    ax.figure.colorbar(im, ax=ax, label="max |x|")
    ax.set(xlabel="channel", ylabel=ylabel, title=title)
    return ax.figure


def plot_threshold_counts(counts, threshold: float = 6.0, ax=None):
    """Channels above a threshold per layer (``counts``: DataFrame, index layer, one column per input site).
    Each site gets its own marker and line style, and a site at zero in every layer says so in the legend
    (its line would otherwise hide under another site's); the y axis is symlog so that a few channels stay
    visible beside a thousand."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]
    for i, col in enumerate(counts.columns):
        marker, ls = styles[i % len(styles)]
        label = col + ("  (0 in every layer)" if (counts[col] == 0).all() else "")
        ax.plot(counts.index, counts[col], marker=marker, ls=ls, ms=4, mfc="none", color=f"C{i}", label=label,
                zorder=3 + len(counts.columns) - i)
    ax.set_yscale("symlog", linthresh=1)
    ax.set(xlabel="layer", ylabel="input channels with max |x| > %g" % threshold,
           title=f"channels LLM.int8() would keep in 16 bit (threshold {threshold:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax.figure


def plot_weight_outliers(ws, gaussian_max_over_std: float | None = None):
    """Two panels from ``qlab.models.weight_stats``: max |w| / std (log axis) and excess kurtosis (linear: it
    is 0 for a Gaussian and may be negative) per layer, one line per linear kind, one shared legend outside."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, col, ylabel in ((axes[0], "max_over_std", "max |w| / std(w)"), (axes[1], "kurtosis", "excess kurtosis")):
        wide = ws.pivot(index="layer", columns="kind", values=col)
        for i, kind in enumerate(wide.columns):
            ax.plot(wide.index, wide[kind], marker="os^Dv<>"[i % 7], ms=3, lw=1, color=f"C{i}", label=kind)
        ax.set(xlabel="layer", ylabel=ylabel, title=ylabel + " per weight matrix")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if gaussian_max_over_std:
        axes[0].axhline(gaussian_max_over_std, color="k", ls=":", lw=1, label="Gaussian of this size")
    axes[1].axhline(0, color="k", ls=":", lw=1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="linear")
    fig.tight_layout()
    return fig


def plot_column_error(shares: dict, ax=None, title: str = ""):
    """Cumulative output error over the input columns for each method (``shares``: name ->
    ``qlab.study.gptq_view.column_output_error`` result): solid, the full shares (their end point is the method's output error);
    dotted, the diagonal terms alone. The vertical gap at the right end is what the cross terms add or save."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.6))
    for i, (name, s) in enumerate(shares.items()):
        full, diag = s["full"].cumsum(0), s["diagonal"].cumsum(0)
        ax.plot(full, color=f"C{i}", lw=1.2, label=f"{name}: with cross terms (total {float(full[-1]):.4f})")
        ax.plot(diag, color=f"C{i}", lw=1, ls=":", label=f"{name}: diagonal terms only ({float(diag[-1]):.4f})")
    ax.set(xlabel="input column j (in the original order)", ylabel="cumulative relative output error",
           title=title or "output error accumulated over the input columns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return ax.figure


AXIS_NAMES = {"quantized_bpw": "bits per weight (quantized Linears, incl. scales and zero points)",
              "ppl": "perplexity", "kl_mean": "mean KL(float ‖ quantized), nats/token", "kl_p99": "99th pct. KL, nats/token",
              "top1": "top-1 agreement with float", "disagreement": "1 − top-1 agreement",
              "delta_ppl_pct": "perplexity change vs float (%)", "size_mb": "size (MB)"}
MARKERS = "osD^v<>phP*X"


def _front(df, x, y):
    """The Pareto front (lower-left envelope): rows that no other row beats on both x and y. At one x only the
    best y can be on it; a row is on it only if it strictly improves y over every smaller (or equal) x."""
    d = df.sort_values([x, y])
    d = d[~d[x].duplicated(keep="first")]
    best = d[y].cummin().shift(fill_value=float("inf"))
    return d[d[y] < best]


def family_of(labels):
    """A configuration's family is the first word of its label ('int4 g32 asym' -> 'int4', 'GPTQ 3-bit' -> 'GPTQ')."""
    return labels.astype(str).str.split().str[0]


def family_styles(families) -> dict:
    """family -> (colour, marker), assigned in sorted order of the family names, so the same data gives the same
    colour to a family on every panel and in every notebook that passes the same families."""
    return {fam: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, fam in enumerate(sorted(set(families)))}


def ppl_interval(window_nll) -> tuple[float, float]:
    """95% interval of a perplexity from its per-window mean NLLs (equal-length windows): exp(mean ± 1.96 sd/√n)."""
    import math

    import torch

    v = torch.as_tensor(list(window_nll), dtype=torch.float64)
    half = 1.96 * float(v.std()) / len(v) ** 0.5
    return math.exp(float(v.mean()) - half), math.exp(float(v.mean()) + half)


def plot_pareto(df, x: str = "quantized_bpw", y: str = "ppl", ax=None, label: str = "label",
                mark: str = "aligned_q4_1", logy: bool | None = None, title: str = "", ymax: float | None = None,
                styles: dict | None = None, reference: float | str | None = "auto", dodge: float = 0.03,
                errorbars: bool = True, label_front: bool = True, family: str | None = None):
    """Scatter of y against x, one colour and marker per family (``family_of(label)``), with the Pareto front
    ringed and its points labelled (labels placed apart with adjustText).

    * ``family``: a column naming each row's family (default: the first word of its label).
    * ``styles``: family -> (colour, marker); by default ``family_styles`` of *all* rows, so panels drawn from
      the same table agree. Rows at the same x from different families are spread by ``dodge`` (in x units) so
      none hides another (the front and the tables keep the true x).
    * ``reference``: a horizontal line in the legend, "auto" = the float model's ``ppl_ref`` when y is ppl.
    * ``errorbars``: for y = ppl with a ``window_nll`` column, the 95% interval of each perplexity.
    * Rows where ``df[mark]`` is true get hollow markers (results tied to the checkpoint's Q4_1 grid).
    * ``logy=None``: log y when the values span more than a factor of 20. ``ymax``: rows above it are drawn as
      triangles on the top edge in their family's colour (and counted in the legend).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    df = df.copy()
    if family is not None:
        df["_family"] = df[family].astype(str)
    else:
        df["_family"] = family_of(df[label]) if label in df else df.index.astype(str)
    styles = styles or family_styles(df["_family"])
    xs = sorted(df[x].unique())
    offsets = {}
    for xv in xs:  # families sharing this x are spread symmetrically around it
        fams = sorted(df.loc[df[x] == xv, "_family"].unique())
        offsets.update({(xv, f): dodge * (i - (len(fams) - 1) / 2) for i, f in enumerate(fams)})
    df["_xd"] = [xv + offsets[(xv, f)] for xv, f in zip(df[x], df["_family"])]
    above = df[df[y] > ymax] if ymax is not None else df.iloc[:0]
    if len(above):
        for fam, sub in above.groupby("_family"):
            ax.scatter(sub["_xd"], [ymax] * len(sub), marker="^", color=styles[fam][0], s=50, clip_on=False,
                       edgecolors="k", linewidths=0.5, zorder=4)
        ax.scatter([], [], marker="^", color="0.6", edgecolors="k", linewidths=0.5,
                   label=f"{len(above)} above {ymax:.3g} (up to {above[y].max():.3g})")
        df = df.drop(above.index)
    for fam in sorted(df["_family"].unique()):
        sub = df[df["_family"] == fam]
        colour, marker = styles[fam]
        marked = sub[mark].astype(bool) if mark in sub else sub[x] != sub[x]
        if errorbars and y == "ppl" and "window_nll" in sub:
            lo_hi = [ppl_interval(w) if isinstance(w, (list, tuple)) and len(w) > 1 else (p, p)
                     for w, p in zip(sub["window_nll"], sub[y])]
            ax.errorbar(sub["_xd"], sub[y], yerr=[[p - lo for (lo, _), p in zip(lo_hi, sub[y])],
                                                   [hi - p for (_, hi), p in zip(lo_hi, sub[y])]],
                        fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.7)
        if (~marked).any():
            ax.scatter(sub["_xd"][~marked], sub[y][~marked], color=colour, marker=marker, s=36, label=fam, zorder=3)
        if marked.any():  # one legend entry per family: the hollow one only when the family has no filled point
            ax.scatter(sub["_xd"][marked], sub[y][marked], facecolors="none", edgecolors=colour, marker=marker, s=60,
                       lw=1.5, zorder=3, label=None if (~marked).any() else fam)
    front = _front(df, x, y)
    ax.plot(front["_xd"], front[y], ls=":", lw=0.8, color="k", marker="o", ms=11, mfc="none", mec="k",
            label="Pareto front", zorder=2)
    if reference == "auto":
        reference = float(df["ppl_ref"].iloc[0]) if y == "ppl" and "ppl_ref" in df and len(df) else None
    if reference is not None:
        ax.axhline(reference, color="0.3", ls="--", lw=1, label=f"float reference ({reference:.4g})")
    if mark in df and df[mark].astype(bool).any():
        ax.scatter([], [], facecolors="none", edgecolors="k", s=60, label="hollow: groups of 32 = Q4_1 blocks")
    ax.set(xlabel=AXIS_NAMES.get(x, x.replace("_", " ")), ylabel=AXIS_NAMES.get(y, y.replace("_", " ")), title=title)
    positive = df[y][df[y] > 0]
    if logy is None:
        logy = len(positive) == len(df) and len(df) > 0 and positive.max() > 20 * positive.min()
    if logy:
        ax.set_yscale("log")
    if len(above):
        ax.set_ylim(top=ymax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if label_front and label in front:  # last: adjustText places labels in the axes' final (log) coordinates
        texts = [ax.text(xd, yv, str(t), fontsize=7) for xd, yv, t in zip(front["_xd"], front[y], front[label])]
        _spread_labels(ax, texts, front["_xd"].tolist(), front[y].tolist())
    return ax.figure


def _spread_labels(ax, texts, xs, ys):
    """Move text labels apart (adjustText) with a thin line back to their point."""
    try:
        from adjustText import adjust_text
    except ImportError:  # a plain label at each point
        return
    adjust_text(texts, x=xs, y=ys, ax=ax, arrowprops=dict(arrowstyle="-", color="0.5", lw=0.5),
                expand=(1.2, 1.4), time_lim=2)


def plot_format_errors(errors, tensors=None, ax=None, title: str = ""):
    """Mean relative weight error against bits per weight, one point per (family, method), averaged over the
    same tensors for every point: ``tensors`` (default: those to which *every* method of ``errors`` applies;
    a k-quant needs rows that are a multiple of 256). Labels are placed apart with adjustText; exact (error 0)
    methods are listed in the legend title, since a log axis cannot draw them. ``errors``: rows of
    ``qlab.study.gguf_compare.error_table``."""
    import matplotlib.pyplot as plt

    methods = errors.method.unique()
    if tensors is None:
        per_tensor = errors.groupby("tensor").method.nunique()
        tensors = per_tensor[per_tensor == len(methods)].index.tolist()
    d = errors[errors.tensor.isin(tensors)]
    if d.empty:
        raise ValueError("no tensor has a row for every method; pass tensors= explicitly")
    g = d.groupby(["family", "method"], as_index=False)[["bits_per_weight", "rel_err"]].mean()
    exact, g = g[g.rel_err == 0], g[g.rel_err > 0]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.6))
    texts = []
    for i, (fam, sub) in enumerate(g.groupby("family")):
        ax.scatter(sub.bits_per_weight, sub.rel_err, marker="osD^"[i % 4], color=f"C{i}", label=fam, zorder=3)
        texts += [ax.text(r.bits_per_weight, r.rel_err, r.method.replace("-asym-minmax", "").replace("-sym-absmax", ""),
                          fontsize=7) for r in sub.itertuples()]
    ax.set(yscale="log", xlabel="bits per weight (codes + block scales/mins)",
           ylabel="relative Frobenius error ||W − Ŵ|| / ||W||",
           title=title or f"weight error vs size: mean over the same {len(tensors)} tensor(s) for every point")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, title=("exact (error 0, not drawn): " + ", ".join(exact.method)) if len(exact) else None,
              title_fontsize=7)
    _spread_labels(ax, texts, g.bits_per_weight.tolist(), g.rel_err.tolist())  # after the log scale
    return ax.figure


def plot_mix_composition(shares, bits_per_weight, ax=None, title: str = "Formats inside each mix"):
    """Stacked bars: the share of weights in each format for every mix, one distinct colour (and hatch for
    the second ten) per format, the mix's bits per weight written inside the top of its bar and the title above
    the axes, clear of the numbers. ``shares``: DataFrame, index mix, columns format; ``bits_per_weight``: per mix."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4.2))
    bottom = None
    for i, fmt in enumerate(sorted(shares.columns)):
        vals = shares[fmt].values
        ax.bar(range(len(shares)), vals, bottom=bottom, width=0.8, color=f"C{i % 10}", hatch="//" if i >= 10 else None,
               edgecolor="white", lw=0.5, label=fmt)
        bottom = vals if bottom is None else bottom + vals
    for i, b in enumerate(bits_per_weight):
        ax.text(i, 0.97, f"{b:.2f}\nbpw", ha="center", va="top", fontsize=7, color="white", fontweight="bold")
    ax.set_xticks(range(len(shares)), list(shares.index), rotation=45, ha="right")
    ax.set(ylabel="share of the model's weights", ylim=(0, 1))
    ax.set_title(title, pad=10)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="format", title_fontsize=7)
    return ax.figure


def plotly_pareto(df, x: str = "quantized_bpw", y: str = "ppl", label: str = "label",
                  mark: str = "aligned_q4_1", logy: bool = True, title: str = ""):
    """The interactive version of :func:`plot_pareto` (hover shows every column of a row)."""
    import plotly.express as px

    d = df.copy()
    d["family"] = family_of(d[label])
    d["grid"] = d[mark].map({True: "groups of 32 (Q4_1-aligned)", False: "other"}) if mark in d else "other"
    hover = [c for c in ("ppl", "kl_mean", "top1", "quantized_bpw", "size_mb") if c in d]
    fig = px.scatter(d, x=x, y=y, color="family", symbol="grid", hover_name=label, hover_data=hover,
                     log_y=logy, title=title, symbol_map={"other": "circle", "groups of 32 (Q4_1-aligned)": "circle-open"})
    front = _front(d, x, y)
    fig.add_scatter(x=front[x], y=front[y], mode="lines", line_shape="hv", name="Pareto front",
                    line=dict(color="black", width=1))
    return fig
