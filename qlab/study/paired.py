"""Paired perplexity intervals between neighbouring rows of a sweep (notebooks 05, 08, 09).

Two configurations evaluated on the same windows differ by a ratio of perplexities whose uncertainty comes from
the window-to-window spread of their NLL *difference* (``qlab.eval.metrics.paired_ppl_ratio``). Sorting the rows
by bits per weight and comparing each with the next says which steps along the size axis the windows can
resolve: an interval that contains 1 is a step the evaluation cannot tell from noise.
"""
import pandas as pd

from qlab.eval.metrics import paired_ppl_ratio


def paired_intervals(df: pd.DataFrame, pairs, label: str = "label", nll: str = "window_nll") -> pd.DataFrame:
    """One row per (a, b) label pair: ppl(a) / ppl(b) with its paired 95% interval, whether the interval
    excludes 1, and how many windows a wins."""
    if nll not in df:
        raise ValueError(f"the sweep table has no {nll!r} column (per-window NLLs); rerun the sweep with a qlab that stores it")
    rows = df.set_index(label)
    out = []
    for a, b in pairs:
        r = paired_ppl_ratio(rows.loc[a, nll], rows.loc[b, nll])
        out.append({"a": a, "b": b, "ppl_a": rows.loc[a, "ppl"], "ppl_b": rows.loc[b, "ppl"], "ratio": r["ratio"],
                    "ci95_low": r["ci95"][0], "ci95_high": r["ci95"][1],
                    "resolved": not r["ci95"][0] <= 1 <= r["ci95"][1], "a_better_windows": r["a_better"],
                    "n_windows": r["n_windows"]})
    return pd.DataFrame(out)


def neighbours(df: pd.DataFrame, by: str = "quantized_bpw", label: str = "label", descending: bool = True) -> list:
    """Consecutive (label, next label) pairs of ``df`` sorted by ``by`` (largest first by default), ties broken
    by label so the order is reproducible."""
    d = df.sort_values([by, label], ascending=[not descending, True])
    labels = d[label].tolist()
    return list(zip(labels[1:], labels[:-1]))
