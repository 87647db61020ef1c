"""qlab.study.plots: the Pareto plot keeps off-scale rows visible as edge markers."""
import matplotlib

matplotlib.use("Agg")
import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from qlab.study import plots  # noqa: E402


def test_pareto_plot_clips_rows_above_ymax_to_the_top_edge():
    df = pd.DataFrame({"label": ["int8 a", "int4 b", "int3 c", "int2 d", "int2 e"],
                       "quantized_bpw": [8.0, 4.2, 3.2, 2.2, 2.1], "ppl": [29.0, 38.0, 150.0, 3e6, 1e8]})
    fig = plots.plot_pareto(df, ymax=300)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] == 300
    edge = [c for c in ax.collections if len(c.get_offsets()) and (c.get_offsets()[:, 1] == 300).all()]
    assert len(edge) == 1 and sorted(edge[0].get_offsets().tolist()) == [[2.1, 300.0], [2.2, 300.0]]
    assert edge[0].get_facecolor()[0].tolist() == list(plt_colour(plots.family_styles(family(df))["int2"][0]))
    assert any(t.get_text() == "2 above 300 (up to 1e+08)" for t in ax.get_legend().get_texts())
    front = [l for l in ax.lines if l.get_label() == "Pareto front"][0]
    assert front.get_xdata().tolist() == [3.2, 4.2, 8.0]  # the front of the rows on the chart


def family(df):
    return plots.family_of(df["label"])


def plt_colour(c):
    from matplotlib.colors import to_rgba

    return to_rgba(c)


def test_pareto_front_at_equal_bits_keeps_only_the_best():
    df = pd.DataFrame({"label": ["RTN 4-bit", "GPTQ 4-bit", "AWQ 4-bit", "RTN 8-bit", "AWQ 8-bit"],
                       "quantized_bpw": [4.17, 4.17, 4.17, 8.0, 8.0], "ppl": [85.0, 81.0, 86.0, 79.0, 79.0]})
    front = plots._front(df, "quantized_bpw", "ppl")
    assert front.label.tolist() == ["GPTQ 4-bit", "RTN 8-bit"]  # not RTN/AWQ at 4.17; one of the tied 8-bit rows (the first)


def test_pareto_colours_agree_across_panels_and_points_are_dodged():
    df = pd.DataFrame({"label": ["AWQ 4-bit", "GPTQ 4-bit", "RTN 4-bit", "RTN 2-bit"],
                       "quantized_bpw": [4.17, 4.17, 4.17, 2.17], "ppl": [86.0, 81.0, 85.0, 5e4],
                       "ppl_ref": [79.0] * 4, "kl_mean": [0.035, 0.026, 0.038, 3.0],
                       "window_nll": [[4.4, 4.5], [4.3, 4.5], [4.4, 4.5], [10.8, 10.9]]})
    fig, axes = plt.subplots(1, 2)
    plots.plot_pareto(df, "quantized_bpw", "ppl", ax=axes[0], ymax=1000)   # RTN 2-bit clipped on this panel only
    plots.plot_pareto(df, "quantized_bpw", "kl_mean", ax=axes[1])
    colours = [{c.get_label(): tuple(c.get_facecolor()[0]) for c in a.collections if c.get_label() in ("AWQ", "GPTQ", "RTN")}
               for a in axes]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 3
    xs = sorted(c.get_offsets()[0][0] for c in axes[1].collections if c.get_label() in ("AWQ", "GPTQ"))
    assert xs == pytest.approx([4.17 - 0.03, 4.17])  # three families at 4.17: -0.03, 0, +0.03 (RTN)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert "float reference (79)" in legend
    assert axes[0].get_ylabel() == "perplexity" and axes[1].get_xlabel().startswith("bits per weight")


def test_ppl_interval():
    lo, hi = plots.ppl_interval([4.0, 4.2, 4.4, 4.6])
    half = 1.96 * 0.2581988897 / 2   # sd of (4.0, 4.2, 4.4, 4.6) = 0.2582
    assert (lo, hi) == pytest.approx((math.exp(4.3 - half), math.exp(4.3 + half)), rel=1e-9)


def _knobs():
    import ipywidgets

    return dict(metric=["ppl", "kl_mean", "top1"], bits=[2, 3, 4], group=(32, 256), step=(0.0, 1.0, 0.1),
                alpha=ipywidgets.FloatSlider(value=0.25, min=0, max=1), named=[("eight", 8), ("four", 4)],
                fixed=True)


def _fn(metric, bits=3, group=64, step=0.5, alpha=0.0, named=4, fixed=False):
    return metric, bits, group, step, alpha, named, fixed


def test_headless_interact_starts_where_ipywidgets_starts():
    """The values are ipywidgets' own initial ones (interactive() outside a kernel), knob by knob."""
    import ipywidgets

    expected = ipywidgets.interactive(_fn, **_knobs()).kwargs
    assert plots.initial_values(_fn, **_knobs()) == expected
    assert expected == dict(metric="ppl", bits=3, group=64, step=0.5, alpha=0.25, named=4, fixed=True)
    no_defaults = lambda metric, group, step: None  # noqa: E731
    k = {"metric": ["a", "b"], "group": (32, 256), "step": (0.0, 1.0, 0.1)}
    assert plots.initial_values(no_defaults, **k) == ipywidgets.interactive(no_defaults, **k).kwargs


def test_headless_interact_calls_once_without_widgets(monkeypatch):
    calls = []
    monkeypatch.setenv("QLAB_HEADLESS", "1")
    assert plots.interact(lambda metric="kl_mean": calls.append(metric), metric=["ppl", "kl_mean"]) is None
    assert calls == ["kl_mean"]


def test_plotly_html_opens_offline(tmp_path, monkeypatch):
    """No external script URL: plotly.js sits beside the HTML and is loaded by a relative path."""
    import re

    import plotly.graph_objects as go

    from qlab.study.plots import savefig

    monkeypatch.setenv("QLAB_FIGURES", str(tmp_path))
    path = savefig(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), "offline")
    sources = re.findall(r'<script[^>]*\ssrc="([^"]+)"', path.read_text())
    assert sources == ["plotly.min.js"]
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000


def test_committed_html_figures_open_offline():
    import re

    from qlab.study.plots import ROOT

    for html in (ROOT / "figures").glob("*.html"):
        tags = re.findall(r'<script[^>]*\ssrc="[^"]+"[^>]*>', html.read_text())
        sources = [re.search(r'\ssrc="([^"]+)"', tag).group(1) for tag in tags]
        assert all(not s.startswith(("http:", "https:", "//")) for s in sources), (html.name, sources)
        assert all((html.parent / s).exists() for s in sources), (html.name, sources)
        # a local script marked crossorigin (left from a CDN tag) is blocked by the browser on file:// pages
        assert not any("crossorigin" in tag or "integrity" in tag for tag in tags), (html.name, tags)


def test_plot_format_draws_every_level():
    fig = plots.plot_format("fp8_e4m3", n_points=50)
    level_axes = fig.axes[1]
    ticks = sum(len(line.get_xdata()) for line in level_axes.lines)
    assert ticks == 126 and level_axes.get_xscale() == "log"  # the positive levels of 253, one line per binade
    assert len(level_axes.lines) == 18  # floor(log2 x) from -9 (the smallest subnormal) to 8 (256..448)
    fig = plots.plot_format("nf4", n_points=50)
    assert len(fig.axes[1].lines[0].get_xdata()) == 16 and len(fig.axes[1].texts) == 16


def test_plot_granularity_ladder_ticks_carry_the_scale_cost():
    import torch

    from qlab.study.ladder import granularity_ladder

    W = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    fig = plots.plot_granularity_ladder(granularity_ladder({"w": W}, bits=(4, 8), granularities=("channel", "g64")))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["channel\n+0.062", "g64\n+0.25"]
    assert [l.get_label() for l in ax.lines] == ["int4", "int8"]
