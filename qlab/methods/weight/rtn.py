"""Round-to-nearest (RTN): the baseline every calibrated method is measured against.

No calibration data: each group's scale comes from the weights alone (the spec's rule), and every
weight goes to its nearest grid point, ``q = grid.round(w / scale + zero_point)``. It is exactly
``qlab.quantize``, behind the registry's signature.
"""
import torch

from qlab.core.quant import quantize
from qlab.core.tensor import QuantizedTensor
from qlab.methods.base import QuantResult


def rtn(W, spec) -> QuantizedTensor:
    """Quantize a weight [out, in] (or an nn.Linear's weight) to its nearest grid points."""
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    return quantize(W, spec)


def rtn_method(weights, X, spec, names=None) -> QuantResult:
    return QuantResult([rtn(W, spec) for W in weights])
