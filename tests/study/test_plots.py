"""qlab.study.plots: the Pareto plot keeps off-scale rows visible as edge markers."""
import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from qlab.study import plots  # noqa: E402


def test_pareto_plot_clips_rows_above_ymax_to_the_top_edge():
    df = pd.DataFrame({"label": ["int8 a", "int4 b", "int3 c", "int2 d", "int2 e"],
                       "quantized_bpw": [8.0, 4.2, 3.2, 2.2, 2.1], "ppl": [29.0, 38.0, 150.0, 3e6, 1e8]})
    fig = plots.plot_pareto(df, ymax=300)
    ax = fig.axes[0]
    assert ax.get_ylim()[1] == 300
    edge = [c for c in ax.collections if c.get_label().startswith("2 above 300")]
    assert len(edge) == 1 and edge[0].get_offsets().tolist() == [[2.2, 300.0], [2.1, 300.0]]
    assert "up to 1e+08" in edge[0].get_label()
    front = [l for l in ax.lines if l.get_label() == "Pareto front"][0]
    assert front.get_xdata().tolist() == [3.2, 4.2, 8.0]  # the front of the rows on the chart


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
