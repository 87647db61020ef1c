"""LLM.int8() (Dettmers et al. 2022): int8 matmul with the outlier features kept in float.

From ~6.7B parameters on, a few hidden *feature dimensions* (columns of X) hold values up to ~60 on
most tokens. Vector-wise int8 (a scale per row of X and per output row of W) quantizes everything else
well, but one outlier in a row ruins that row's scale. The mixed-precision decomposition (eq. 7):

    O = { j : |X_ij| > threshold for some token i }        (threshold 6.0)
    Y = X[:, O] W[:, O]^T                                  (float)
      + (sx sw^T) * ( Q(X[:, ~O]) Q(W[:, ~O])^T )          (int8 x int8 -> int32)

with Q the symmetric absmax int8 quantizer: ``sx = max_j |X_i,~O| / 127`` per row of X,
``sw = max_j |W_n,j| / 127`` per output row of W. The fraction of columns taken out is the price:
they run in float. (bitsandbytes quantizes W once over all columns and multiplies the outlier part
with the de-quantized int8 weight; here the outlier part uses the float weight, as in the paper.)

Hand example, threshold 6: X = [[1, 8], [2, -1]] -> column 1 is an outlier (fraction 1/2);
with W = [[1, 1]], Y = X[:, :1] W[:, :1]^T (int8-exact here) + X[:, 1:] * 1 = [[9], [1]].
"""
from dataclasses import dataclass

import torch
from torch import nn

from qlab.methods.activation.smoothquant import WEIGHT_SPEC, int8_matmul, quantize_activations
from qlab.core.quant import quantize, validate
from qlab.core.tensor import QuantizedTensor
from qlab.methods.base import QuantResult


def outlier_columns(X: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Boolean mask [in] of the feature dimensions where some |x| exceeds ``threshold``."""
    if not isinstance(threshold, (int, float)) or not threshold > 0:  # NaN is not > 0
        raise ValueError(f"threshold must be a positive number (6.0 in the paper; inf: no outliers), got {threshold!r}")
    return (X.reshape(-1, X.shape[-1]).abs() > threshold).any(dim=0)


@dataclass
class Int8Product:
    """Y: the result [tokens, out]; outliers: mask of float-computed input columns; fraction: their share."""

    Y: torch.Tensor
    outliers: torch.Tensor
    fraction: float


def llm_int8_matmul(X: torch.Tensor, W: torch.Tensor, threshold: float = 6.0, qweight: QuantizedTensor = None) -> Int8Product:
    """X [..., in] @ W [out, in]^T with the decomposition above. ``qweight`` (int8 per output row of W
    restricted to the non-outlier columns) is computed when not given."""
    validate(X, "activations")
    validate(W, "weight")
    if W.dim() != 2 or W.shape[1] != X.shape[-1]:
        raise ValueError(f"W must be [out, {X.shape[-1]}], got {tuple(W.shape)}")
    lead = X.shape[:-1]
    X = X.reshape(-1, X.shape[-1]).float()
    O = outlier_columns(X, threshold)
    regular = ~O
    Y = X[:, O] @ W[:, O].float().T
    if regular.any():
        if qweight is None:
            qweight = quantize(W[:, regular].float(), WEIGHT_SPEC)
        Y = Y + int8_matmul(quantize_activations(X[:, regular], "token"), qweight)
    return Int8Product(Y=Y.reshape(*lead, W.shape[0]), outliers=O, fraction=float(O.float().mean()))


def llm_int8_method(weights, X, spec, names=None, *, threshold: float = 6.0) -> QuantResult:
    """The registry's LLM.int8(): each weight stored int8 per output row over all its columns (the spec), as
    bitsandbytes' Linear8bitLt stores it; at run time the input columns above ``threshold`` multiply the
    de-quantized weight in float and the rest run int8 x int8 (``qlab.models.modules.Int8Linear``)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    return QuantResult([quantize(W, spec) for W in weights], act={"kind": "llm_int8", "threshold": float(threshold)})


def int8_decomposed_matmul(X: torch.Tensor, qweight: QuantizedTensor, threshold: float = 6.0) -> Int8Product:
    """X [..., in] @ W_hat^T with a stored int8 weight (one scale per row over all columns, bitsandbytes'
    layout): the outlier columns O multiply the de-quantized weight in float, the rest run int8 x int8:

        Y = X[:, O] W_hat[:, O]^T + (sx sw^T) * (Q(X[:, ~O]) q_W[:, ~O]^T)
    """
    lead = X.shape[:-1]
    X = X.reshape(-1, X.shape[-1]).float()
    O = outlier_columns(X, threshold)
    regular = ~O
    Y = X[:, O] @ qweight.dequantize().float()[:, O].T
    if regular.any():
        qx = quantize_activations(X[:, regular], "token")
        acc = qx.values().double() @ qweight.values()[:, regular].double().T  # exact integer sums
        Y = Y + acc.mul(qx.scales().double().reshape(-1, 1)).mul(qweight.scales().double().reshape(1, -1)).float()
    return Int8Product(Y=Y.reshape(*lead, qweight.shape[0]), outliers=O, fraction=float(O.float().mean()))
