"""Round-to-nearest (RTN): the baseline every calibrated method is measured against.

No calibration data: each group's scale comes from the weights alone (the spec's rule), and every
weight goes to its nearest grid point, ``q = grid.round(w / scale + zero_point)``. It is exactly
``qlab.core.quant.quantize``; it lives here so that all algorithms share one signature.
"""
import torch

from qlab.core.quant import QuantizedTensor, quantize


def rtn(W, spec, **unused_statistics) -> QuantizedTensor:
    """Quantize a weight [out, in] (or an nn.Linear's weight) to its nearest grid points."""
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    return quantize(W, spec)
