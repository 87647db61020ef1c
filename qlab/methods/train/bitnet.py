"""BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs"): Linears with ternary weights, trained from scratch.

``BitLinear`` computes, in its forward pass (the paper's eq. 1-3, and the PyTorch code in its companion
"training tips, code and FAQ" note):

    x_n   = RMSNorm(x)                                           a norm inside the layer, before the quantizer
    x_q   = round(clip(x_n * 127 / max|x_n|, -127, 127)) * max|x_n| / 127     int8 absmax, one scale per token
    W_q   = gamma * clip(round(W / gamma), -1, 1),  gamma = mean|W|          absmean ternary, one scale per tensor
    y     = x_q @ W_q^T

with straight-through gradients of 1 everywhere for both quantizers, as the note's ``w + (q(w) - w).detach()``
(``qlab.fake_quant_ste(..., clipped=False)``: a clipped STE would freeze the ~40% of Gaussian weights beyond
gamma = mean|W|; the specs are qlab's ``'ternary'`` and ``'int8-token-sfp32'``).

The norm sits where that note's code puts it: at the input of every BitLinear, with a learned gain
(BitNet's SubLN idea: normalise what the activation quantizer sees). A model built from BitLinears thus
carries one extra RMSNorm per linear layer, on top of the block's own input norms.

Storage: a ternary weight needs log2(3) = 1.585 bits. Two bits per weight (the ternary kernel's layout,
``qlab.kernels.ternary``) waste 21%; five trits fit one byte because 3^5 = 243 <= 256, 1.6 bits per weight:
:func:`pack_trits` / :func:`unpack_trits`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qlab.core.quant import fake_quant_ste, quantize

WEIGHT_SPEC = "ternary"  # absmean, per tensor
ACT_SPEC = "int8-token-sfp32"  # absmax, per token, scales kept in fp32 (computed at run time)


class BitLinear(nn.Linear):
    """BitNet b1.58's linear layer (see the module docstring); a drop-in for nn.Linear.

    >>> layer = BitLinear(16, 4)
    >>> sorted(set((layer.quantized_weight().values().unique()).tolist()))
    [-1.0, 0.0, 1.0]
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-6):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = nn.RMSNorm(in_features, eps=eps)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = fake_quant_ste(self.norm(x), ACT_SPEC, clipped=False)  # x + (q(x) - x).detach(), as in the note
        W_q = fake_quant_ste(self.weight, WEIGHT_SPEC, clipped=False)  # gradient 1 also for |W| > gamma
        return F.linear(x_q, W_q.to(x.dtype), self.bias)

    def quantized_weight(self):
        """The ternary weight as a real quantized tensor (codes in {-1, 0, 1}, gamma per tensor); the
        ternary kernel takes it with ``TernaryWeight.from_quantized``."""
        return quantize(self.weight.detach(), WEIGHT_SPEC)


def bitnet_model(model: nn.Module, skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear by a BitLinear (same weights), except those whose name ends with one of
    ``skip`` (the paper keeps embeddings and the output head in full precision); in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not name.endswith(tuple(skip)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, BitLinear.from_linear(module))
    return model


# ---- 5 trits per byte ----------------------------------------------------------------------------------
TRITS_PER_BYTE = 5  # 3^5 = 243 <= 256


def pack_trits(T: torch.Tensor) -> torch.Tensor:
    """Ternary values {-1, 0, 1} -> uint8, five per byte, base 3 with the first trit least significant:

        byte = sum_i (t_i + 1) * 3^i,   i = 0..4          (the last byte zero-padded: trit 0 = digit 1)

    >>> pack_trits(torch.tensor([1, 0, -1, 1, 1, -1]))   # digits 2,1,0,2,2 -> 2+3+0+54+162; then 0,1,1,1,1
    tensor([221, 120], dtype=torch.uint8)
    """
    t = T.reshape(-1).to(torch.int64)
    if t.numel() and (t.min() < -1 or t.max() > 1):
        raise ValueError("pack_trits takes ternary values in {-1, 0, 1} (e.g. quantize(W, 'ternary').values())")
    digits = F.pad(t + 1, (0, (-t.numel()) % TRITS_PER_BYTE), value=1).reshape(-1, TRITS_PER_BYTE)
    return (digits * 3 ** torch.arange(TRITS_PER_BYTE)).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``n`` ternary values as int64."""
    p = packed.reshape(-1).to(torch.int64)
    if p.numel() != -(-n // TRITS_PER_BYTE):
        raise ValueError(f"{p.numel()} bytes cannot hold exactly {n} trits (5 per byte)")
    if p.numel() and p.max() >= 3**TRITS_PER_BYTE:
        raise ValueError(f"a byte of 5 trits is below 243, got {int(p.max())}")
    digits = (p[:, None] // 3 ** torch.arange(TRITS_PER_BYTE)) % 3
    return digits.reshape(-1)[:n] - 1
