"""Granularity: which elements of a tensor share one scale (and zero point).

Each granularity turns a tensor into a 2-D matrix of *groups* ``[n_groups, group_len]`` (one row per
scale) and back. Per-group views may need padding when the group size does not divide the row: the
embedded model's 576-wide rows with groups of 128 give four groups of 128 and a last one of 64. Padding
is zeros plus a mask, and the last group is honestly counted as a group of its own (one more scale).

>>> PerGroup(4).scale_shape((2, 10))      # two rows, groups of 4, 4, 2
(2, 3)
"""
from dataclasses import dataclass
import math

import torch


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def scale_shape(self, shape):
        return ()

    def to_groups(self, x):
        return x.reshape(1, -1), None

    def from_groups(self, g, shape):
        return g.reshape(shape)

    def __str__(self):
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis``: for a Linear weight [out, in], axis=0 is per output channel."""

    axis: int = 0

    def scale_shape(self, shape):
        return (shape[self.axis],)

    def to_groups(self, x):
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"per-channel axis {self.axis} does not exist in a {x.dim()}-d tensor")
        moved = x.movedim(self.axis, 0)
        return moved.reshape(moved.shape[0], -1), None

    def from_groups(self, g, shape):
        moved_shape = list(shape)
        moved_shape.insert(0, moved_shape.pop(self.axis))
        return g.reshape(moved_shape).movedim(0, self.axis)

    def __str__(self):
        return "channel" if self.axis == 0 else f"channel@{self.axis}"


@dataclass(frozen=True)
class PerToken:
    """One scale per vector along the last dimension (per token for activations [..., hidden])."""

    def scale_shape(self, shape):
        return tuple(shape[:-1])

    def to_groups(self, x):
        return x.reshape(-1, x.shape[-1]), None

    def from_groups(self, g, shape):
        return g.reshape(shape)

    def __str__(self):
        return "token"


def _pad_last(x, size):
    """Split the last dim into groups of ``size``, zero-padding the last group; return groups and mask."""
    n = x.shape[-1]
    n_groups = math.ceil(n / size)
    pad = n_groups * size - n
    mask = None
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        mask = torch.arange(n_groups * size, device=x.device) < n  # [n_groups * size]
        mask = mask.expand(x.shape).reshape(-1, size)
    return x.reshape(-1, size), mask


@dataclass(frozen=True)
class PerGroup:
    """Groups of ``size`` consecutive elements along the last dim (the input dim of a Linear weight)."""

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"group size must be a positive integer, got {self.size!r}")

    def scale_shape(self, shape):
        return tuple(shape[:-1]) + (math.ceil(shape[-1] / self.size),)

    def to_groups(self, x):
        return _pad_last(x, self.size)

    def from_groups(self, g, shape):
        n_groups = math.ceil(shape[-1] / self.size)
        g = g.reshape(*shape[:-1], n_groups * self.size)
        return g[..., : shape[-1]].reshape(shape)

    def __str__(self):
        return f"g{self.size}"


@dataclass(frozen=True)
class PerBlock:
    """Blocks of ``size`` consecutive elements of the flattened tensor (bitsandbytes' NF4 blocks)."""

    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"block size must be a positive integer, got {self.size!r}")

    def scale_shape(self, shape):
        return (math.ceil(math.prod(shape) / self.size),)

    def to_groups(self, x):
        return _pad_last(x.reshape(-1), self.size)

    def from_groups(self, g, shape):
        return g.reshape(-1)[: math.prod(shape)].reshape(shape)

    def __str__(self):
        return f"b{self.size}"


def parse_granularity(token: str):
    """'tensor', 'channel', 'channel@1', 'token', 'g128', 'b64' -> a granularity object."""
    if token == "tensor":
        return PerTensor()
    if token == "token":
        return PerToken()
    if token == "channel":
        return PerChannel(0)
    if token.startswith("channel@"):
        return PerChannel(int(token[len("channel@"):]))
    if token[:1] in "gb" and token[1:].lstrip("-").isdigit():
        size = int(token[1:])
        return PerGroup(size) if token[0] == "g" else PerBlock(size)
    raise ValueError(f"unknown granularity {token!r}; use tensor, channel, channel@AXIS, token, gN or bN")
