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
