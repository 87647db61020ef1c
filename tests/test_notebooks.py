"""Every numbered notebook runs end to end under papermill in smoke mode and writes its figures."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    out_dir = ROOT / "runs" / "smoke"
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    prefix = path.stem.split("_")[0] + "_"
    for old in figures.glob(prefix + "*"):
        old.unlink()
    monkeypatch.setenv("QLAB_FIGURES", str(figures))
    papermill.execute_notebook(
        str(path), str(out_dir / path.name), parameters={"SMOKE": True},
        kernel_name="qlab", cwd=str(path.parent), progress_bar=False,
        execution_timeout=900,  # seconds per cell: a stalled kernel fails the test instead of hanging CI
    )
    written = list(figures.glob(prefix + "*"))
    assert written, f"{path.name} saved no figure named {prefix}* under $QLAB_FIGURES"
