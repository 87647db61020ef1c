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
    axes[0, 0].legend(loc="upper right", fontsize=8)
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


def plot_rate_distortion(points, variance: float = 1.0, ax=None, max_rate: float = 8.5):
    """MSE (log) against bits per sample with the Gaussian bound D(R) = σ² 2^(-2R) and the entropy-coded
    uniform quantizer's πe/6 · D(R). ``points``: rows with 'quantizer', 'bits', 'mse' (a DataFrame or dicts)."""
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    R = np.linspace(0, max_rate, 200)
    ax.plot(R, variance * 2.0 ** (-2 * R), "k-", lw=2, label="D(R) = σ² 2^(-2R) (Shannon bound)")
    ax.plot(R, math.pi * math.e / 6 * variance * 2.0 ** (-2 * R), "k--", lw=1, label="πe/6 · D(R) (+1.53 dB)")
    rows = points.to_dict("records") if hasattr(points, "to_dict") else list(points)
    for name in dict.fromkeys(r["quantizer"] for r in rows):
        pts = sorted((r["bits"], r["mse"]) for r in rows if r["quantizer"] == name)
        ax.plot(*zip(*pts), "o-", ms=4, lw=1, label=name)
    ax.set(yscale="log", xlabel="bits per sample R", ylabel="MSE", title="Gaussian source: quantizers against D(R)")
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    return ax.figure


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


def _front(df, x, y):
    d = df.sort_values([x, y])
    return d[d[y] <= d[y].cummin()].drop_duplicates(subset=[y], keep="first")


def plot_pareto(df, x: str = "quantized_bpw", y: str = "ppl", ax=None, label: str = "label",
                mark: str = "aligned_q4_1", logy: bool | None = None, title: str = "", ymax: float | None = None):
    """Scatter of y against x with the Pareto front (lower-left envelope) drawn as a step line.
    Rows where ``df[mark]`` is true get hollow markers (results tied to the checkpoint's Q4_1 grid).
    ``logy=None``: a log y axis when the values span more than a factor of 20. ``ymax``: rows above it
    are drawn as triangles on the top edge (and counted in the legend), so that a few collapsed
    configurations do not squash the interesting range."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    above = df[df[y] > ymax] if ymax is not None else df.iloc[:0]
    if len(above):
        ax.scatter(above[x], [ymax] * len(above), marker="^", color="0.3", s=40, clip_on=False,
                   label=f"{len(above)} above {ymax:.3g} (up to {above[y].max():.3g})")
        df = df.drop(above.index)
    families = df[label].str.split().str[0] if label in df else df.index.astype(str)
    for i, fam in enumerate(dict.fromkeys(families)):
        sub = df[families == fam]
        marked = sub[mark].astype(bool) if mark in sub else sub[x] != sub[x]
        ax.scatter(sub[x][~marked], sub[y][~marked], color=f"C{i % 10}", s=30, label=fam)
        ax.scatter(sub[x][marked], sub[y][marked], facecolors="none", edgecolors=f"C{i % 10}", s=60, lw=1.5)
    front = _front(df, x, y)
    ax.step(front[x], front[y], where="post", color="k", lw=1, alpha=0.6, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(r[label], (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if mark in df and df[mark].astype(bool).any():
        ax.scatter([], [], facecolors="none", edgecolors="k", s=60, label="groups of 32 = Q4_1 blocks")
    ax.set(xlabel=x.replace("_", " "), ylabel=y.replace("_", " "), title=title)
    positive = df[y][df[y] > 0]
    if logy is None:
        logy = len(positive) == len(df) and positive.max() > 20 * positive.min()
    if logy:
        ax.set_yscale("log")
    if len(above):
        ax.set_ylim(top=ymax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


def plotly_pareto(df, x: str = "quantized_bpw", y: str = "ppl", label: str = "label",
                  mark: str = "aligned_q4_1", logy: bool = True, title: str = ""):
    """The interactive version of :func:`plot_pareto` (hover shows every column of a row)."""
    import plotly.express as px

    d = df.copy()
    d["family"] = d[label].str.split().str[0]
    d["grid"] = d[mark].map({True: "groups of 32 (Q4_1-aligned)", False: "other"}) if mark in d else "other"
    hover = [c for c in ("ppl", "kl_mean", "top1", "quantized_bpw", "size_mb") if c in d]
    fig = px.scatter(d, x=x, y=y, color="family", symbol="grid", hover_name=label, hover_data=hover,
                     log_y=logy, title=title, symbol_map={"other": "circle", "groups of 32 (Q4_1-aligned)": "circle-open"})
    front = _front(d, x, y)
    fig.add_scatter(x=front[x], y=front[y], mode="lines", line_shape="hv", name="Pareto front",
                    line=dict(color="black", width=1))
    return fig
