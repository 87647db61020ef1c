"""Applying quantization specs to a model's linear layers: one walker, recipes, two modes.

A **recipe** maps fnmatch name patterns to specs; for each ``nn.Linear`` the *first* pattern
that matches its qualified name decides (dict order), and layers no pattern matches stay float:

    recipe = {
        "*.mlp.down_proj": "int8-channel-sym-absmax",   # more bits where it hurts
        "model.layers.*":  "int4-g128-asym-minmax",     # every other block linear
        "lm_head":         None,                         # explicit: keep float
    }

A value is a :class:`~qlab.core.quant.QuantSpec`, its string, ``None`` (keep float) or the name of an
extra weight quantizer from :data:`WEIGHT_QUANTIZERS` (``"q4_1"``: llama.cpp's Q4_1 re-quantizer,
fake mode only).

Modes:

* ``"fake"``: each weight is replaced by ``dequantize(quantize(W))`` (float storage);
* ``"packed"``: each linear becomes a :class:`QuantLinear` that holds the packed
  :class:`~qlab.core.quant.QuantizedTensor` and dequantizes it in ``forward``.

Both call ``quantize`` once per layer and compute with the same dequantized weight, so they give
bit-identical logits. Replacing a weight never writes into the old tensor, so a tied
``lm_head`` can be quantized without touching the input embedding.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from qlab.study.gridalign import q4_1_fake_quant, q4_1_nbytes
from qlab.models import linear_layers
from qlab.core.quant import QuantizedTensor, QuantSpec, quantize

# name -> (fake-quant function, bytes for n weights)
WEIGHT_QUANTIZERS = {"q4_1": (q4_1_fake_quant, q4_1_nbytes)}

# The usual weight-only recipe: every linear inside the decoder blocks; embeddings and lm_head float.
BLOCK_LINEARS = "model.layers.*"


def weight_only(spec) -> dict:
    """``{"model.layers.*": spec}``: quantize every block linear, keep embeddings/lm_head float."""
    return {BLOCK_LINEARS: spec}


def _normalise(value):
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        if value in WEIGHT_QUANTIZERS:
            return value
        return QuantSpec.parse(value)
    raise ValueError(f"a recipe value must be a QuantSpec, a spec string, a quantizer name or None, got {value!r}")


def resolve(model: nn.Module, recipe: dict) -> dict:
    """``{layer name: spec or quantizer name or None}`` for every linear of the model."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a recipe is a dict of name patterns -> specs, got {type(recipe).__name__}")
    rules = [(pattern, _normalise(v)) for pattern, v in recipe.items()]
    names = list(linear_layers(model))
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"recipe pattern {pattern!r} matches no linear layer (e.g. {names[0]!r})")
    out = {}
    for name in names:
        out[name] = next((spec for pattern, spec in rules if fnmatch.fnmatchcase(name, pattern)), None)
    return out


class QuantLinear(nn.Module):
    """A linear layer storing its weight as a packed QuantizedTensor; ``y = x W_hat^T + b``."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.qweight = qweight
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.dequantize().to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, spec={self.qweight.spec}, bpw={self.qweight.bits_per_weight:.3f}"


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class SizeReport:
    """Per-layer storage of a quantized model and its totals.

    ``layers`` rows: name, spec, n_weights, bytes, bits_per_weight (codes + scales + zero points).
    Float layers and every other parameter (embeddings, norms) are counted at ``float_bits``.
    """

    layers: pd.DataFrame
    n_params: int
    other_bytes: float  # parameters outside the linears, at float_bits
    float_bits: int = 16
    extras: dict = field(default_factory=dict)

    @property
    def quantized(self) -> pd.DataFrame:
        return self.layers[self.layers.spec != "float"]

    @property
    def quantized_bpw(self) -> float:
        """Bits per weight over the quantized layers, overhead included."""
        q = self.quantized
        return float(8 * q.bytes.sum() / q.n_weights.sum()) if len(q) else float(self.float_bits)

    @property
    def linear_bpw(self) -> float:
        """Bits per weight over all linear layers (float ones at float_bits)."""
        return float(8 * self.layers.bytes.sum() / self.layers.n_weights.sum())

    @property
    def total_bytes(self) -> float:
        """Whole model: linears as stored + every other parameter at float_bits."""
        return float(self.layers.bytes.sum() + self.other_bytes)

    def summary(self) -> dict:
        return {
            "quantized_bpw": self.quantized_bpw,
            "linear_bpw": self.linear_bpw,
            "size_mb": self.total_bytes / 1e6,
            "n_quantized": len(self.quantized),
        }


@torch.no_grad()
def quantize_model(
    model: nn.Module, recipe: dict, mode: str = "fake", inplace: bool = False, float_bits: int = 16
) -> tuple[nn.Module, SizeReport]:
    """Apply ``recipe`` to every linear of ``model``; return ``(model, SizeReport)``.

    With ``inplace=False`` (default) the input model is deep-copied first and left untouched.
    """
    if mode not in ("fake", "packed"):
        raise ValueError(f"mode must be 'fake' or 'packed', got {mode!r}")
    plan = resolve(model, recipe)
    if not inplace:
        model = copy.deepcopy(model)
    layers = linear_layers(model)
    rows = []
    for name, spec in plan.items():
        layer = layers[name]
        w = layer.weight
        n = w.numel()
        if spec is None:
            rows.append((name, "float", n, n * float_bits / 8))
            continue
        if isinstance(spec, str):  # an extra weight quantizer
            fake, nbytes = WEIGHT_QUANTIZERS[spec]
            if mode == "packed":
                raise ValueError(f"quantizer {spec!r} has no packed form in qlab.models.walker; use mode='fake'")
            layer.weight = nn.Parameter(fake(w), requires_grad=False)
            rows.append((name, spec, n, nbytes(n)))
            continue
        qt = quantize(w.detach(), spec)
        if mode == "fake":
            layer.weight = nn.Parameter(qt.dequantize().to(w.dtype), requires_grad=False)
        else:
            _set_module(model, name, QuantLinear(qt, layer.bias))
        rows.append((name, str(spec), n, float(qt.nbytes)))
    return model, _report(model, rows, float_bits)


def _report(model: nn.Module, rows: list, float_bits: int) -> SizeReport:
    # everything else (embeddings unless tied to a float lm_head, norms, biases), counted once
    counted = {id(m.weight) for m in linear_layers(model).values()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return SizeReport(
        layers=pd.DataFrame(rows, columns=["name", "spec", "n_weights", "bytes"]).assign(
            bits_per_weight=lambda d: 8 * d.bytes / d.n_weights
        ),
        n_params=other + sum(r[2] for r in rows),
        other_bytes=other * float_bits / 8,
        float_bits=float_bits,
    )


def size_report(model: nn.Module, quantized: dict, float_bits: int = 16) -> SizeReport:
    """The SizeReport of ``model`` (the float model, for its layer names) with the layers in ``quantized``
    ({linear name: QuantizedTensor}, as GPTQ, AWQ and the W8A8 builders return) stored as those tensors
    and every other linear in float."""
    layers = linear_layers(model)
    unknown = set(quantized) - set(layers)
    if unknown:
        raise ValueError(f"not linear layers of the model: {sorted(unknown)[:3]}")
    rows = []
    for name, layer in layers.items():
        qt = quantized.get(name)
        n = layer.weight.numel()
        rows.append((name, "float", n, n * float_bits / 8) if qt is None else (name, str(qt.spec), n, float(qt.nbytes)))
    return _report(model, rows, float_bits)
