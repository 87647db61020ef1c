"""Figures. Every plotting function returns its figure; ``savefig`` writes it under ``figures/``.

Where figures go: ``$QLAB_FIGURES`` if set (the smoke tests point it at ``runs/smoke/figures`` so that
a test run never overwrites the real figures), else ``figures/`` at the repository root.
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def figures_dir() -> Path:
    path = Path(os.environ.get("QLAB_FIGURES", ROOT / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def savefig(fig, name: str) -> Path:
    """Save a matplotlib figure (PNG, 150 dpi) or a plotly figure (HTML) as figures/<name>."""
    if hasattr(fig, "write_html"):  # plotly
        path = figures_dir() / f"{name}.html"
        fig.write_html(path, include_plotlyjs="cdn")
    else:
        path = figures_dir() / f"{name}.png"
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


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
