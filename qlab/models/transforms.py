"""Function-preserving transforms of a model's weights: per-channel scaling folded into the previous op.

A Linear that reads the output of an op ``prev`` computes ``y = W x``. For any positive vector ``s``
(one entry per input channel),

    y = W x = (W diag(s)) (x / s)

so dividing ``prev``'s output channels by ``s`` and multiplying the Linear's input columns by ``s``
leaves the model's function unchanged, while moving magnitude between activations and weights:

* SmoothQuant (Xiao et al. 2023, eq. 4) divides the activations' outlier channels by s, so that they
  become easy to quantize, and lets the weights absorb s;
* AWQ (Lin et al. 2024, eq. 4-5) multiplies the salient input channels of the weight by s > 1, so
  their rounding error shrinks relative to their size.

Where ``x / s`` can be folded without any runtime cost:

* an RMSNorm ``x_hat * g``  ->  ``g / s``   (``fold_into_norm``);
* a Linear ``x = A u + b``  ->  ``A / s[:, None]``, ``b / s``   (``fold_into_linear``; e.g. v_proj
  before o_proj when the shapes match, up_proj before down_proj: the SiLU gate multiplies up_proj's
  output element-wise, so scaling up_proj's rows scales the product).

>>> norm = torch.nn.RMSNorm(2); norm.weight.data = torch.tensor([1., 2.])
>>> lin = torch.nn.Linear(2, 1, bias=False); lin.weight.data = torch.tensor([[3., 4.]])
>>> fold_into_norm(norm, [lin], torch.tensor([1., 4.])); norm.weight.data, lin.weight.data
(tensor([1.0000, 0.5000]), tensor([[ 3., 16.]]))
"""
import torch
from torch import nn


def _check_scales(s: torch.Tensor, linears, n: int):
    if s.dim() != 1 or s.numel() != n:
        raise ValueError(f"need one scale per channel ({n}), got shape {tuple(s.shape)}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("channel scales must be finite and positive")
    for lin in linears:
        if lin.in_features != n:
            raise ValueError(f"a Linear with {lin.in_features} inputs cannot follow an op with {n} output channels")


@torch.no_grad()
def scale_input_columns(linears, s: torch.Tensor):
    """W <- W diag(s) for each Linear reading the scaled channels."""
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears, s: torch.Tensor):
    """RMSNorm/LayerNorm weight g <- g / s (and bias b <- b / s), Linear columns <- columns * s."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__} has no elementwise weight to fold scales into")
    _check_scales(s, linears, norm.weight.numel())
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    scale_input_columns(linears, s)


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears, s: torch.Tensor):
    """prev's output rows (and bias) <- / s, the following Linears' input columns <- * s."""
    _check_scales(s, linears, prev.out_features)
    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    scale_input_columns(linears, s)


@torch.no_grad()
def divide_output(prev: nn.Module, s: torch.Tensor):
    """The previous op's half of a fold: a norm's weight (and bias) or a Linear's output rows (and bias)
    divided by s. (The following Linears' columns times s is the other half.)"""
    if isinstance(prev, nn.Linear):
        _check_scales(s, [], prev.out_features)
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    else:
        if getattr(prev, "weight", None) is None:
            raise ValueError(f"{type(prev).__name__} has no elementwise weight to fold scales into")
        _check_scales(s, [], prev.weight.numel())
        prev.weight.div_(s.to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias.dtype))


def llama_scaling_groups(layer: nn.Module) -> list:
    """The (prev, [linears], fold) triples of one Llama-style decoder layer whose input channels can be
    rescaled for free, in forward order (as AWQ's reference code lists them):

    input_layernorm -> q, k, v;  v_proj -> o_proj (only when shapes match: not with grouped-query
    attention, where one v channel feeds several heads);  post_attention_layernorm -> gate, up;
    up_proj -> down_proj.
    """
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], fold_into_norm)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj], fold_into_linear))
    groups.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], fold_into_norm))
    groups.append((mlp.up_proj, [mlp.down_proj], fold_into_linear))
    return groups
