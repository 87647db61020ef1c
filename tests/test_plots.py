"""qlab.plots: the Pareto plot keeps off-scale rows visible as edge markers."""
import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from qlab import plots  # noqa: E402


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
