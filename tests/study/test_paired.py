"""qlab.study.paired: neighbouring rows and their paired intervals, against hand numbers."""
import math

import pandas as pd
import pytest

from qlab.study.paired import neighbours, paired_intervals


def _table():
    return pd.DataFrame({"label": ["int8", "int4", "int3"], "quantized_bpw": [8.1, 4.2, 3.2],
                         "ppl": [math.exp(4.1), math.exp(4.15), math.exp(4.5)],
                         "window_nll": [[4.0, 4.2], [4.1, 4.2], [4.4, 4.6]]})


def test_neighbours_follow_bits_per_weight():
    assert neighbours(_table()) == [("int4", "int8"), ("int3", "int4")]


def test_paired_intervals_by_hand():
    t = paired_intervals(_table(), neighbours(_table()))
    # int4 - int8: d = (0.1, 0.0): mean 0.05, sd 0.0707, half 1.96 * 0.0707 / sqrt(2) = 0.098
    r = t.iloc[0]
    assert r.ratio == pytest.approx(math.exp(0.05))
    assert (r.ci95_low, r.ci95_high) == pytest.approx((math.exp(0.05 - 0.098), math.exp(0.05 + 0.098)), abs=1e-3)
    assert not r.resolved and r.a_better_windows == 0
    # int3 - int4: d = (0.3, 0.4): mean 0.35, sd 0.0707: the interval excludes 1
    assert t.iloc[1].resolved and t.iloc[1].ratio == pytest.approx(math.exp(0.35))


def test_missing_nll_column_is_named():
    with pytest.raises(ValueError, match="no 'window_nll' column"):
        paired_intervals(_table().drop(columns="window_nll"), [("int4", "int8")])
