"""SmoothQuant (Xiao et al. 2023): W8A8 made accurate by migrating difficulty from activations to weights.

Activations of LLMs have a few channels ~100x larger than the rest, the same channels on every
token. Per-token int8 cannot isolate them (a scale per token, not per channel) and per-channel
activation scales would not factor out of the matmul. SmoothQuant divides channel j of the activations
by s_j and multiplies the matching weight column by s_j (folded offline into the previous RMSNorm,
see ``qlab.models.transforms``), with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)                                            (eq. 4)

alpha = 0.5 splits the difficulty evenly: after smoothing, max|X_j / s_j| = max|W_j s_j| =
sqrt(max|X_j| max|W_j|) for every channel j. Then both sides are int8:

* weights: int8, one scale per output channel (absmax);
* activations: int8 per token (dynamic), or per tensor, either dynamic (absmax of each batch) or
  static (one scale from calibration: max|x| / 127).

The matmul accumulates integers exactly and applies the two scales once: y = (qx qw^T) * sx * sw.
"""
from dataclasses import dataclass

import torch
from torch import nn

from qlab.core.granularity import PerChannel, PerTensor, PerToken
from qlab.core.quant import quantize, validate
from qlab.core.spec import QuantSpec
from qlab.core.tensor import QuantizedTensor
from qlab.methods.base import QuantResult

WEIGHT_SPEC = QuantSpec("int8", PerChannel(0), symmetric=True, rule="absmax", scale_dtype="fp32")
ACT_SPECS = {
    "token": QuantSpec("int8", PerToken(), symmetric=True, rule="absmax", scale_dtype="fp32"),
    "tensor": QuantSpec("int8", PerTensor(), symmetric=True, rule="absmax", scale_dtype="fp32"),
    "static": QuantSpec("int8", PerTensor(), symmetric=True, rule="absmax", scale_dtype="fp32"),
}


def max_abs(X: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's activation statistic: max |x| per input channel over all tokens of X [..., in]."""
    return X.reshape(-1, X.shape[-1]).abs().float().amax(dim=0)


def smoothing_scales(act_max: torch.Tensor, weights, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), W_j over every Linear reading channel j (eq. 4).

    A channel that never fired in calibration (max|X_j| = 0) keeps s_j = 1: a tiny s_j would crush its weight
    column to zero in int8, and the layer would be wrong the day it fires.

    >>> smoothing_scales(torch.tensor([16., 1.]), [torch.tensor([[1., 4.]])], alpha=0.5)
    tensor([4.0000, 0.5000])
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"the migration strength alpha must lie in [0, 1], got {alpha}")
    weights = [w.weight.data if isinstance(w, nn.Linear) else w for w in weights]
    w_max = torch.stack([W.abs().float().amax(dim=0) for W in weights]).amax(dim=0)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_max > 0, s.clamp(min=1e-5), torch.ones_like(s))  # dead in calibration: no migration


def quantize_activations(X: torch.Tensor, act: str = "token", static_scale=None) -> QuantizedTensor:
    """int8 activations: 'token' (dynamic per row), 'tensor' (dynamic per tensor), 'static' (given scale)."""
    if act not in ACT_SPECS:
        raise ValueError(f"activation quantization must be one of {', '.join(ACT_SPECS)}, got {act!r}")
    X = X.reshape(-1, X.shape[-1])
    if act == "static":
        if static_scale is None:
            raise ValueError("static activation quantization needs a calibrated scale (max|x| / 127)")
        return quantize(X, ACT_SPECS[act], scale=torch.as_tensor(static_scale, dtype=torch.float32))
    return quantize(X, ACT_SPECS[act])


def int8_matmul(qx: QuantizedTensor, qw: QuantizedTensor) -> torch.Tensor:
    """y = (qx qw^T) * sx * sw with the integer products summed exactly.

    The sums run in a float64 GEMM: every partial sum is an integer below 128^2 * in < 2^53, so float64
    holds it exactly and the result equals an int32/int64 accumulator's (torch has no BLAS for int64,
    and this is ~20x faster on a CPU)."""
    if 128**2 * qx.shape[-1] >= 2**53:
        raise ValueError(f"{qx.shape[-1]} input features: float64 sums would no longer be exact")
    acc = qx.values().double() @ qw.values().double().T  # [tokens, out], exact integers
    sx = qx.scales().reshape(-1, 1) if qx.scales().numel() > 1 else qx.scales().reshape(1, 1)
    return acc.mul(sx.double()).mul(qw.scales().double().reshape(1, -1)).float()


@dataclass
class SmoothQuantResult:
    """s: the smoothing scales to fold into the previous op (divide its outputs by s);
    qweights: int8 per-channel QuantizedTensors of W diag(s) for each Linear."""

    s: torch.Tensor
    qweights: list


def smoothquant(weights, act_max: torch.Tensor, alpha: float = 0.5) -> SmoothQuantResult:
    """Smooth the Linears ``weights`` (sharing one input with per-channel maxima ``act_max``), then quantize
    the smoothed weights to int8 per channel. Fold ``s`` into the previous op to use them."""
    weights = [w.weight.data if isinstance(w, nn.Linear) else w for w in weights]
    for W in weights:
        validate(W, "weight")
        if W.dim() != 2 or W.shape[1] != act_max.numel():
            raise ValueError(f"weights must be [out, {act_max.numel()}], got {tuple(W.shape)}")
    s = smoothing_scales(act_max, weights, alpha)
    return SmoothQuantResult(s=s, qweights=[quantize(W.float() * s, WEIGHT_SPEC) for W in weights])


def w8a8_output_error(weights, X_calib: torch.Tensor, X_test: torch.Tensor, act: str = "token",
                      alpha: float | None = None) -> float:
    """Relative output error of W8A8 on held-out inputs, for the Linears ``weights`` that read one input:

        sum_i || Q(X_test / s) Q(W_i diag(s))^T - X_test W_i^T ||^2  /  sum_i || X_test W_i^T ||^2

    with Q the int8 quantizers above (weights per output channel; activations per ``act``). ``alpha=None``
    is naive W8A8 (s = 1); otherwise s = ``smoothing_scales(max_abs(X_calib), weights, alpha)``. The
    calibration inputs ``X_calib`` give s and, for ``act='static'``, the activation scale max|X_calib / s| / 127.
    """
    weights = [w.weight.data if isinstance(w, nn.Linear) else w for w in weights]
    X_calib = X_calib.reshape(-1, X_calib.shape[-1]).float()
    X_test = X_test.reshape(-1, X_test.shape[-1]).float()
    for W in weights:
        if W.dim() != 2 or W.shape[1] != X_test.shape[1]:
            raise ValueError(f"weights must be [out, {X_test.shape[1]}], got {tuple(W.shape)}")
    s = torch.ones(X_test.shape[1]) if alpha is None else smoothing_scales(max_abs(X_calib), weights, alpha)
    static = float(max_abs(X_calib / s).max()) / 127 if act == "static" else None
    qx = quantize_activations(X_test / s, act, static)  # one activation quantization shared by every Linear
    num = den = 0.0
    for W in weights:
        Y = X_test @ W.float().T
        num += float((int8_matmul(qx, quantize(W.float() * s, WEIGHT_SPEC)) - Y).double().pow(2).sum())
        den += float(Y.double().pow(2).sum())
    return num / den


def _act_max(X) -> torch.Tensor:
    """max |x| per input channel over every batch of calibration inputs."""
    return torch.stack([max_abs(x) for x in X]).amax(dim=0)


def w8a8_method(weights, X, spec, names=None, *, act: str = "token") -> QuantResult:
    """The registry's naive W8A8: int8 weights (the spec: int8 per output channel, symmetric) and int8
    activations per ``act`` ('static' takes max|x| / 127 from the calibration inputs X)."""
    _check_weight_spec(spec)
    if act not in ACT_SPECS:
        raise ValueError(f"act must be one of {', '.join(ACT_SPECS)}, got {act!r}")
    static = float(_act_max(X).max()) / 127 if act == "static" else None
    return QuantResult([quantize(W, spec) for W in weights], act={"kind": "w8a8", "act": act, "static_scale": static})


def smoothquant_method(weights, X, spec, names=None, *, alpha: float = 0.5, act: str = "token") -> QuantResult:
    """The registry's SmoothQuant: s from the calibration inputs' max|x| (eq. 4), W diag(s) quantized to
    int8 per output channel, ``fold=s`` for the walker to fold into the previous norm; for 'static'
    activations the scale is max|x / s| / 127 on the calibration inputs."""
    _check_weight_spec(spec)
    if act not in ACT_SPECS:
        raise ValueError(f"act must be one of {', '.join(ACT_SPECS)}, got {act!r}")
    s = smoothing_scales(_act_max(X), weights, alpha)
    scaled = [W.float() * s for W in weights]
    static = float(torch.stack([max_abs(x.float() / s) for x in X]).amax()) / 127 if act == "static" else None
    return QuantResult([quantize(Ws, spec) for Ws in scaled], fold=s, weights=[Ws.to(W.dtype) for Ws, W in zip(scaled, weights)],
                       act={"kind": "w8a8", "act": act, "static_scale": static})


def _check_weight_spec(spec):
    spec = QuantSpec.parse(spec)
    if spec.format != "int8" or not spec.symmetric or str(spec.granularity) != "channel":
        raise ValueError(f"W8A8 weights are int8, symmetric, per output channel (e.g. 'int8-channel-sym-absmax' or "
                         f"'int8-channel-sym-absmax-sfp32'), got {spec}")
