"""KIVI (Liu et al. 2024, sec. 3): keys quantized per channel, values per token, 2 or 4 bits, asymmetric.

Keys have a few outlier *channels* and values do not, so a key's scale runs over G consecutive tokens of
one channel and a value's over G consecutive channels of one token. Each group is min-max with a float
minimum: x_hat = scale * q + min, scale = (max - min) / (2**bits - 1). In the core's terms:

>>> str(kivi_spec("key", bits=2, group_size=32)), str(kivi_spec("value", bits=2, group_size=32))
('int2-g32@-2-asym-minmax-fmin-sfp32', 'int2-g32-asym-minmax-fmin-sfp32')

``quantize_kv`` runs the Triton kernel (or its torch reference) and returns a ``KVQuantized``, whose
codes and statistics equal ``qlab.quantize(x, kivi_spec(...))`` bit for bit (tests/kernels/test_kivi.py).
"""
from qlab.core.spec import QuantSpec
from qlab.kernels.kivi import KVQuantized, kivi_quantize


def kivi_spec(which: str, bits: int = 2, group_size: int = 32) -> QuantSpec:
    """The core spec of KIVI's keys ('key': groups of tokens per channel) or values ('value')."""
    if which not in ("key", "value"):
        raise ValueError(f"which must be 'key' or 'value', got {which!r}")
    axis = "@-2" if which == "key" else ""
    return QuantSpec.parse(f"int{bits}-g{group_size}{axis}-asym-minmax-fmin-sfp32")


def quantize_kv(x, which: str, bits: int = 2, group_size: int = 32, backend: str | None = None) -> KVQuantized:
    """Keys or values [..., T, D] in KIVI's grouping, through the kernel (``backend``: see qlab.kernels.dispatch)."""
    return kivi_quantize(x, bits, group_size, which, backend=backend)
