"""KIVI (Liu et al. 2024, sec. 3): keys quantized per channel, values per token, 2 or 4 bits, asymmetric.

Keys have a few outlier *channels* and values do not, so a key's scale runs over G consecutive tokens of
one channel and a value's over G consecutive channels of one token. Each group is min-max with a float
minimum: x_hat = scale * q + min, scale = (max - min) / (2**bits - 1). In the core's terms:

>>> str(kivi_spec("key", bits=2, group_size=32)), str(kivi_spec("value", bits=2, group_size=32))
('int2-g32@-2-asym-minmax-fmin-sfp32', 'int2-g32-asym-minmax-fmin-sfp32')

``quantize_kv`` runs the Triton kernel (or its torch reference) and returns a ``KVQuantized``, whose
codes and statistics equal ``qlab.quantize(x, kivi_spec(...))`` bit for bit (tests/kernels/test_kivi.py).
"""
import torch

from qlab.kernels.kivi import KVQuantized, kivi_dequantize, kivi_quantize, kivi_spec  # noqa: F401  (kivi_spec: the grouping, in the kernel's module so its tensors can name their spec)


def quantize_kv(x, which: str, bits: int = 2, group_size: int = 32, backend: str | None = None) -> KVQuantized:
    """Keys or values [..., T, D] in KIVI's grouping, through the kernel (``backend``: see qlab.kernels.dispatch)."""
    return kivi_quantize(x, bits, group_size, which, backend=backend)


def dequantize_kv(q: KVQuantized, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """x ~ q * scale + min as a dense [..., T, D] tensor, through the kernel."""
    return kivi_dequantize(q, dtype, backend=backend)


def concat_tokens(a: KVQuantized | None, b: KVQuantized) -> KVQuantized:
    """``a`` then ``b`` along the token axis, without re-quantizing (``a`` may be None: just ``b``).

    Values (groups inside one token) always concatenate; keys (groups of G tokens per channel) only when
    ``a`` holds whole groups, i.e. a multiple of G tokens. Example: keys of 32 + 8 tokens, G = 8 ->
    40 tokens with stats [..., 5, D].
    """
    if a is None:
        return b
    if (a.bits, a.group_size, a.which, a.shape[:-2], a.shape[-1]) != (b.bits, b.group_size, b.which, b.shape[:-2],
                                                                     b.shape[-1]):
        raise ValueError(f"cannot concatenate {a.which} codes {a.shape} int{a.bits} g{a.group_size} with "
                         f"{b.which} codes {b.shape} int{b.bits} g{b.group_size}: bits, grouping and layout must match")
    if a.which == "key" and a.shape[-2] % a.group_size:
        raise ValueError(f"keys of {a.shape[-2]} tokens end in a partial group of {a.group_size}; only whole groups "
                         f"can be followed by more tokens")
    cat = lambda x, y: torch.cat([x, y], dim=-2)  # noqa: E731  (stats run along tokens on axis -2 in both layouts)
    return KVQuantized(cat(a.packed, b.packed), cat(a.scale, b.scale), cat(a.minimum, b.minimum),
                       (*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1]), a.bits, a.group_size, a.which, a.dtype)
