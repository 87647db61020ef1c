"""Round-to-nearest (RTN): the baseline every calibrated method is measured against.

No calibration data: each group's scale comes from the weights alone (the spec's rule), and every
weight goes to its nearest grid point, ``q = grid.round(w / scale + zero_point)``. It is exactly
``qlab.quantize``, behind the registry's signature.

``rotate=True`` rounds the randomized-Hadamard-rotated weight W' = V_m S_V W S_U V_n^T instead (QuIP's
incoherence processing around plain RTN) and returns a ``RotatedTensor``, whose ``dequantize()`` is the weight
rotated back. One ``seed`` for every weight: weights with the same input width get the same S_U
(``RandomizedHadamard`` draws S_U first), so Linears that share an input share its rotation.
"""
import torch

from qlab.core.quant import quantize
from qlab.core.rotations import RandomizedHadamard
from qlab.core.tensor import QuantizedTensor, RotatedTensor
from qlab.methods.base import QuantResult


def rtn(W, spec) -> QuantizedTensor:
    """Quantize a weight [out, in] (or an nn.Linear's weight) to its nearest grid points."""
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    return quantize(W, spec)


def rtn_rotated(W, spec, seed: int = 0) -> RotatedTensor:
    """RTN of W' = V_m S_V W S_U V_n^T (rotated in float64, rounded in float32 or W's wider dtype).

    Both sides of W need a Hadamard size (``qlab.core.rotations.hadamard_factors``); others raise."""
    W = W.weight.data if isinstance(W, torch.nn.Linear) else W
    R = RandomizedHadamard(*W.shape, seed=seed)
    Wr = R.weight(W.double()).to(torch.promote_types(W.dtype, torch.float32))
    return RotatedTensor.of(quantize(Wr, spec), R, W.dtype)


def rtn_method(weights, X, spec, names=None, *, rotate: bool = False, seed: int = 0) -> QuantResult:
    if rotate:
        return QuantResult([rtn_rotated(W, spec, seed) for W in weights])
    return QuantResult([rtn(W, spec) for W in weights])
