"""Back-of-the-envelope memory: weights, KV cache and training state.

    weights   = n_params x bytes_per_weight              (fp32 4, fp16 2, int8 1, int4 0.5 B)
    KV cache  = 2 x n_layers x n_kv_heads x head_dim x context x batch x bytes_per_value
                (the 2 is one K and one V vector per layer, KV head and token)
    training  = n_params x 16 B                          (fp32 weights 4 + gradients 4 +
                                                          Adam first moment 4 + second moment 4;
                                                          activations not included)

Sizes are in decimal gigabytes (1 GB = 1e9 bytes) as in the usual tables:
7B x 4 B = 28 GB at fp32, 14 GB at fp16, 7 GB at int8, 3.5 GB at int4.
Real low-bit formats also store scales: int4 with an fp16 scale per group of 128 costs
4 + 16/128 = 4.125 bits/weight (see :mod:`qlab.models.walker` for exact accounting of a quantized model).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

GB = 1e9
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
TRAINING_BYTES_PER_PARAM = 16  # fp32 weights + gradients + Adam m + Adam v


@dataclass(frozen=True)
class Arch:
    """What the memory formulas need from a decoder-only transformer."""

    n_params: float
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config, n_params: float | None = None) -> "Arch":
        """From a transformers config (``num_hidden_layers``, ``num_key_value_heads``, ...)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if n_params is None:
            raise ValueError("pass n_params (e.g. model_summary(model)['n_params'])")
        return cls(n_params, config.num_hidden_layers, getattr(config, "num_key_value_heads", heads), head_dim)


# Llama-2 shapes (Touvron et al. 2023, Table 1 / released configs), with nominal sizes as the
# tables quote them. 70B uses grouped-query attention: 8 KV heads for 64 query heads.
LLAMA2 = {
    "7B": Arch(7e9, n_layers=32, n_kv_heads=32, head_dim=128),
    "13B": Arch(13e9, n_layers=40, n_kv_heads=40, head_dim=128),
    "70B": Arch(70e9, n_layers=80, n_kv_heads=8, head_dim=128),
}


def weight_bytes(n_params: float, fmt: str | float = "fp16") -> float:
    """Bytes of the weights: ``n_params`` x bytes per weight (a format name or bits per weight)."""
    if not n_params >= 0:
        raise ValueError(f"n_params must be a non-negative count, got {n_params!r}")
    if not isinstance(fmt, str) and not (isinstance(fmt, (int, float)) and fmt > 0):
        raise ValueError(f"bits per weight must be a positive number (or a format name), got {fmt!r}")
    if isinstance(fmt, str):
        if fmt not in BYTES_PER_WEIGHT:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(BYTES_PER_WEIGHT)} (or pass bits)")
        return n_params * BYTES_PER_WEIGHT[fmt]
    return n_params * fmt / 8


def kv_cache_bytes(arch: Arch, context: int, batch: int = 1, bytes_per_value: float = 2.0) -> float:
    """2 x layers x KV heads x head_dim x context x batch x bytes.

    >>> kv_cache_bytes(LLAMA2["7B"], 4096) / 2**30   # Llama-2-7B, 4k context, fp16: 2 GiB
    2.0
    """
    if context < 0 or batch < 1:
        raise ValueError("context must be >= 0 and batch >= 1")
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * context * batch * bytes_per_value


def training_bytes(n_params: float) -> float:
    """Full fine-tuning with Adam in fp32: 16 bytes per parameter (activations excluded)."""
    return n_params * TRAINING_BYTES_PER_PARAM


def weights_table(archs: dict | None = None, formats=("fp32", "fp16", "int8", "int4")) -> pd.DataFrame:
    """GB of weights per model (rows) and format (columns), plus training at 16 B/param."""
    archs = LLAMA2 if archs is None else archs
    rows = {
        name: {**{f: weight_bytes(a.n_params, f) / GB for f in formats}, "training (16 B/param)": training_bytes(a.n_params) / GB}
        for name, a in archs.items()
    }
    return pd.DataFrame(rows).T


def kv_cache_table(archs: dict | None = None, contexts=(4096, 32768, 131072), bytes_per_value: float = 2.0) -> pd.DataFrame:
    """GB of KV cache (batch 1) per model (rows) and context length (columns)."""
    archs = LLAMA2 if archs is None else archs
    return pd.DataFrame(
        {name: {ctx: kv_cache_bytes(a, ctx, 1, bytes_per_value) / GB for ctx in contexts} for name, a in archs.items()}
    ).T
