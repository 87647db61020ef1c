"""The granularity ladder: one matrix quantized per tensor, per channel and in groups of 1024 … 32, as error
against bits per weight *including* the scales (notebook 03).

With fp16 scales a row of c columns in groups of g costs b + 16·ceil(c/g)/c bits per weight: int4 in groups
of 32 is 4.5, per channel (one group per row) 4 + 16/c.
"""
import torch

from qlab.core.error import rel_fro
from qlab.core.quant import quantize

GRANULARITIES = ("tensor", "channel", "g1024", "g512", "g256", "g128", "g64", "g32")


def granularity_ladder(matrices: dict, bits=(4,), granularities=GRANULARITIES, rule: str = "sym-absmax") -> list[dict]:
    """Rows (matrix, bits, granularity, rel_error = ||W - Ŵ||_F / ||W||_F, bits_per_weight) for every
    matrix (name -> 2-D tensor), bit width and granularity, with the core's ``int<b>-<granularity>-<rule>``."""
    for name, W in matrices.items():
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError(f"matrices[{name!r}] must be a 2-D tensor (rows = output channels); got "
                             f"{getattr(W, 'shape', type(W).__name__)}")
    return [dict(matrix=name, bits=b, granularity=gr, rel_error=rel_fro(W, qt.dequantize()),
                 bits_per_weight=qt.bits_per_weight)
            for name, W in matrices.items() for b in bits for gr in granularities
            for qt in [quantize(W, f"int{b}-{gr}-{rule}")]]
