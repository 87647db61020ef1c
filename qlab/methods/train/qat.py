"""Quantization-aware training (QAT): Linears that quantize in the forward pass and learn through it.

``QATLinear`` is an ``nn.Linear`` whose forward uses the fake-quantized weight (and, optionally,
fake-quantized input activations), with a straight-through gradient (Bengio et al. 2013):

    y = fq(x; act_spec) @ fq(W; spec)^T + b          d fq(W) / d W = 1 inside the grid's range, 0 outside

With ``learned_scale=True`` the weight's steps are LSQ parameters (``qlab.methods.train.lsq``); otherwise
they follow the spec's rule on the current weight, every step (``qlab.fake_quant_ste``). (A detail: an fp16
absmax scale can round a hair below max|W| / Q_P; that row's largest weight is then just outside the range
and gets no gradient for that step. Rules that search, such as 'mse', cost ~10x a float layer per step.)

    model = prepare(model, {"model.layers.*": "int4-g128", "lm_head": None})   # train it, then
    model = convert(model, QuantLinear)        # the real quantized layers: the same outputs, bit for bit

``convert`` takes the class of the quantized layer (``qlab.models.modules.QuantLinear`` or any
``cls(qweight, bias)``) as an argument because ``qlab.models`` sits above ``qlab.methods`` in the layering.
A layer with activation quantization converts to that layer wrapped in :class:`QuantizedInput`
(per-token activations are quantized dynamically, at run time, in the real layer too).

Why a straight-through estimator at all: :func:`naive_gradients` shows that a fake quant written as
``(round(W / s) * s).detach()`` gives the weight no gradient at all, and one without the detach gives
round's derivative, 0 almost everywhere; the STE gives the float layer's gradient, masked to the range.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from qlab.core.quant import fake_quant, fake_quant_ste, qparams, quantize
from qlab.core.spec import QuantSpec
from qlab.methods.train.lsq import LSQWeight

# W4A8 and friends: int8 activations with one absmax scale per token (computed at run time).
ACT_INT8_TOKEN = "int8-token-sfp32"


def _spec(value, what: str) -> QuantSpec:
    if isinstance(value, str) and ":" in value:
        raise ValueError(f"{what}={value!r} names a post-training method; QAT trains through a plain spec such as "
                         f"'int4-g128' (its gradient is the straight-through estimator)")
    return QuantSpec.parse(value)


class QATLinear(nn.Linear):
    """An nn.Linear that trains through its quantizer; see the module docstring.

    >>> layer = QATLinear.from_linear(nn.Linear(64, 8), "int4-channel")
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, spec, bias: bool = True, act_spec=None,
                 learned_scale: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.spec = _spec(spec, "spec")
        self.act_spec = None if act_spec is None else _spec(act_spec, "act_spec")
        self.lsq = LSQWeight(self.weight, self.spec) if learned_scale else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec, act_spec=None, learned_scale: bool = False) -> "QATLinear":
        """A QATLinear holding a copy of ``linear``'s weight and bias (LSQ steps start from that weight)."""
        layer = cls(linear.in_features, linear.out_features, spec, linear.bias is not None, act_spec)
        layer.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        if learned_scale:
            layer.lsq = LSQWeight(layer.weight, layer.spec)  # steps from the copied weight
        return layer

    def fake_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by: fake-quantized, with its straight-through gradient."""
        if self.lsq is not None:
            return self.lsq(self.weight)
        return fake_quant_ste(self.weight, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = fake_quant_ste(x, self.act_spec)
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)

    def quantized_weight(self):
        """The trained weight as a real quantized tensor (``qlab.quantize``): the codes and scales of the
        fake quant above (LSQ: with its learned steps)."""
        W = self.weight.detach()
        if self.lsq is None:
            return quantize(W, self.spec)
        return quantize(W, self.spec, scale=self.lsq.step().detach())

    def extra_repr(self) -> str:
        act = f", act={self.act_spec}" if self.act_spec is not None else ""
        scale = ", learned scale (LSQ)" if self.lsq is not None else ""
        return f"{super().extra_repr()}, {self.spec}{act}{scale}"


class QuantizedInput(nn.Module):
    """A quantized layer whose input activations are quantized at run time: ``layer(fq(x; act_spec))``."""

    def __init__(self, layer: nn.Module, act_spec):
        super().__init__()
        self.layer, self.act_spec = layer, QuantSpec.parse(act_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(fake_quant(x, self.act_spec))

    def extra_repr(self) -> str:
        return f"act={self.act_spec}"


def _entry(value) -> dict | None:
    """A recipe value -> {"spec", "act_spec", "learned_scale"} or None (keep float)."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"spec", "act_spec", "learned_scale"}
        if "spec" not in value or unknown:
            raise ValueError(f"a QAT recipe dict has a 'spec' and optionally 'act_spec', 'learned_scale'; "
                             f"got keys {sorted(value)}")
        return {"spec": value["spec"], "act_spec": value.get("act_spec"),
                "learned_scale": bool(value.get("learned_scale", False))}
    return {"spec": value, "act_spec": None, "learned_scale": False}


def _set(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare(model: nn.Module, recipe: dict) -> nn.Module:
    """Replace every ``nn.Linear`` whose qualified name matches a recipe pattern (fnmatch; the first
    matching pattern in dict order decides, as in ``qlab.models.walker``) by a :class:`QATLinear`; in place,
    returns the model. A value is a spec (string or QuantSpec), None (keep float), or a dict
    ``{"spec": ..., "act_spec": ACT_INT8_TOKEN, "learned_scale": True}`` (W4A8: 'int4-g128' with int8
    per-token activations).

    A Linear tied to another module's weight (a tied lm_head) gets its own copy of the weight once
    replaced; name only untied Linears if the tie must hold.
    """
    if not isinstance(recipe, dict):
        raise ValueError(f"a recipe is a dict of name patterns -> specs, got {type(recipe).__name__}")
    rules = [(pattern, _entry(v)) for pattern, v in recipe.items()]
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            raise ValueError(f"recipe pattern {pattern!r} matches no nn.Linear (e.g. {next(iter(linears), None)!r})")
    for name, linear in linears.items():
        e = next((e for p, e in rules if fnmatch.fnmatchcase(name, p)), None)
        if e is not None:
            _set(model, name, QATLinear.from_linear(linear, e["spec"], e["act_spec"], e["learned_scale"]))
    return model


def convert(model: nn.Module, layer_class) -> nn.Module:
    """Replace every QATLinear by ``layer_class(qweight, bias)`` holding its real quantized weight (wrapped in
    :class:`QuantizedInput` when it quantizes activations); in place, returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            bias = None if module.bias is None else module.bias.detach()
            layer = layer_class(module.quantized_weight(), bias)
            _set(model, name, layer if module.act_spec is None else QuantizedInput(layer, module.act_spec))
    return model


def naive_gradients(W: torch.Tensor, X: torch.Tensor, spec) -> dict:
    """The gradient norm that a squared-error loss ``|X W_hat^T - X W^T|^2`` sends to W, for three ways of
    writing the fake quant W_hat = round(W / s) * s (s from the spec's rule, per group):

    * ``"detached"``: ``(round(W / s) * s).detach()`` - the graph is cut: W gets no gradient (0)
    * ``"round"``:    ``round(W / s) * s`` - round's derivative is 0 almost everywhere: the gradient is 0
    * ``"ste"``:      ``qlab.fake_quant_ste`` - the float layer's gradient, masked to the grid's range

    >>> norms = naive_gradients(torch.randn(8, 32), torch.randn(16, 32), "int4-channel")
    >>> norms["detached"], norms["round"], norms["ste"] > 0
    (0.0, 0.0, True)
    """
    spec = QuantSpec.parse(spec)
    if spec.float_min or not spec.symmetric:
        raise ValueError(f"naive_gradients writes W_hat = round(W / s) * s, a symmetric grid; got {spec}")
    target = X @ W.T
    scale, _ = qparams(W, spec)
    gran = spec.granularity
    norms = {}
    for way in ("detached", "round", "ste"):
        w = W.detach().clone().requires_grad_(True)
        if way == "ste":
            W_hat = fake_quant_ste(w, spec)
        else:
            G, _ = gran.to_groups(w)
            W_hat = gran.from_groups(spec.grid.round(G / scale[:, None]) * scale[:, None], tuple(W.shape))
            if way == "detached":
                W_hat = W_hat.detach()
        loss = ((X @ W_hat.T - target) ** 2).mean()
        grad = torch.autograd.grad(loss, w, allow_unused=True)[0] if loss.requires_grad else None
        norms[way] = 0.0 if grad is None else float(grad.norm())
    return norms
