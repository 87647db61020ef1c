"""The modules a quantized model is built from. Each holds a quantized tensor (any QTensor: a core
QuantizedTensor, a GGUFTensor, a CodebookTensor) instead of a float weight.

* ``QuantLinear``    y = x W_hat^T + b, W_hat de-quantized in every forward (weight-only)
* ``QuantEmbedding`` rows of the de-quantized table
* ``W8A8Linear``     int8 weights x int8 activations (per token, per tensor, or a static scale), exact
                     integer sums (SmoothQuant's and naive W8A8)
* ``Int8Linear``     LLM.int8(): outlier input columns in float, the rest int8 x int8
* ``QuipLinear``     QuIP#: the weight kept in the rotated basis, the activation rotated on the fly
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from qlab.methods.activation.llm_int8 import int8_decomposed_matmul
from qlab.core.quant import quantize
from qlab.core.rotations import hadamard, hadamard_factors, hadamard_transform
from qlab.kernels import hadamard as fwht_kernel
from qlab.methods.activation.smoothquant import ACT_SPECS, WEIGHT_SPEC, int8_matmul, quantize_activations


def _bias(bias):
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class QuantLinear(nn.Module):
    """A linear layer storing its weight as a quantized tensor; ``y = x W_hat^T + b``."""

    def __init__(self, qweight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = _bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        what = getattr(self.qweight, "spec", None) or getattr(self.qweight, "qtype", type(self.qweight).__name__)
        return f"{self.in_features}, {self.out_features}, {what}, bpw={self.qweight.bits_per_weight:.3f}"


class QuantEmbedding(nn.Module):
    """An embedding table stored as a quantized tensor [vocab, hidden]."""

    def __init__(self, qweight, padding_idx=None):
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight.dequantize(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bpw={self.qweight.bits_per_weight:.3f}"


class W8A8Linear(nn.Module):
    """A Linear computing in int8 x int8: ``qweight`` int8 per output channel, activations int8 per token,
    per tensor, or per tensor with a calibrated ``static_scale`` (max|x| / 127)."""

    def __init__(self, qweight, bias=None, act: str = "token", static_scale=None):
        super().__init__()
        if act not in ACT_SPECS:
            raise ValueError(f"act must be one of {', '.join(ACT_SPECS)}, got {act!r}")
        if act == "static" and static_scale is None:
            raise ValueError("act='static' needs static_scale (calibrated max|x| / 127)")
        self.qweight, self.act, self.static_scale = qweight, act, static_scale
        self.bias = _bias(bias)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, act: str = "token", act_max=None, spec=WEIGHT_SPEC):
        """act_max: calibrated max|x| (a number or per-channel maxima) for act='static'."""
        static = None if act_max is None else float(torch.as_tensor(act_max).max()) / 127
        return cls(quantize(linear.weight.data, spec), linear.bias, act, static)

    def forward(self, x):
        y = int8_matmul(quantize_activations(x, self.act, self.static_scale), self.qweight)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, act={self.act}"


class Int8Linear(nn.Module):
    """LLM.int8(): the weight stored int8 per output row (bitsandbytes' layout); per call, input columns
    with some |x| > threshold multiply the de-quantized weight in float, the rest run int8 x int8.
    ``last_fraction`` is the share of outlier columns in the last call."""

    def __init__(self, qweight, bias=None, threshold: float = 6.0):
        super().__init__()
        self.qweight, self.threshold = qweight, threshold
        self.bias = _bias(bias)
        self.out_features, self.in_features = qweight.shape
        self.last_fraction = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0, spec=WEIGHT_SPEC):
        return cls(quantize(linear.weight.data, spec), linear.bias, threshold)

    def forward(self, x):
        out = int8_decomposed_matmul(x, self.qweight, self.threshold)
        self.last_fraction = out.fraction
        y = out.Y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}"


def kron_hadamard(x: torch.Tensor, transpose: bool = False, fwht: str | None = None) -> torch.Tensor:
    """x @ V^T over the last dim (x @ V when ``transpose``), V = (H_K (x) H_p) / sqrt(n), n = K p.

    ``fwht=None``: qlab.core.rotations' torch path, in x's dtype. Otherwise a qlab.kernels backend name ('torch',
    'interpret', 'triton'): the power-of-two factor H_p goes through the FWHT kernel (float32), and the small
    K x K factor is a matmul, as x (A (x) B)^T = A X B^T with x viewed as a K x p matrix X.
    """
    if fwht is None:
        return hadamard_transform(x, transpose=transpose)
    n = x.shape[-1]
    K, p = hadamard_factors(n)
    X = fwht_kernel.hadamard_transform(x.reshape(*x.shape[:-1], K, p), normalize=False, backend=fwht)  # X H_p
    A = hadamard(K).to(X.dtype)
    Y = torch.einsum("ka,...ap->...kp", A.T if transpose else A, X)
    return Y.reshape(x.shape) / math.sqrt(n)


class QuipLinear(nn.Module):
    """A QuIP# Linear kept in the rotated basis, the activation rotated on the fly (QuIP# sec. 3, alg. 1).

    The stored weight is W' = scale * C[codes] with W = S_V V_m^T W' V_n S_U, so

        y = x W^T + b = ((x S_U) V_n^T W'^T V_m) S_V + b:

    rotate the input (signs, then a Kronecker-factored Hadamard transform, n (K + log2 p) operations), multiply
    by the rotated weight, and turn the output back (V_m, then the signs). The result equals
    ``F.linear(x, qweight.dequantize())`` to float rounding. ``fwht``: see :func:`kron_hadamard`.
    """

    def __init__(self, qweight, bias: torch.Tensor | None = None, fwht: str | None = None):
        super().__init__()
        if getattr(qweight, "kind", None) != "quip":
            raise ValueError(f"QuipLinear holds a QuIP# weight (QuipTensor), got {type(qweight).__name__}")
        self.qweight, self.fwht = qweight, fwht
        self.out_features, self.in_features = qweight.shape
        self.bias = _bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        xr = kron_hadamard(x * q.SU.to(x.dtype), fwht=self.fwht)  # x S_U V_n^T
        yr = F.linear(xr, q.rotated().to(x.dtype))  # (x S_U V_n^T) W'^T
        y = kron_hadamard(yr, transpose=True, fwht=self.fwht) * q.SV.to(x.dtype)  # ... V_m S_V
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qweight.spec}, rotated basis, " \
               f"bpw={self.qweight.bits_per_weight:.3f}"


def build(module: nn.Module, qweight, act: dict | None, mode: str) -> nn.Module | None:
    """The module that replaces ``module`` (an nn.Linear or nn.Embedding) for a quantized weight; None in
    fake mode for weight-only results (the caller swaps in the de-quantized weight instead)."""
    if act is not None:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"activation quantization applies to Linear layers, not {type(module).__name__}")
        if act["kind"] == "w8a8":
            return W8A8Linear(qweight, module.bias, act["act"], act.get("static_scale"))
        if act["kind"] == "llm_int8":
            return Int8Linear(qweight, module.bias, act["threshold"])
        if act["kind"] == "quip_rotated":  # not a quantization of x: its rotation, in either mode
            return QuipLinear(qweight, module.bias, act.get("fwht"))
        raise ValueError(f"unknown activation quantization {act['kind']!r}")
    if mode == "fake":
        return None
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(qweight, module.padding_idx)
    return QuantLinear(qweight, module.bias)
