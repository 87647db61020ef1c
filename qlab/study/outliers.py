"""Outlier studies on a real model (notebook 04): the residual stream position by position, and what outlier
channels and the attention-sink token do to int8 activation quantization.

Massive activations (Sun et al. 2024) sit at one position (the first token); outlier features (Dettmers et al.
2022, LLM.int8()) sit in a few channels at every position. To tell them apart a statistic must keep positions
apart: ``residual_stream_positions`` returns max |h| over channels for every window, block and position, so
"at every position" can be read as a quantile over positions, not guessed from a maximum.
"""
import torch

from qlab.models.calib import activation_quant_error


@torch.no_grad()
def residual_stream_positions(model, windows: torch.Tensor) -> torch.Tensor:
    """max |h| over channels of the residual stream, ``[windows, n_layers + 1, seq_len]``: entry ``[w, l, t]`` is
    the largest magnitude after ``l`` blocks at position ``t`` of window ``w`` (the last entry is after the
    final norm, as transformers reports it)."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n_windows, seq_len] token ids, got shape {tuple(windows.shape)}")
    out = []
    for w in windows:
        hs = model(input_ids=w[None], output_hidden_states=True, use_cache=False).hidden_states
        out.append(torch.stack([h[0].abs().amax(-1) for h in hs]).float())
    return torch.stack(out)


def position_profile(res: torch.Tensor, q: float = 0.5) -> dict:
    """Per block, from ``residual_stream_positions``: the first position (max over windows), the largest
    ordinary position (t >= 1) and the ``q``-quantile over all ordinary positions of all windows."""
    ordinary = res[:, :, 1:].transpose(0, 1).reshape(res.shape[1], -1)  # [blocks, windows * (seq - 1)]
    return {"first": res[:, :, 0].amax(0), "ordinary_max": ordinary.amax(1),
            "ordinary_quantile": ordinary.quantile(q, dim=1), "q": q}


def activation_error_table(X: torch.Tensor, first: torch.Tensor, threshold: float = 6.0,
                           specs=("int8-tensor-sym-absmax", "int8-token-sym-absmax")) -> dict:
    """Relative error of int8 activation quantization of ``X [tokens, channels]`` on the ordinary tokens
    (``~first``), for each spec: plain, with LLM.int8()'s outlier channels (some |x| > threshold) kept in
    float, and with the ``first`` tokens (the attention sink) kept in float. spec -> {treatment: error}."""
    if first.dtype != torch.bool or first.shape != X.shape[:1]:
        raise ValueError(f"first must be a boolean mask over the {X.shape[0]} rows (tokens) of X")
    outlier_channels = torch.nonzero(X.abs().amax(0) > threshold).flatten()
    table = {}
    for spec in specs:
        def err(**keep):
            return activation_quant_error(X, spec, measure_tokens=~first, **keep)
        table[spec] = {"plain": err(),
                       f"{len(outlier_channels)} channels > {threshold:g} in float": err(keep_channels=outlier_channels),
                       "first token in float": err(keep_tokens=first)}
    return table
