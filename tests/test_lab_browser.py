"""JupyterLab in a real browser: notebook 01 runs in Lab 4 inside Debian's headless chromium, and its ipywidgets
slider redraws the figure. runs/lab_browser/ gets a screenshot (and one more per failing test), the notebook
as Lab saved it, and the server's log.

What a user does, through the page: open the notebook, Run → Run All Cells, File → Save Notebook, press the
right arrow on the ``bits`` slider. Notebook 01 runs with its own parameters (it is tiny: smoke and full are
the same), from a copy in a temporary folder with live widgets ($QLAB_HEADLESS unset) and its figures sent to
a temporary $QLAB_FIGURES. Without chromium/chromedriver the test skips, except under CI (``$CI`` set),
where it fails: CI must run it (`make test` installs them).
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

import lab_driver

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_hand_math.ipynb"
SHOTS = ROOT / "runs" / "lab_browser"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = lab_driver.missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("lab")
    for old in SHOTS.glob("*-failure.png"):  # from an earlier run
        old.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("QLAB_HEADLESS", "TRITON_INTERPRET")}
    env.update(QLAB_FIGURES=str(tmp / "figures"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(lab_driver.LabServer(tmp / "root", tmp / "state", env, SHOTS / "jupyter.log"))
        driver = lab_driver.chromium()
        stack.callback(driver.quit)  # before the server stops (ExitStack unwinds in reverse)
        yield lab_driver.LabPage(driver, server), tmp


@contextlib.contextmanager
def screenshot_on_failure(page, name: str):
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a dead browser must not hide the real failure
            page.screenshot(SHOTS / f"{name}-failure.png")
        raise


def test_notebook01_runs_in_lab_and_its_slider_redraws_the_figure(lab):
    page, tmp = lab
    copy = lab_driver.cleared_copy(NOTEBOOK, tmp / "root")
    with screenshot_on_failure(page, "notebook01"):
        page.open(copy.name)
        prompts = page.run_all()
        counts, errors = page.save(copy)  # from the file Lab saved: hidden-input cells show no prompt
        shutil.copy(copy, SHOTS / copy.name)  # what Lab saved, to look at after a failure
        assert errors == [], f"cells raised in Lab: {errors}"
        assert counts == list(range(1, len(counts) + 1)), f"Run All Cells left cells unrun: {counts} {prompts}"
        assert (tmp / "figures" / "01_hand_math.png").exists(), "savefig wrote no figure to $QLAB_FIGURES"

        (bits_before, png_before), (bits_after, png_after) = page.nudge("ARROW_RIGHT")
        assert (bits_before, bits_after) == ("4", "5")  # IntSlider(4, 2, 8), one step right
        assert png_before.startswith("data:image/png;base64,") and png_after.startswith("data:image/png;base64,")
        assert png_after != png_before
        page.screenshot(SHOTS / "notebook01.png", scroll_to=".widget-slider")


def test_a_cell_that_raises_is_reported(lab):
    """The checks above can fail: in a notebook whose second cell raises, Run All Cells stops there, the
    third cell keeps an empty prompt, and the saved notebook holds the error."""
    page, tmp = lab
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": source, "outputs": [],
              "execution_count": None} for i, source in enumerate(["x = 1", "1 / 0", "x = 2"])]
    notebook = {"cells": cells, "metadata": {"kernelspec": {"name": "qlab", "display_name": "Python (qlab)",
                                                            "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp / "root" / "raises.ipynb"
    path.write_text(json.dumps(notebook))
    with screenshot_on_failure(page, "raises"):
        page.open(path.name)
        assert page.run_all() == ["[1]:", "[2]:", "[ ]:"]
        assert page.save(path) == ([1, 2, None], [(1, "ZeroDivisionError", "division by zero")])
