"""Importance matrices the way llama.cpp's ``llama-imatrix`` computes them.

For a linear layer y = W x, the importance of input column j is the mean of x_j² over the
calibration tokens:  imatrix_j = (1/T) Σ_t x_{t,j}².  Quantization then weighs the error of each
weight W_ij by it (with √(σ² + W_ij²), see ``search.py``), because the output error of row i is
Σ_j (ΔW_ij)² · E[x_j²] when inputs are uncorrelated.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.methods.weight.gguf import gguf_names


@torch.no_grad()
def collect_imatrix(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict:
    """Run ``windows [N, T]`` through ``model``; return {GGUF tensor name: mean x² per column}.

    Only the block linears are covered (llama.cpp does not weigh the embedding lookup).
    """
    hf_to_gguf = {h.removesuffix(".weight"): g for g, h in gguf_names(model).items() if g.startswith("blk.")}
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, module in model.named_modules():
        if name in hf_to_gguf and isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        for w in tqdm(windows, desc="imatrix", disable=not progress):
            model(w[None])
    finally:
        for h in hooks:
            h.remove()
    return {hf_to_gguf[n]: (sums[n] / counts[n]).numpy() for n in sums}
