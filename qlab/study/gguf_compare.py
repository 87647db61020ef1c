"""Weight error against bits per weight: GGUF block formats next to qlab's core specs.

Both kinds of quantized tensor expose ``.dequantize()`` and ``.bits_per_weight``, so one loop
measures them all on the same real weights.
"""
from __future__ import annotations

import pandas as pd
import torch

from qlab.core.error import rel_fro
from qlab.gguf.blocks import get_format, quantize as gguf_quantize


def error_table(weights: dict, gguf_types=(), core_specs=()) -> pd.DataFrame:
    """One row per (tensor, method): family, bits_per_weight, rel_err = ||W - Ŵ||_F / ||W||_F.

    A GGUF type is skipped for a tensor whose rows do not fit its blocks (k-quants need 256).
    """
    from qlab.core.quant import quantize as core_quantize
    from qlab.core.spec import QuantSpec

    rows = []
    for name, w in weights.items():
        w = torch.as_tensor(w, dtype=torch.float32)
        for t in gguf_types:
            if w.shape[-1] % get_format(t).block_size:
                continue
            q = gguf_quantize(w, t)
            rows.append(dict(tensor=name, method=t, family="gguf", bits_per_weight=q.bits_per_weight,
                             rel_err=rel_fro(w, q.dequantize())))
        for spec in core_specs:
            q = core_quantize(w, QuantSpec.parse(spec))
            rows.append(dict(tensor=name, method=spec, family="qlab core", bits_per_weight=q.bits_per_weight,
                             rel_err=rel_fro(w, q.dequantize())))
    return pd.DataFrame(rows)
