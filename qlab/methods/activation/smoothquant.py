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
from qlab.core.quant import QuantSpec, QuantizedTensor, quantize, validate

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

    >>> smoothing_scales(torch.tensor([16., 1.]), [torch.tensor([[1., 4.]])], alpha=0.5)
    tensor([4.0000, 0.5000])
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"the migration strength alpha must lie in [0, 1], got {alpha}")
    weights = [w.weight.data if isinstance(w, nn.Linear) else w for w in weights]
    w_max = torch.stack([W.abs().float().amax(dim=0) for W in weights]).amax(dim=0)
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


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


class W8A8Linear(nn.Module):
    """A Linear computing in int8 x int8: weights int8 per output channel, activations int8 per token
    or per tensor. Build one with ``W8A8Linear.from_linear(linear, act='token')``."""

    def __init__(self, qweight: QuantizedTensor, bias=None, act: str = "token", static_scale=None):
        super().__init__()
        if act not in ACT_SPECS:
            raise ValueError(f"act must be one of {', '.join(ACT_SPECS)}, got {act!r}")
        if act == "static" and static_scale is None:
            raise ValueError("act='static' needs static_scale (calibrated max|x| / 127)")
        self.qweight, self.act, self.static_scale = qweight, act, static_scale
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, act: str = "token", act_max=None):
        """act_max: calibrated max|x| (a number or per-channel maxima) for act='static'."""
        static = None if act_max is None else float(torch.as_tensor(act_max).max()) / 127
        return cls(quantize(linear.weight.data, WEIGHT_SPEC), linear.bias, act, static)

    def forward(self, x):
        y = int8_matmul(quantize_activations(x, self.act, self.static_scale), self.qweight)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, act={self.act}"


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


@torch.no_grad()
def smooth_model(model, act_max: dict, alpha: float = 0.5) -> dict:
    """Fold SmoothQuant scales into every decoder layer's RMSNorms (input_layernorm -> q/k/v,
    post_attention_layernorm -> gate/up), as the reference does. ``act_max`` maps Linear names
    ('model.layers.0.self_attn.q_proj', ...) to per-channel max|x| of their inputs (e.g. from
    ``qlab.models.calib.input_stats(...)[name].max_abs``). Returns {layer index: s} per folded norm."""
    from qlab.models.transforms import fold_into_norm, llama_scaling_groups

    names = {id(m): n for n, m in model.named_modules()}
    applied = {}
    for prev, linears, fold in (g for layer in model.model.layers for g in llama_scaling_groups(layer)):
        if fold is not fold_into_norm:
            continue
        key = names[id(linears[0])]
        if key not in act_max:
            raise ValueError(f"no activation statistics for {key}")
        s = smoothing_scales(act_max[key], linears, alpha)
        fold(prev, linears, s)
        applied[names[id(prev)]] = s
    return applied


def w8a8_model(model, act: str = "token", act_max: dict | None = None, pattern: str = "model.layers.") -> dict:
    """Replace every Linear whose name starts with ``pattern`` by a W8A8Linear, in place (for 'static',
    ``act_max`` gives each layer's calibrated max|x|). Returns {name: W8A8Linear}."""
    replaced = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith(pattern):
            stat = None if act_max is None else act_max[name]
            new = W8A8Linear.from_linear(module, act=act, act_max=stat)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            replaced[name] = new
    return replaced


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
