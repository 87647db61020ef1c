"""Activation statistics with forward hooks: what the inputs of every linear layer look like.

For a linear ``y = x W^T`` with input ``x`` of shape ``[tokens, in]``, the per-channel statistics
over all calibration tokens ``t`` are

    max_abs[j]  = max_t |x[t, j]|          mean_abs[j] = (1/T) sum_t |x[t, j]|
    p_q[j]      = q-th percentile over t of |x[t, j]|

Outlier features (LLM.int8(), Dettmers et al. 2022, Sec. 3.2) show up as a few channels ``j`` whose
``max_abs`` is 10-20x the median channel, at the same ``j`` across many layers.

Layers that read the *same* input tensor (q/k/v projections; gate/up) share one accumulator, so
memory for exact percentiles is one ``[tokens, in]`` float16 buffer per distinct input.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qlab.models import linear_layers


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one linear layer's input."""

    max_abs: torch.Tensor  # [in]
    mean_abs: torch.Tensor  # [in]
    percentiles: dict  # {q: tensor [in]}, q in percent
    n_tokens: int

    def outlier_ratio(self) -> torch.Tensor:
        """max_abs[j] / median_j(max_abs): how far each channel sticks out (torch's lower median)."""
        return self.max_abs / self.max_abs.median()


class _Accumulator:
    def __init__(self, keep_values: bool):
        self.max_abs = None
        self.sum_abs = None
        self.n = 0
        self.values = [] if keep_values else None

    def add(self, x: torch.Tensor):
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()
        m, s = a.amax(0), a.sum(0)
        self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)
        self.sum_abs = s if self.sum_abs is None else self.sum_abs + s
        self.n += a.shape[0]
        if self.values is not None:
            self.values.append(a.half())

    def finish(self, percentiles) -> ChannelStats:
        pct = {}
        if self.values:
            a = torch.cat(self.values).float()
            qs = torch.tensor([p / 100 for p in percentiles])
            # torch.quantile is limited to 16M elements; go a slice of channels at a time
            step = max(1, (1 << 24) // a.shape[0])
            out = torch.cat([torch.quantile(a[:, i : i + step], qs, dim=0) for i in range(0, a.shape[1], step)], 1)
            pct = {p: out[k] for k, p in enumerate(percentiles)}
        return ChannelStats(self.max_abs, self.sum_abs / self.n, pct, self.n)


def select_linears(model, pattern: str | None = None) -> dict:
    """Linear layers whose qualified name matches the fnmatch ``pattern`` (all if None)."""
    layers = linear_layers(model)
    if pattern is None:
        return layers
    return {n: m for n, m in layers.items() if fnmatch.fnmatchcase(n, pattern)}


@torch.no_grad()
def input_stats(
    model,
    windows: torch.Tensor,
    pattern: str | None = None,
    percentiles=(50.0, 99.0, 99.9),
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of the input of every linear layer matching ``pattern``.

    Exact percentiles keep every |x| in float16 until the end: pass ``percentiles=()``
    for only max/mean when the calibration set is large.
    """
    layers = select_linears(model, pattern)
    if not layers:
        raise ValueError(f"no linear layer matches {pattern!r}")
    accs: dict[str, _Accumulator] = {}
    last = {"x": None, "acc": None}

    def hook(name):
        def fn(module, args):
            x = args[0]
            if x is last["x"]:  # same tensor as the previous layer: share its accumulator
                accs[name] = last["acc"]
                return
            acc = accs.setdefault(name, _Accumulator(bool(percentiles)))
            acc.add(x)
            last["x"], last["acc"] = x, acc

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="calibration", disable=not progress, leave=False):
            model(input_ids=windows[start : start + batch_size], use_cache=False)
            last["x"] = None
    finally:
        for h in handles:
            h.remove()
    done = {}
    out = {}
    for name in layers:
        acc = accs[name]
        if id(acc) not in done:
            done[id(acc)] = acc.finish(percentiles)
        out[name] = done[id(acc)]
    return out


class _AllCaptured(Exception):
    """Raised by a capture hook once every requested layer has seen its input: the rest of the
    forward pass (the later decoder layers and the head) is skipped."""


@torch.no_grad()
def capture_inputs_of(model, windows: torch.Tensor, names, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """The full input matrices ``{name: X [tokens, in]}`` (float32) of several linear layers, in one pass.

    Each forward pass stops as soon as every layer in ``names`` has received its input (as GPTQ's
    reference stops at the layer it calibrates): capturing the inputs of layer 10 of 30 costs about
    a third of a full forward.
    """
    layers = linear_layers(model)
    names = list(dict.fromkeys(names))  # unique, in the given order
    missing = [n for n in names if n not in layers]
    if missing or not names:
        raise ValueError(f"not linear layers of this model: {missing or names}")
    rows = {n: [] for n in names}
    seen = set()

    def hook(name):
        def fn(module, args):
            rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
            seen.add(name)
            if len(seen) == len(names):
                raise _AllCaptured

        return fn

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for start in range(0, len(windows), batch_size):
            seen.clear()
            try:
                model(input_ids=windows[start : start + batch_size], use_cache=False)
            except _AllCaptured:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def capture_inputs(model, windows: torch.Tensor, name: str, batch_size: int = 1) -> torch.Tensor:
    """The full input matrix ``X [tokens, in]`` (float32) of the linear layer ``name``."""
    if name not in linear_layers(model):
        raise ValueError(f"{name!r} is not a linear layer of this model")
    return capture_inputs_of(model, windows, [name], batch_size)[name]


@torch.no_grad()
def residual_stream_abs(model, windows: torch.Tensor) -> torch.Tensor:
    """max |h| over channels of the residual stream, ``[n_layers + 1, seq_len]``, maximised over
    windows. Entry ``[l, t]`` is the largest hidden-state magnitude after ``l`` blocks at position
    ``t`` (transformers applies the final norm to the last entry); massive activations
    (Sun et al. 2024) appear as thousands at ``t = 0``."""
    out = None
    for start in range(len(windows)):
        hs = model(input_ids=windows[start : start + 1], output_hidden_states=True, use_cache=False).hidden_states
        m = torch.stack([h[0].abs().amax(-1) for h in hs]).float()
        out = m if out is None else torch.maximum(out, m)
    return out


def outlier_channels(stats: dict[str, ChannelStats], threshold: float = 6.0) -> dict[str, torch.Tensor]:
    """Indices of input channels whose max |x| exceeds ``threshold`` (LLM.int8()'s 6.0)."""
    return {n: torch.nonzero(s.max_abs > threshold).flatten() for n, s in stats.items()}


def site_matrix(stats: dict[str, ChannelStats], suffix: str, field: str = "max_abs") -> torch.Tensor:
    """Stack one statistic of every layer whose name ends with ``suffix`` -> ``[layers, channels]``."""
    rows = [getattr(s, field) for n, s in stats.items() if n.endswith(suffix)]
    if not rows:
        raise ValueError(f"no layer name ends with {suffix!r}")
    return torch.stack(rows)


def top_channels(stats: dict[str, ChannelStats], suffix: str, k: int = 3):
    """Per layer, the ``k`` input channels with the largest max |x| and their ratio to the median."""
    import pandas as pd

    rows = []
    for layer, (name, s) in enumerate((n, s) for n, s in stats.items() if n.endswith(suffix)):
        ratio = s.outlier_ratio()
        top = torch.topk(s.max_abs, k).indices
        rows.append({"layer": layer, "name": name, **{f"ch{i + 1}": int(c) for i, c in enumerate(top)},
                     **{f"ratio{i + 1}": float(ratio[c]) for i, c in enumerate(top)}})
    return pd.DataFrame(rows)


def activation_quant_error(
    X: torch.Tensor,
    spec,
    keep_channels: torch.Tensor | None = None,
    keep_tokens: torch.Tensor | None = None,
    measure_tokens: torch.Tensor | None = None,
) -> float:
    """Relative error ||X - X_hat||_F / ||X||_F of quantizing activations ``X [tokens, in]`` with ``spec``.

    Channels in ``keep_channels`` and tokens in the boolean mask ``keep_tokens`` stay in float
    (LLM.int8()'s mixed-precision decomposition, Dettmers et al. 2022, eq. 7, keeps outlier channels);
    everything else is quantized *together* (so a per-tensor scale sees only those values). The error is
    measured on the rows ``measure_tokens`` (boolean mask; all rows if None): a massive token dominates
    ||X||, so measure on the ordinary tokens to see what it does to them.
    """
    from qlab.core.error import rel_fro
    from qlab.core.quant import fake_quant

    X = X.float()
    rows = torch.ones(X.shape[0], dtype=torch.bool) if keep_tokens is None else ~keep_tokens
    cols = torch.ones(X.shape[1], dtype=torch.bool)
    if keep_channels is not None and len(keep_channels):
        cols[keep_channels] = False
    X_hat = X.clone()
    block = X[rows][:, cols].contiguous()
    X_hat[rows.nonzero()[:, :1], cols.nonzero()[:, 0]] = fake_quant(block, spec)
    m = slice(None) if measure_tokens is None else measure_tokens
    return rel_fro(X[m], X_hat[m])
