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
from qlab.core.quant import QuantizedTensor, quantize, validate


def outlier_columns(X: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Boolean mask [in] of the feature dimensions where some |x| exceeds ``threshold``."""
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


class Int8Linear(nn.Module):
    """nn.Linear replacement running ``llm_int8_matmul``; keeps the float weight (the outlier columns
    change from batch to batch) and records the fraction of outlier columns of the last call."""

    def __init__(self, weight: torch.Tensor, bias=None, threshold: float = 6.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.threshold = threshold
        self.last_fraction = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0):
        return cls(linear.weight.data, linear.bias, threshold)

    def forward(self, x):
        out = llm_int8_matmul(x, self.weight, self.threshold)
        self.last_fraction = out.fraction
        y = out.Y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, threshold={self.threshold}"
